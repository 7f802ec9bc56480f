"""Multi-token prediction in decode (analytic/mtp.py, `relay serve --mtp`): the verify step runs the
main model on 2 tokens a sequence (twice the FLOPs, the weights read once), the MTP module reads a
KV cache of its own, TPOT is the step over 1 + acceptance, fake equals real, bad input is refused
before anything runs, and only rows whose source states MTP run it."""

import pytest
import torch
from _device import one_thread  # noqa: F401  (tests/unit is on the path)

from relay import System
from relay.analytic import mtp, serving
from relay.launch import cli
from relay.workloads import get, inference, moe

H100x4 = System("h100", 4)
LAYOUT = serving.Layout(4, 1, 2)
C = moe.CONFIGS["moe-debug"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_verify_step_doubles_the_flops_and_reads_the_weights_once():
    one, two = (serving.phase("moe-debug", LAYOUT, H100x4, "bf16", 3, t, 20, overlap=False) for t in (1, 2))
    assert two.flops == 2 * one.flops  # every GEMM, the attention over the cache and the head on both tokens
    assert one.bytes < two.bytes < 1.5 * one.bytes  # the weights and the cache read once for both


def test_mtp_module_reads_a_kv_cache_of_its_own():
    """The decode step's HBM traffic grows with the context by the cache of n_layers + 1 layers
    (the main model's, read once by the verify step, and the MTP block's), once."""
    (short, _), (long, _) = (mtp.decode("moe-debug", LAYOUT, H100x4, "bf16", 3, n, False) for n in (20, 30))
    assert long.bytes - short.bytes == 10 * 3 * inference.cache_bytes_per_token(C) * (C.n_layers + 1)


def test_tpot_is_the_step_over_the_tokens_it_emits():
    plain = mtp.serve("moe-debug", H100x4, LAYOUT, 3, 12, 8, prefill_batch=1)
    assert plain.mtp is None and plain == serving.serve("moe-debug", H100x4, LAYOUT, 3, 12, 8, prefill_batch=1)
    none, most = (mtp.serve("moe-debug", H100x4, LAYOUT, 3, 12, 8, acceptance=a, prefill_batch=1) for a in (0.0, 0.7))
    assert none.decode == most.decode and none.decode.seconds > plain.decode.seconds  # the draft costs
    assert none.tpot_s == none.decode.seconds and most.tpot_s == pytest.approx(most.decode.seconds / 1.7)
    assert most.decode_tps == pytest.approx(3 * 1.7 / most.decode.seconds)
    assert most.prefill == plain.prefill and most.ttft_s == plain.ttft_s
    # memory: the MTP block (its experts ep ways) and the projection; the cache one layer and one slot more
    _, extra = mtp.decode("moe-debug", LAYOUT, H100x4, "bf16", 3, 16)
    block = serving.step("moe-debug", LAYOUT, "h100", "bf16", 3, 1, 16)["moe"][0].params
    assert extra == block + 2 * C.dim * C.dim + 2 * C.dim
    assert most.memory["weights"] == plain.memory["weights"] + 2 * extra
    assert most.memory["kv_cache"] == 3 * (12 + 8 + 1) * inference.cache_bytes_per_token(C) * (C.n_layers + 1)


def test_fake_equals_real():
    real, fake = (mtp.decode("moe-debug", LAYOUT, H100x4, "bf16", 3, 16, tensors=t) for t in ("real", "fake"))
    assert real == fake


@pytest.mark.parametrize("argv,match", [
    (["--workload", "moe-debug", "--mtp", "1.5"], "fraction in"),
    (["--workload", "llama-debug", "--mtp", "0.7"], "multi-token prediction module"),
    (["--workload", "moe-debug", "--mtp", "0.7", "--breakeven", "nvl72"], "drop --breakeven or drop --mtp"),
])
def test_cli_refuses_bad_mtp_before_running(argv, match, capsys):
    assert cli.main(["serve", "--chip", "h100", "--devices", "4"] + argv) == 2
    assert match in capsys.readouterr().err


def test_cli_prints_the_mtp_step(capsys):
    assert cli.main(["serve", "--chip", "h100", "--devices", "4", "--workload", "moe-debug", "--input-len", "12",
                     "--output-len", "8", "--batch", "3", "--parallel", "dp=4,tp=1,ep=2", "--mtp", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "one MTP draft a step, accepted 0.7 of the time: TPOT = step / 1.7" in out
    s = mtp.serve("moe-debug", H100x4, LAYOUT, 3, 12, 8, acceptance=0.7)
    assert f"{s.tpot_s * 1e3:.2f}" in out and f"{s.decode_tps:,.0f}" in out


def test_only_rows_whose_source_states_mtp_run_it():
    from relay.launch import validate_serving
    rows = {r.id: r for r in validate_serving.load()}
    with_mtp = {i for i, r in rows.items() if r.mtp_acceptance is not None}
    assert with_mtp == {"cloudmatrix-infer-decode-tpot50", "cloudmatrix-infer-decode-tpot15"}
    for i in with_mtp:
        assert rows[i].mtp_acceptance == 0.7 and "2506.12708" in rows[i].mtp_source and "70%" in rows[i].mtp_source
    assert all("no MTP" in rows[i].note for i in ("sglang-h100x72-decode", "sglang-gb200-decode"))


@torch.no_grad()
def test_verify_step_samples_the_token_and_its_draft():
    """After a prompt, a token and its draft go in together only when both are sampled (verified)."""
    torch.manual_seed(0)
    model = get("moe-debug").build_model().eval()
    cache = inference.new_cache(model, 2, 16)
    inference.forward(model, torch.zeros(2, 4, dtype=torch.long), cache)
    assert inference.forward(model, torch.zeros(2, 2, dtype=torch.long), cache, sample=2).shape == (2, 2, C.vocab_size)
    assert cache.length == 6
    with pytest.raises(ValueError, match="1 draft"):
        inference.forward(model, torch.zeros(2, 3, dtype=torch.long), cache, sample=2)
