"""torchtitan's own ablation of its Llama 3.1 8B step on its H100s, against Relay's plan model: the
same layout run eager, with torch.compile and with torch.compile + Float8, published tokens/s per
GPU beside Relay's emulated figure, and what each step from one to the next saves in each. Where a
saving Relay predicts differs from the published one, the component the step changes is where
Relay's per-op costs are off: compile removes eager's memory-bound kernels (norms, SwiGLU,
rotary, residual adds) and Float8 halves the Linear GEMMs' time, so a Float8 saving below the
published one points at BF16 GEMMs slower on the run's H100 (500 W) than Relay charges them.

Source: https://github.com/pytorch/torchtitan/blob/b5bcd76c6/benchmarks/llama3_h100_202412_torchtitan.md
(Tables 1 and 3: FSDP, local batch 2, global batch 16 / 256, selective op AC, sequence 8192 from
train_configs/llama3_8b.toml; Grand Teton H100, the catalog's h100-hbm2e; PyTorch SDPA attention).
Every Relay figure is emulated (analytic plan model); published figures are tokens/s per GPU.

    .venv/bin/python bench/titan_ablation.py
"""

from __future__ import annotations

from relay import System
from relay.analytic import planner
from relay.parallel import Parallel

SEQ = 8192
# (table, devices, global batch, published tokens/s/GPU: eager, + torch.compile, + torch.compile + Float8)
TABLES = [("Table 1", 8, 16, (5762, 6667, 8532)), ("Table 3", 128, 256, (5605, 6514, 8380))]
STEPS = (("eager", "eager", "bf16"), ("+ torch.compile", "fused", "bf16"), ("+ Float8", "fused", "fp8"))


def relay_step(devices: int, batch: int, fusion: str, dtype: str) -> float:
    """Relay's emulated step, s, for the table's layout (dp=devices, FSDP, selective op AC)."""
    system, plan = System("h100-hbm2e", devices, domain=8), Parallel(dp=devices, fsdp=True, ac="op")
    return planner.cost(system, "llama3-8b", plan, batch, dtype=dtype, seq_len=SEQ, fusion=fusion,
                        attention="sdpa").step_s


def main() -> None:
    for table, devices, batch, published in TABLES:
        tokens = batch * SEQ / devices  # per GPU per step
        print(f"# {table}: Llama 3.1 8B on {devices} x h100-hbm2e, FSDP, local batch 2, selective op AC")
        print(f"{'':18} {'published':>10} {'Relay':>10} {'Relay/pub':>10} {'pub step s':>11} {'Relay step s':>13}")
        steps = []
        for (name, fusion, dtype), pub in zip(STEPS, published):
            s = relay_step(devices, batch, fusion, dtype)
            steps.append((tokens / pub, s))
            print(f"{name:18} {pub:>10,} {tokens / s:>10,.0f} {tokens / s / pub:>10.3f} {tokens / pub:>11.3f} "
                  f"{s:>13.3f}")
        for (name, _, _), a, b in zip(STEPS[1:], steps, steps[1:]):
            print(f"# {name} saves {a[0] - b[0]:.3f} s a step published, {a[1] - b[1]:.3f} emulated "
                  f"(Relay / published {(a[1] - b[1]) / (a[0] - b[0]):.2f})")


if __name__ == "__main__":
    main()
