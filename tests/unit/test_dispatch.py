"""The expert dispatch and combine costed by the peers a dispatch reaches (analytic/dispatch.py),
and two micro-batches chosen only where they are faster than one (analytic/serving.phase)."""

import pytest
from _device import one_thread  # noqa: F401  (tests/unit is on the path)

from relay import System
from relay.analytic import dispatch, serving, tbo
from relay.collectives import predict, simulate
from relay.errors import ConfigError
from relay.workloads import moe
from relay.workloads.inference import balanced_splits

pytestmark = pytest.mark.usefixtures("one_thread")

C = moe.CONFIGS["deepseek-v3"]


def executor(rows: int, row_bytes: int, system) -> float:
    """The local executor's all-to-all (the devices' timing code) of each rank's balanced rows:
    its messages are the non-empty splits only."""
    p = system.devices
    splits = [[n * row_bytes // 2 for n in balanced_splits(rows, p, r)[0]] for r in range(p)]
    return simulate("all_to_all", "auto", rows * row_bytes, system, dtype="bfloat16", splits=splits)


@pytest.mark.parametrize("rows", [2, 8, 31, 32, 45])
def test_the_serving_all_to_all_is_the_executors_of_the_rows_sent(rows):
    """DeepSeek-V3's dispatch + combine on 32 devices of one domain, one sequence per device (rows =
    top_k = 8, then more): the serving model's closed form equals the executor's all-to-all of the
    balanced splits, which sends a message only to a peer with rows. On main the model charged all
    31 peers: 2.1x the executor's at 8 rows (46.03 against 21.76 us)."""
    system = System("ascend-910c", 32)
    batch, row = rows / C.top_k, C.dim * 2
    want = 2 * executor(rows, row, system)
    if batch == int(batch):
        got = serving.communication("deepseek-v3", serving.Layout(32, 1, 32), system, "bf16", int(batch), 1)["a2a"]
        assert got == pytest.approx(want, rel=1e-9)
    # (past 32 rows the splits are uneven, and the dense closed form charges n/p a message)
    assert 2 * dispatch.seconds(rows, row, system) == pytest.approx(want, rel=1e-9 if rows <= 32 else 5e-3)
    if rows < 32:
        assert dispatch.seconds(rows, row, system) < predict("all_to_all", "auto", rows * row, system)


def test_peers_reached_balanced_exact_uniform_expected():
    assert [dispatch.peers(r, 384) for r in (0, 1, 8, 383, 384, 512)] == [0, 0, 7, 382, 383, 383]
    # uniform routing: the expected distinct other ranks among r draws, 383 (1 - (383/384)^r)
    assert dispatch.peers(8, 384, "uniform") == pytest.approx(383 * (1 - (383 / 384) ** 8), rel=1e-12)
    assert dispatch.peers(512, 384, "uniform") == pytest.approx(282.0, abs=0.5)  # 383 (1 - e^-1.333...)
    assert dispatch.seconds(1, 100, System("h100", 8)) == 0.0  # a row kept home: no message, no launch
    with pytest.raises(ConfigError, match="routing = 'zipf'"):
        dispatch.peers(8, 8, "zipf")


def test_two_micro_batches_re_read_the_weights_and_are_chosen_only_where_faster():
    """DeepSeek-V3 on 384 910C: at decode two micro-batches each read every weight (the step's HBM
    traffic nearly doubles), so at batch 64 one batch is faster and is chosen, where main's overlap
    hid the whole all-to-all for free (45.84 ms); the two-micro-batch step is timed as the devices
    run it (86.21 ms; a shared run on the 384 devices gave 86.95); a 4-prompt prefill, where the
    all-to-all is long against compute that splits evenly, runs two."""
    system = System.preset("cloudmatrix384")
    layout = serving.Layout(384, 1, 384)
    args = ("deepseek-v3", layout, system, "bf16")
    one = serving.phase(*args, 64, 1, 4608, overlap=False)
    two = serving._phase(*args, (32, 32), 1, 4608, "fake", "balanced")
    assert (one.micro, two.micro) == (1, 2)
    assert two.bytes > 1.8 * one.bytes - 1.8 * 64 * 4608 * 576 * 2 * C.n_layers  # weights twice, cache once
    assert serving.phase(*args, 64, 1, 4608) == one  # no overlap: 72.37 < 86.21 ms
    assert one.seconds == pytest.approx(one.compute_s + one.a2a_s)
    # the overlap hides only part of the all-to-alls: between the free max(compute, a2a) and the sum
    assert max(two.compute_s, two.a2a_s) < two.seconds < two.compute_s + two.a2a_s
    pre_one = serving.phase(*args, 4, 4096, 4096, overlap=False)
    pre = serving.phase(*args, 4, 4096, 4096)
    assert pre.micro == 2 and pre.seconds < pre_one.seconds


def test_the_overlap_timeline_hides_one_halfs_all_to_all_behind_the_others_compute():
    """Hand-timed: one MoE block, halves of pre 3, experts 1, post 2, dispatch 2, combine 2.
    Compute: pre0 [0,3], pre1 [3,6], experts0 [6,7], experts1 [8,9] (its dispatch lands at 8),
    post0 and post1 after their combines. All-to-alls in issue order: d0 [3,5], d1 [6,8], c0
    [8,10] (experts0 ended at 7, the port was busy to 8), c1 [10,12]. post0 [10,12], post1
    [12,14], then base 1: 15."""
    h = tbo.Half(dense=0.0, pre=3.0, experts=1.0, post=2.0, dispatch=2.0, combine=2.0)
    assert tbo.timeline((h, h), 0, 1, 1.0) == 15.0
    # with no all-to-all it is the compute alone; with one dense block first, its two halves
    free = tbo.Half(dense=5.0, pre=3.0, experts=1.0, post=2.0, dispatch=0.0, combine=0.0)
    assert tbo.timeline((free, free), 1, 1, 0.0) == 2 * (5 + 3 + 1 + 2)


def test_cli_routing_reaches_the_model_and_is_named(capsys):
    """`relay serve --routing uniform` costs the all-to-all by the expected peers of random experts,
    and says which routing its figures are for."""
    from relay.launch import cli
    argv = ["serve", "--chip", "h100", "--devices", "8", "--workload", "moe-debug", "--input-len", "16",
            "--output-len", "8", "--batch", "1", "--parallel", "dp=8,tp=1,ep=8", "--no-overlap"]
    a2a = {}
    for routing in ("balanced", "uniform"):
        assert cli.main(argv + ["--routing", routing]) == 0
        out = capsys.readouterr().out
        assert f"{routing} routing" in out.splitlines()[0]
        a2a[routing] = float(next(x for x in out.splitlines() if x.startswith("decode")).split()[8])
    model = {r: serving.serve("moe-debug", System("h100", 8), serving.Layout(8, 1, 8), 1, 16, 8, overlap=False,
                              routing=r).decode.a2a_s * 1e3 for r in ("balanced", "uniform")}
    assert a2a == {r: pytest.approx(model[r], abs=0.005) for r in model} and model["uniform"] != model["balanced"]
