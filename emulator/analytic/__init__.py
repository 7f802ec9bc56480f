"""The analytic model: plan enumeration and the step cost (planner.py), memory per device under a
plan (footprint.py, its blocks measured on fake tensors through device.fake.measure), the full-scale
break-even over it (fullscale.py) and the sensitivity ranges (sensitivity.py). No workers run here:
driver/ runs them and gathers results."""
