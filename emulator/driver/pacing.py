"""How fast the wall clock may run a job on this host: the dilation policy.

A job's `ratio` is its worst real time per emulated second on this host (from the calibration,
from probe steps, or from the conservative host transport figures below); the dilation that
keeps every device on schedule follows from it (kernels/calibrate.py).
"""

from __future__ import annotations

from relay.device.job import Job
from relay.errors import ConfigError
from relay.kernels.calibrate import calibrate, check_dilation, dilation_for

CLOCKS = ("virtual", "wall")
HOST_LATENCY_S = 6e-3  # conservative real one-way message time between workers on one host (median
#                       0.4 ms through the transport, but a device waking from a sleep can take 2 ms)
HOST_BPS = 0.25e9  # conservative real bytes/s per message between workers on one host (2.4e9 measured
#                    for one idle pair, ~0.6e9 per device in a 4-worker ring on 2 cores)
MAX_DILATION = 1e8  # beyond this, an emulated microsecond would take minutes of real time


def comm_ratio(system, nbytes: float) -> float:
    """Worst real/emulated time of one message on this host, small or large."""
    links = [system.scaleup] + ([system.scaleout] if system.domains > 1 else [])
    ratios = [HOST_LATENCY_S / link.latency_s for link in links]
    ratios += [(HOST_LATENCY_S + nbytes / HOST_BPS) / link.seconds(nbytes) for link in links]
    return max(ratios)


def make_job(cluster, ratio: float, now: float) -> Job:
    """The Job of one run on `cluster` (its system, clock and settings), with the dilation the
    host needs on the wall clock; a user's dilation below that is refused, naming the one needed."""
    n = cluster.system.devices
    dilation, epoch = None, None
    if cluster.clock == "wall":
        cores = (cluster.host or calibrate()).cores
        needed = dilation_for(ratio, n, cores)
        if not needed < MAX_DILATION:
            raise ConfigError(f"clock = 'wall' cannot pace this job: it would need dilation {needed:.3g} "
                             "(the emulated ops or links are far faster than this host can time); "
                             "use clock='virtual'")
        if cluster.dilation is not None and cluster.check_dilation:
            try:  # kernels/ (below this layer) raise plain ValueErrors
                check_dilation(cluster.dilation, needed, n, cores)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        dilation = cluster.dilation or needed
        epoch = now + 0.3 + 0.02 * n  # every device has the call before emulated 0
    return Job(cluster.system, cluster.clock, dilation, epoch, cluster.dtype, cluster.efficiency,
               cluster.timeout_s, cluster.faults)
