"""Results: folders (locks, atomic writes, provenance), the trace export, plots, and writing
what a command measured."""
