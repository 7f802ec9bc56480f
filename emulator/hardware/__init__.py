"""Hardware: the chip catalog (sourced figures) and systems (chips, scale-up domains, links,
power). The bottom layer: it imports nothing else of Relay."""
