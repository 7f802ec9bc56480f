"""Multi-token prediction in decode, as DeepSeek-V3/R1 is served with its own MTP module as the
drafter (speculative decoding with one draft token a step).

Sources:
- DeepSeek-V3 technical report (arXiv 2412.19437), section 2.2: one MTP module (depth D = 1) shares
  the main model's embedding and output head; it RMS-normalises the main model's last hidden state
  and the next token's embedding, concatenates them and projects 2d -> d (the matrix M), runs one
  Transformer block (DeepSeek-V3's: MLA and a MoE layer, as the main model's), and the shared head.
  Section 5.4.3: used for speculative decoding, the second token is accepted 85-90% of the time
  across generation topics, for 1.8x the tokens per second.
- CloudMatrix-Infer (arXiv 2506.12708, v3), its experimental setup: MTP with one speculative token
  at a 70% effective acceptance rate; its MTP ablation: 1.7 tokens a step at 70%, a block's time
  874 -> 1,260 us. (Read in a stored reading of v3, a public note that redraws the paper's tables;
  the paper's own text was not in the stored sources.)
- SGLang's large-scale EP blog (lmsys.org/blog/2025-05-05-large-scale-ep, decode table): its
  22,282 output tokens/s a node ran without MTP; "simulated MTP" there slows the attention and
  drafts nothing. Its GB200 part I blog: "other bars do not enable MTP".

A decode step with one draft (`decode`): the main model runs on 2 tokens a sequence (the token
sampled at the step before and the draft after it) against the KV cache, both positions reaching
the head (the draft is verified), measured as serving.phase measures any step (two micro-batches
where faster); then the MTP module on one token a sequence: its projection (`_projection`), one
MoE block with its own KV cache at the same context and its dispatch and combine, and the shared
head (the step's "base" part: embedding, norm and head on one token). It emits 1 + acceptance
tokens a sequence on average, so TPOT = step / (1 + acceptance) and output tokens/s per device =
batch x (1 + acceptance) / (tp x step). Memory: the MTP block's parameters (its experts split ep
ways, as the main model's) and the projection; the KV cache holds one more layer (the MTP
block's) and one more slot a sequence (the draft). Left out: the prefill's MTP pass, which fills
the MTP block's cache for the prompt (the rows held against MTP are decode rows). Units: seconds
inside, bytes.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from relay.analytic import serving
from relay.errors import ConfigError
from relay.hardware import chips
from relay.kernels import graphs as captured
from relay.kernels.clock import VirtualLane
from relay.kernels.throttle import Throttle
from relay.workloads import inference


def check(workload: str, acceptance: float | None) -> None:
    """Refuses an acceptance rate outside [0, 1] or a model without DeepSeek-V3's MTP module."""
    if acceptance is None:
        return
    if not 0 <= acceptance <= 1:
        raise ConfigError(f"--mtp = {acceptance}: the draft token's acceptance rate is a fraction in [0, 1]; "
                          "e.g. --mtp 0.7 (CloudMatrix-Infer's, arXiv 2506.12708)")
    c = serving.config_of(workload, 1)
    if not hasattr(c, "n_experts") or c.attention != "mla":
        raise ConfigError(f"--mtp with --workload {workload}: only DeepSeek-V3's architecture (deepseek-v3, "
                          "moe-debug) has a multi-token prediction module; drop --mtp")


class Projection(nn.Module):
    """The MTP module's input: RMSNorm of the main model's hidden state and of the draft position's
    embedding, concatenated and projected 2d -> d (DeepSeek-V3's M)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.hnorm, self.enorm = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, h, e):
        return self.proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))


@functools.cache
def _projection(workload: str, chip: str, dtype: str, batch: int, tensors: str, launch_us: float | None):
    """The projection's Cost on the emulated chip for `batch` sequences (one token each)."""
    c = serving.config_of(workload, 1)
    if tensors == "real":
        torch.manual_seed(0)
        module, mode = Projection(c.dim, c.norm_eps), None
    else:
        with torch.device("meta"):
            module = Projection(c.dim, c.norm_eps)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            module = module.to_empty(device="cpu")
    with mode or contextlib.nullcontext(), torch.no_grad():
        h, e = torch.zeros(batch, 1, c.dim), torch.zeros(batch, 1, c.dim)  # made before the step, as its inputs
        throttle = Throttle(serving.ServingCost(chips.get(chip), dtype, launch_us=launch_us), VirtualLane())
        with throttle:
            module(h, e)
    params = sum(p.numel() for p in module.parameters())
    return serving.Cost(throttle.emulated_s, throttle.flops, throttle.bytes, params, 0.0)


def decode(workload: str, layout, system, dtype: str, batch: int, context: int, overlap: bool = True,
           tensors: str = "fake", routing: str = "balanced", graphs: bool = True) -> tuple:
    """One decode step with one draft a sequence: (its Phase, the MTP module's parameters on a device)."""
    main = serving.phase(workload, layout, system, dtype, batch, 2, context, overlap, tensors, routing, graphs)
    parts = serving.step(workload, layout, system.chip.name, dtype, batch, 1, context, tensors, graphs)
    comm = serving.communication(workload, layout, system, dtype, batch, 1, routing)
    proj = _projection(workload, system.chip.name, dtype, batch, tensors, captured.launch_us(graphs))
    costs = [parts["base"][0], parts["moe"][0], proj]  # shared head (and embedding), the block, the projection
    compute = sum(x.seconds for x in costs)
    phase = replace(main, seconds=main.seconds + compute + comm["moe"] + comm["a2a"],
                    compute_s=main.compute_s + compute, tp_s=main.tp_s + comm["moe"], a2a_s=main.a2a_s + comm["a2a"],
                    flops=main.flops + sum(x.flops for x in costs), bytes=main.bytes + sum(x.bytes for x in costs),
                    largest=max([main.largest] + [x.largest for x in costs]))
    return phase, parts["moe"][0].params + proj.params


def serve(workload: str, system, layout, batch: int, input_len: int, output_len: int, dtype: str = "bf16",
          acceptance: float | None = None, **kw) -> serving.Serving:
    """serving.serve's figures, with one MTP draft a decode step accepted `acceptance` of the time
    (None: no MTP, serving.serve's own)."""
    check(workload, acceptance)  # before anything is measured
    s = serving.serve(workload, system, layout, batch, input_len, output_len, dtype, **kw)
    if acceptance is None:
        return s
    c = serving.config_of(workload, input_len + output_len)
    overlap = kw.get("overlap")
    dec, extra = decode(workload, layout, system, dtype, batch, input_len + output_len // 2,
                        hasattr(c, "n_experts") if overlap is None else overlap, kw.get("tensors", "fake"),
                        kw.get("routing", "balanced"), kw.get("graphs", True))
    per_token = inference.cache_bytes_per_token(c) * (c.n_layers + 1)  # MLA: whole on every tp rank
    kv = max(batch * (input_len + output_len + 1), s.prefill_batch * input_len) * per_token
    memory = dict(s.memory, weights=s.memory["weights"] + extra * serving.PRECISIONS[dtype], kv_cache=kv,
                  activations=2 * max(s.prefill.largest, dec.largest))
    memory["total"] = memory["weights"] + memory["kv_cache"] + memory["activations"]
    tokens = 1 + acceptance  # emitted a sequence a step, on average
    return replace(s, decode=dec, tpot_s=dec.seconds / tokens, decode_tps=batch * tokens / (layout.tp * dec.seconds),
                   memory=memory, mtp=acceptance)

