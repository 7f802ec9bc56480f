"""Sequence parallelism in the plan model's measured blocks (emulator/analytic/sequence_parallel.py):
the norms and residual adds run on 1 / tp of the sequence, as plans.py, torchtitan and Megatron
run them, the attention and feed-forward on all of it. No Ray: fake-tensor blocks."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from relay import chips
from relay.analytic.footprint import measure
from relay.errors import ConfigError
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.workloads import llama

C = llama.CONFIGS["llama-debug"]
B, TP = 4, 2


def _residual_stream_seconds(tokens: int) -> float:
    """Emulated seconds of one block's forward outside its tensor-parallel regions on `tokens` rows:
    its two RMSNorms and two residual adds, bf16, each tensor at its own size (measure_block's)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        norm = nn.RMSNorm(C.dim, eps=C.norm_eps, dtype=torch.bfloat16)
        x = torch.empty(1, tokens, C.dim, dtype=torch.bfloat16)
        with Throttle(CostModel(chips.get("h100"), "bf16", real_sizes=True), VirtualLane()) as t:
            for _ in range(2):
                norm(x)
                _ = x + x
    return t.emulated_s


def test_the_norms_and_residual_adds_run_on_a_tp_share_of_the_sequence():
    """Forward: what sp saves is exactly (what the norms and residual adds cost on the whole
    sequence) - (on its 1 / tp), the attention and feed-forward unchanged; backward saves too. The
    norms save a 1 / tp share of their tensors, and nothing else a block saves changes (the
    column-wise layers' gathered inputs stay whole, as DTensor keeps them)."""
    whole, shard = (measure("llama-debug", TP, 1, B, "h100", sp=sp).parts["dense"] for sp in (False, True))
    tokens = B * C.seq_len
    saved = _residual_stream_seconds(tokens) - _residual_stream_seconds(tokens // TP)
    assert saved > 0
    assert whole.forward_s - shard.forward_s == pytest.approx(saved, rel=1e-9)
    assert shard.backward_s < whole.backward_s
    assert shard.norm_bytes == whole.norm_bytes / TP > 0
    assert shard.activations == whole.activations - whole.norm_bytes * (1 - 1 / TP)
    assert shard.params == whole.params and shard.optimizer_s == pytest.approx(whole.optimizer_s, rel=1e-9)


def test_the_base_is_measured_without_blocks_so_sp_leaves_it_unchanged():
    """The embedding, final norm, head and loss (the model without blocks) are the same under sp."""
    whole, shard = (measure("llama-debug", TP, 1, B, "h100", sp=sp).parts["base"] for sp in (False, True))
    assert whole == shard


def test_a_moe_block_under_sp_saves_what_its_dense_twin_saves():
    """footprint.measure costs a MoE block under tp as its tp = 1 measurement with the attention
    swapped (+ the split dense block - the whole one): under sp the swap carries the norms' and
    residual adds' share, the same seconds and bytes the dense block saves (the two norms and
    adds are alike in both kinds of block)."""
    whole, shard = (measure("moe-debug", TP, 1, B, "h100", sp=sp).parts for sp in (False, True))
    for f in ("forward_s", "backward_s", "activations"):
        saved = getattr(whole["dense"], f) - getattr(shard["dense"], f)
        assert saved > 0
        assert getattr(whole["moe"], f) - getattr(shard["moe"], f) == pytest.approx(saved, rel=1e-9), f


def test_a_sequence_tp_does_not_divide_is_refused_by_name():
    with pytest.raises(ConfigError, match="seq_len = 31 is not a multiple of tp = 2"):
        measure("llama-debug", TP, 1, B, "h100", seq_len=31, sp=True)
