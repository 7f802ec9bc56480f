"""The break-even search's own checks (emulator/driver/experiment.py), on points with given figures: the
count below the answer must fall short, and non-monotone steps among the probes are reported."""

from relay import System
from relay.driver.experiment import BreakEven, Point, _non_monotone

SLOW = System("a100", 64)


def point(n: int, tokens_per_s: float) -> Point:
    return Point(SLOW.scaled(n), "halving_doubling", {"devices": n, "tokens_per_s": tokens_per_s,
                                                     "samples_per_s": tokens_per_s})


def test_non_monotone_steps_are_found():
    probes = [point(4, 40.0), point(5, 38.0), point(6, 60.0), point(8, 80.0)]
    assert _non_monotone(probes, "throughput", None) == [(4, 5)]
    assert _non_monotone([point(1, 10.0), point(2, 20.0)], "throughput", None) == []


def test_verified_needs_the_count_below_to_fall_short():
    fast = point(3, 50.0)
    ok = BreakEven("ring", fast, point(6, 60.0), 6, 10.0, 1.0, below=point(5, 45.0))
    assert ok.verified is True
    # the count below reached the target too: the answer is not the smallest
    bad = BreakEven("ring", fast, point(6, 60.0), 6, 10.0, 1.0, below=point(5, 55.0))
    assert bad.verified is False
    assert BreakEven("ring", fast, point(6, 60.0), 6, 10.0, 1.0).verified is False  # never run
    assert BreakEven("ring", fast, point(1, 60.0), 1, 10.0, 1.0).verified is None  # nothing below 1
