"""Serving steps on the emulated devices (device/training/serving.py, driver/serving.py): a decode
step of moe-debug (MLA, a shared expert) with attention data parallel and the experts over 4
devices, the dispatch and combine as all-to-alls through the `relay` backend, on fake tensors.
Shared (one worker records the one role, every device replayed) equals one process per device in
every emulated figure; without overlap the step equals the serving model's (analytic/serving.py):
the same compute op by op, the all-to-alls timed by the executor as by the closed form."""

import pytest

from relay import System
from relay.analytic import serving
from relay.device.training.serving import Step
from relay.driver import serving as on_devices

KEYS = ("start_s", "end_s", "compute_s", "comm_s", "exposed_comm_s", "pipeline_wait_s", "flops", "spans")


def test_shared_decode_equals_one_process_per_device(cluster):
    # batch 7: micro-batches of 3 and 4 sequences, 6 and 8 rows over 4 devices (balanced_splits' rotation)
    step = Step("moe-debug", 4, 4, 7, 1, 25, micro=2)
    full, shared = on_devices.run(cluster, step, shared_run=False), on_devices.run(cluster, step, shared_run=True)
    assert (full.roles, shared.roles) == (4, 1)
    assert [{k: r[k] for k in KEYS} for r in shared.rows] == [{k: r[k] for k in KEYS} for r in full.rows]
    row = shared.rows[0]
    assert len(row["spans"]["all_to_all"]) == 2 * 2 * 2  # 2 MoE blocks x 2 micro-batches x dispatch, combine
    assert shared.exposed_s < shared.comm_s  # the other micro-batch hid (here all of) the all-to-alls
    # the serving model's two-micro-batch step (tbo.timeline) is the devices' within 1% (the devices
    # also embed each half apart and concatenate the halves' last rows: two kernels more); its old
    # max(compute, all-to-all) of one whole batch ignored that each half reads every weight
    model = serving._phase("moe-debug", serving.Layout(4, 1, 4), System("h100", 4), "bf16", (3, 4), 1, 25,
                           "fake", "balanced")
    assert shared.seconds == pytest.approx(model.seconds, rel=0.01)


@pytest.mark.parametrize("batch", [7, 1])
def test_decode_on_devices_equals_the_serving_model_without_overlap(cluster, batch):
    """Batch 7: 14 rows per device, a message to every peer. Batch 1: 2 rows (top_k), so each device
    messages one peer, and the model charges that one message (on main it charged all 3 peers)."""
    devices = on_devices.run(cluster, Step("moe-debug", 4, 4, batch, 1, 25), shared_run=False)
    model = serving.phase("moe-debug", serving.Layout(4, 1, 4), System("h100", 4), "bf16", batch, 1, 25,
                          overlap=False)
    assert devices.compute_s == pytest.approx(model.compute_s, rel=1e-9)
    assert devices.flops == model.flops
    assert devices.comm_s == pytest.approx(model.a2a_s, rel=0.01 if batch > 1 else 1e-9)  # executor, closed form
    assert devices.exposed_s == devices.comm_s  # nothing overlaps: the step is their sum
    assert devices.seconds == pytest.approx(model.seconds, rel=0.001)


def test_a_captured_decode_on_devices_equals_the_serving_models(cluster):
    """Decode as a captured graph (kernels/graphs.py) on the devices: every kernel charged the
    graph's gap through the job's launch_us, as the serving model charges it; less than eager."""
    devices = on_devices.run(cluster, Step("moe-debug", 4, 4, 1, 1, 25, graphs=True), shared_run=False)
    graph, eager = (serving.phase("moe-debug", serving.Layout(4, 1, 4), System("h100", 4), "bf16", 1, 1, 25,
                                  overlap=False, graphs=g) for g in (True, False))
    assert devices.compute_s == pytest.approx(graph.compute_s, rel=1e-9)
    assert devices.flops == graph.flops
    assert devices.seconds == pytest.approx(graph.seconds, rel=0.001)
    assert graph.compute_s < eager.compute_s
