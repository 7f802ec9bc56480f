"""Sequence parallelism in the plan model's measured blocks (emulator/analytic/sequence_parallel.py):
the norms and residual adds run on 1 / tp of the sequence, as plans.py, torchtitan and Megatron
run them, the attention and feed-forward on all of it. No Ray: fake-tensor blocks."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from relay import chips
from relay.analytic.footprint import measure
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


def test_without_tensor_parallel_sequence_parallel_changes_nothing():
    """The base (embedding, final norm, head, loss) is measured without blocks: the same under sp."""
    whole, shard = (measure("llama-debug", TP, 1, B, "h100", sp=sp).parts["base"] for sp in (False, True))
    assert whole == shard
