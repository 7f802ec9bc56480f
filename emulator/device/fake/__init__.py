"""Fake tensors on one device: a full-size training step's cost and activation memory without
the memory (measure.py), fake mode's answers remembered under a cheap key (ops.py), and a shared
run's role recorded alone (record.py). The analytic model's memory footprint measures its blocks
through measure.measure_block."""
