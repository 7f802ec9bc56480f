"""What a transformer block's forward keeps, beyond what autograd saves for it, for the memory
model and the plan search (analytic/footprint.py, analytic/activations.py): measured on the same
fake-tensor step as the block's other figures (measure.py's `measure_block`).

* Under torchtitan's selective op checkpointing (workloads/checkpoint.py), the ops whose outputs
  the policy keeps: their outputs' bytes (what the block holds besides its input) and their
  forward seconds (what the recompute in backward does not rerun).
* What autograd saves inside the block's norms (of its two norms, a 1 / tp share when the block is
  measured under sequence parallelism, analytic/sequence_parallel.py, as plans.py runs them).
"""

from __future__ import annotations

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from relay.workloads import checkpoint


class BlockOps(TorchDispatchMode):
    """Enter above the throttle (after it): sees each op first, times it by the throttle's charge."""

    def __init__(self, throttle, itemsize: int):
        super().__init__()
        self.throttle, self.itemsize = throttle, itemsize
        self.block = self.norm = False  # inside a block's forward; inside one of its norms
        self.mm_seen = 0  # the block's matrix multiplies so far (the op policy keeps the odd ones)
        self.saved_s = 0.0  # emulated forward seconds of the ops the op policy keeps
        self.saved_bytes = 0.0  # their outputs, at the emulated dtype

    def attach(self, model: nn.Module) -> None:
        """Hooks on each block (and each block's norms) that tell where the forward is."""
        for block in getattr(model, "blocks", []):
            block.register_forward_pre_hook(lambda *_: self._enter_block())
            block.register_forward_hook(lambda *_: setattr(self, "block", False))
            for m in block.modules():
                if isinstance(m, nn.RMSNorm | nn.LayerNorm):
                    m.register_forward_pre_hook(lambda *_: setattr(self, "norm", True))
                    m.register_forward_hook(lambda *_: setattr(self, "norm", False))

    def _enter_block(self) -> None:
        self.block, self.mm_seen = True, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.block:
            return func(*args, **(kwargs or {}))
        self.mm_seen += func == checkpoint.MM
        start = self.throttle.emulated_s
        out = func(*args, **(kwargs or {}))
        if checkpoint.saves(func, self.mm_seen):
            self.saved_s += self.throttle.emulated_s - start
            self.saved_bytes += sum(t.numel() * (self.itemsize if t.is_floating_point() else t.element_size())
                                    for t in tree_leaves(out) if hasattr(t, "numel"))
        return out
