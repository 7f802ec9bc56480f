"""A parallelism plan (`relay.Parallel`): how many devices split the model which way, checked
as pure arithmetic before any device starts (as torchtitan's ParallelDims), and where each
device sits on the plan's one device mesh.

The mesh is (pp, dp / ep, ep, tp), outermost first, and device d is its row-major position: tensor
parallel is innermost, so a tensor-parallel group is tp consecutive devices and stays inside a
scale-up domain whenever tp divides the domain; expert parallel comes next (its all-to-all stays
in the domain when ep x tp fits it), then the other data-parallel replicas, and pipeline stages
outermost (their point-to-point messages are the cheapest to send across domains). Megatron-LM
orders its groups the same way (tp, ep, dp, pp from the inside out).

    Parallel(dp=2, tp=2, pp=2)               # 8 devices
    Parallel.parse("tp=8,dp=9,fsdp")         # the command line's --parallel
    Parallel.parse("pp=2,stages=2,tp=2,sp")  # interleaved 1F1B, sequence parallel
    Parallel.parse("dp=8,microbatches=4")    # gradient accumulation: 4 microbatches, one sync and step
    Parallel.parse("dp=8,fsdp,ac=op")        # torchtitan's selective (op) activation checkpointing

Activation checkpointing (`ac`, as torchtitan's [activation_checkpoint] modes): "full" (the bare
word `recompute`: every block reruns its forward in backward), "op" (selective, op level: each
block keeps the outputs of every other matrix multiply, attention and reduce-scatter, reruns the
rest) and "layer:N" (selective, layer level: every Nth block fully recomputed, the others keep
everything).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from relay.errors import ConfigError

DIMS = ("pp", "dp_outer", "ep", "tp")  # the mesh's dimensions, outermost first
AC_MODES = ("full", "op", "layer:N")  # the spellings of `ac`


@dataclass(frozen=True, kw_only=True)
class Parallel:
    """How a training run splits its model and batch over the devices (dp x tp x pp devices)."""

    dp: int = 1  # data-parallel replicas, each its share of the global batch
    tp: int = 1  # tensor parallel: attention heads and feed-forward columns split this many ways
    pp: int = 1  # pipeline stages (blocks split evenly, 1F1B schedule)
    ep: int = 1  # expert parallel: each group of ep data-parallel replicas splits the experts (divides dp)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over dp (FSDP2) instead of DDP
    microbatches: int | None = None  # microbatches per replica and step (default: pp); pp = 1: gradient accumulation
    recompute: bool = False  # recompute each block's activations in backward (full checkpointing: ac="full")
    stages: int | None = None  # model chunks per pipeline rank (virtual stages; > 1: interleaved 1F1B)
    sp: bool = False  # sequence parallel: norms and residual stream split along the sequence over tp
    ac: str | None = None  # activation checkpointing: "full" (= recompute), "op" or "layer:N" (see AC_MODES)
    dist_opt: bool = False  # distributed optimizer (ZeRO-1): optimizer state sharded over dp (analytic only)

    BARE = ("fsdp", "recompute", "sp", "dist_opt")  # the bare words of the command-line form

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "ep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"parallel: {name} = {v!r} is invalid; give an integer >= 1")
        for name in self.BARE:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"parallel: {name} = {getattr(self, name)!r} is invalid; give True or False")
        m = self.microbatches
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"parallel: microbatches = {m!r} is invalid; give an integer >= 1")
        _check_ac(self)
        if self.dist_opt and self.fsdp:
            raise ConfigError("parallel: dist_opt shards the optimizer state over dp, and fsdp already shards it "
                              "(with the parameters and gradients); drop one of them")
        v = self.stages
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"parallel: stages = {v!r} is invalid; give model chunks per pipeline rank >= 1")
        if v is not None and v > 1 and self.pp == 1:
            raise ConfigError(f"parallel: stages = {v} interleaves a pipeline's chunks and pp = 1; set pp > 1 "
                              "or drop stages")
        if self.sp and self.tp == 1:
            raise ConfigError("parallel: sp splits the sequence over the tensor-parallel group, and tp = 1; "
                              "set tp > 1 or drop sp")
        if self.interleaved:
            # torch's ScheduleInterleaved1F1B runs rounds of pp microbatches: max(1, microbatches // pp) of
            # them, and refuses microbatches that are not a whole number of rounds
            rounds = max(1, self.n_microbatches // self.pp)
            if self.n_microbatches % rounds:
                raise ConfigError(f"parallel: microbatches = {self.n_microbatches} with pp = {self.pp} and "
                                  f"stages = {v}: interleaved 1F1B needs a multiple of its {rounds} rounds; "
                                  f"choose microbatches = {rounds * self.pp} (a multiple of pp) or fewer than "
                                  f"{2 * self.pp}")

    @property
    def ac_mode(self) -> str:
        """"none", "full", "op" or "layer"."""
        return "none" if self.ac is None else self.ac.partition(":")[0]

    @property
    def ac_every(self) -> int:
        """Under ac=layer:N, N: blocks N, 2N, ... of a device (counted from 1) are recomputed."""
        return _layer_every(self.ac) if self.ac_mode == "layer" else 1

    @classmethod
    def parse(cls, text) -> Parallel:
        """'dp=4,tp=2,pp=2,ep=2,microbatches=8,stages=2,ac=op' with bare words (BARE): 'fsdp', 'sp', ..."""
        if isinstance(text, Parallel):
            return text
        if isinstance(text, dict):
            return cls(**text)
        known = {f.name for f in fields(cls)}
        values = {}
        for part in str(text).split(","):
            key, eq, value = (s.strip() for s in part.partition("="))
            if not key:
                continue
            if key not in known:
                raise ConfigError(f"parallel: {key!r} in {text!r} is unknown; use dp=, tp=, pp=, ep=, "
                                  "microbatches=, stages=, ac= (full, op, layer:N) and the bare words fsdp, "
                                  "recompute, sp, dist_opt (e.g. tp=8,dp=9,fsdp)")
            if key in cls.BARE:
                if eq and value.lower() not in ("true", "1", "false", "0"):
                    raise ConfigError(f"parallel: {key}={value!r} is invalid; write the bare word {key}")
                values[key] = not eq or value.lower() in ("true", "1")
                continue
            values[key] = value if key == "ac" else _integer(key, value, text)
        return cls(**values)

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("dp", "tp", "pp", "ep") if getattr(self, k) > 1]
        parts += [f"microbatches={self.microbatches}"] if self.microbatches else []
        parts += [f"stages={self.stages}"] if self.stages else []
        parts += [f"ac={self.ac}"] if self.ac not in (None, "full") else []
        parts += [k for k in self.BARE if getattr(self, k)]
        return ",".join(parts) or "dp=1"

    def fill(self, devices: int) -> Parallel:
        """The plan with dp = devices / (tp x pp): a sweep's point of `devices` devices."""
        if devices % (self.tp * self.pp):
            raise ConfigError(f"parallel: tp ({self.tp}) x pp ({self.pp}) does not divide devices ({devices}); "
                              "sweep device counts that are multiples of it")
        return replace(self, dp=devices // (self.tp * self.pp))

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The mesh's shape, (pp, dp / ep, ep, tp) (see DIMS)."""
        return (self.pp, self.dp // self.ep, self.ep, self.tp)

    @property
    def dp_outer(self) -> int:
        """Replicas that hold the same experts (dp / ep; dp without expert parallelism)."""
        return self.dp // self.ep

    @property
    def shards_experts(self) -> bool:
        """Whether FSDP2 shards experts over the replicas that hold them (device/training/plans.py)."""
        return self.fsdp and self.ep > 1 and self.dp_outer > 1

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.pp

    @property
    def n_stages(self) -> int:
        """Model chunks per pipeline rank (1: plain 1F1B)."""
        return self.stages or 1

    @property
    def interleaved(self) -> bool:
        return self.n_stages > 1

    def coords(self, device: int) -> dict:
        """Device `device`'s place on the mesh, one index per dimension, and its replica index
        (its share of the global batch: dp_outer x ep + ep)."""
        out, rest = {}, device
        for name, size in reversed(list(zip(DIMS, self.shape))):
            out[name], rest = rest % size, rest // size
        out["dp"] = out["dp_outer"] * self.ep + out["ep"]
        return out

    def group(self, dim: str, device: int) -> list[int]:
        """The devices that share every coordinate of `device` but `dim` ("tp", "ep", "pp",
        "dp_outer", or "dp": dp_outer and ep together), in group-rank order."""
        varying = ("dp_outer", "ep") if dim == "dp" else (dim,)
        me = self.coords(device)
        return [d for d in range(self.devices)
                if all(self.coords(d)[k] == me[k] for k in DIMS if k not in varying)]

    def check(self, devices: int, domain: int, model_config=None, replica_batch: int | None = None) -> None:
        """Refuses a plan that does not fit the system, the model or the batch, saying why."""
        if self.devices != devices:
            raise ConfigError(f"parallel: dp ({self.dp}) x tp ({self.tp}) x pp ({self.pp}) = {self.devices} "
                              f"!= devices ({devices}); choose degrees whose product is the device count")
        if domain % self.tp:
            raise ConfigError(f"parallel: tp = {self.tp} does not divide the scale-up domain ({domain} devices); "
                              "tensor parallelism stays inside a domain: choose tp dividing it")
        if self.dp % self.ep:
            raise ConfigError(f"parallel: ep = {self.ep} does not divide dp = {self.dp}; expert parallelism "
                              "splits the experts over groups of ep data-parallel replicas: choose ep dividing dp")
        if self.fsdp and self.dp == 1:
            raise ConfigError("parallel: fsdp shards over the data-parallel replicas, and dp = 1; set dp > 1 "
                              "or drop fsdp")
        m = self.n_microbatches
        if replica_batch is not None and replica_batch % m:
            raise ConfigError(f"parallel: microbatches = {m} does not divide the batch of a replica "
                              f"({replica_batch} samples); choose a batch or microbatches that divide")
        if (self.tp, self.pp, self.ep) == (1, 1, 1):
            return  # data parallel (DDP or FSDP2) takes any model
        c = model_config
        if c is None or not hasattr(c, "n_heads"):
            raise ConfigError("parallel: tp, pp and ep split a transformer of this project (llama-debug, "
                              "moe-debug, ...); this workload has no such configuration: use dp and fsdp only")
        if self.pp > c.n_layers:
            raise ConfigError(f"parallel: pp = {self.pp} > n_layers = {c.n_layers}; give each stage a block")
        if self.interleaved and c.n_layers % (self.pp * self.n_stages):
            raise ConfigError(f"parallel: stages = {self.stages} with pp = {self.pp}: pp x stages = "
                              f"{self.pp * self.n_stages} chunks do not divide n_layers = {c.n_layers}; choose "
                              "stages (and pp) so that every chunk holds as many blocks")
        if self.sp and c.seq_len % self.tp:
            raise ConfigError(f"parallel: sp with tp = {self.tp} does not divide seq_len = {c.seq_len}; choose tp "
                              "dividing the sequence or drop sp")
        widths = {"n_heads": c.n_heads, "ffn_dim": c.ffn_dim}
        if getattr(c, "attention", "gqa") == "gqa":
            widths["n_kv_heads"] = c.n_kv_heads
        for name, v in widths.items():
            if v % self.tp:
                raise ConfigError(f"parallel: tp = {self.tp} does not divide {name} = {v}; choose tp dividing it")
        if self.ep > 1 and not hasattr(c, "n_experts"):
            raise ConfigError(f"parallel: ep = {self.ep} needs a mixture of experts (moe-debug, ...); set ep = 1")
        if self.ep > 1 and c.n_experts % self.ep:
            raise ConfigError(f"parallel: ep = {self.ep} does not divide n_experts = {c.n_experts}")


def _integer(key: str, value: str, text: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"parallel: {key} = {value!r} in {text!r} is not an integer; write e.g. {key}=2") from None


def _layer_every(ac: str) -> int | None:
    """N of "layer:N" (N >= 1), else None."""
    mode, _, n = ac.partition(":")
    return int(n) if mode == "layer" and n.isdigit() and int(n) >= 1 else None


def _check_ac(plan: Parallel) -> None:
    """`ac` spelled as AC_MODES; `recompute` and ac="full" are one setting (each implies the other)."""
    ac = plan.ac
    if ac is not None and (not isinstance(ac, str) or not (ac in ("full", "op") or _layer_every(ac))):
        raise ConfigError(f"parallel: ac = {ac!r} is invalid; give full, op or layer:N (every Nth block "
                          "recomputed, N >= 1), e.g. ac=layer:2")
    if plan.recompute and ac not in (None, "full"):
        raise ConfigError(f"parallel: recompute (full activation checkpointing) and ac = {ac} are two modes; "
                          "give one of them")
    object.__setattr__(plan, "recompute", plan.recompute or ac == "full")
    object.__setattr__(plan, "ac", "full" if plan.recompute else ac)
