"""Training figures: per-step rows from every device's rows, the summary of a run, and the
derived figures (throughput, MFU, energy) that measured and predicted points share."""

from __future__ import annotations

import csv

STEP_COLUMNS = ["step", "loss", "step_s", "compute_s", "comm_s", "exposed_comm_s", "other_s", "pipeline_wait_s",
                "samples_per_s", "tokens_per_s", "mfu", "energy_j", "wall_s", "fidelity"]
SUMMED = ("step_s", "compute_s", "comm_s", "exposed_comm_s", "other_s", "samples_per_s", "tokens_per_s",
          "mfu", "energy_j", "wall_s")


def figures(system, samples: int, tokens_per_sample: int | None, dtype: str, step_s: float,
            compute_s: float, exposed_comm_s: float, flops_per_device: float) -> dict:
    """What follows from a step's time: the rest of the step, throughput, MFU and energy (all
    emulated). `samples` is the global batch as charged. MFU is of the BF16 peak at any precision
    (fp8 included), as torchtitan reports it."""
    power = system.total_power_w
    return {"other_s": max(0.0, step_s - compute_s - exposed_comm_s),
            "samples_per_s": samples / step_s,
            "tokens_per_s": samples * tokens_per_sample / step_s if tokens_per_sample else None,
            "mfu": flops_per_device * system.devices / (step_s * system.peak("bf16")),
            "energy_j": power * step_s if power else None}


def aggregate(per_device: list[dict], system, config, dtype: str, steps: int | None = None) -> list[dict]:
    """Global per-step rows from every device's rows. A step ends when its last device ends.
    After a failure some devices may lack their last rows: a step then uses the rows it has."""
    samples = config.global_samples(system.devices)
    rows_of = [d["rows"] for d in per_device]
    prev = max(r[0]["start_s"] for r in rows_of if r)
    fidelity = min(d.get("fidelity", 1.0) for d in per_device)
    out = []
    for k in range(config.steps if steps is None else steps):
        rows = [r[k] for r in rows_of if len(r) > k]
        end = max(r["end_s"] for r in rows)
        step_s, prev = end - prev, end
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        compute, exposed, flops = mean("compute_s"), mean("exposed_comm_s"), mean("flops")
        out.append({"step": k, "loss": rows[0]["loss"], "step_s": step_s, "compute_s": compute,
                    "comm_s": mean("comm_s"), "exposed_comm_s": exposed, "flops": flops,
                    **figures(system, samples, config.workload.tokens_per_sample, dtype, step_s, compute,
                              exposed, flops),
                    "wall_s": max(r["wall_s"] for r in rows), "fidelity": fidelity,
                    # waiting on a pipeline neighbour (device/training/parallel.py), part of other_s
                    "pipeline_wait_s": mean("pipeline_wait_s") if "pipeline_wait_s" in rows[0] else 0.0})
    return out


class TrainResult:
    """Per-step metrics (emulated unless the name says wall), rank 0's final weights, a summary."""

    def __init__(self, steps: list[dict], state_dict: dict, config: dict, per_device: list[list[dict]]):
        self.steps = steps
        self.state_dict = state_dict
        self.config = config  # the run's config.json record: TrainConfig's fields and the run's
        self.per_device = per_device  # each device's raw rows

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def summary(self, skip: int | None = None) -> dict:
        """Means over the steps after the first `skip` (default: the config's warmup), plus the
        final loss."""
        skip = self.config.get("warmup", 1) if skip is None else skip
        rows = self.steps[skip:] or self.steps

        def mean(k):
            return sum(r[k] for r in rows) / len(rows) if all(r.get(k) is not None for r in rows) else None
        out = {k: mean(k) for k in SUMMED + ("flops", "pipeline_wait_s")}
        out["final_loss"] = self.steps[-1]["loss"]
        out["fidelity"] = min(r["fidelity"] for r in self.steps)
        out["energy_per_sample_j"] = out["energy_j"] / self.config["global_batch"] if out["energy_j"] else None
        tps = self.config.get("tokens_per_sample")
        out["energy_per_token_j"] = out["energy_per_sample_j"] / tps if tps and out["energy_per_sample_j"] else None
        return out

    def to_csv(self, path) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=STEP_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.steps)
