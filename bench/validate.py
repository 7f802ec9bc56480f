"""Relay against published measurements (nccl-tests busbw and time, best-shape GEMM TFLOPS):
the same as `relay validate`. Prints each row's published and emulated figure with the ratio,
the median and geometric-mean absolute error of the rows not used for fitting and the worst row,
and ends with a one-line verdict against the target (that median |error| <= 10%, no row beyond
30%); exits 1 on a miss.

    .venv/bin/python bench/validate.py [--only REGEX] [--json]
"""

import argparse
import sys

from relay.launch.validate import cmd_validate

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table")
    p.add_argument("--only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.update = False
    sys.exit(cmd_validate(args))
