"""The analytic model: plan enumeration and the step cost (planner.py), memory per device under a
plan (footprint.py, its blocks measured on fake tensors through device.fake.measure.measure_block),
and the full-scale break-even over them with its sensitivity (fullscale.py). No workers run here:
driver/ runs them and gathers results (driver/sensitivity.py re-runs measured searches)."""
