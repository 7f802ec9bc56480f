"""The `relay` process group: what torch.distributed calls, turned into Relay schedules.

Each method checks its arguments on the program's thread, then queues one job on the device's
engine (engine.py) and returns its Work at once; the job runs on the engine's thread. Methods are
named as torch reaches them (see docs/design.md, "The `relay` torch.distributed backend", and torch's
multi_threaded_pg.py). A method torch has but Relay lacks raises rather than falling back to
another backend, so no traffic ever leaves the emulated fabric unseen.

`register()` makes the backend known to torch in a device process; `activate(engine)` says which
engine the groups created from then on use (program.py does both around a program). Reduce is
charged as an all-reduce (Relay has no reduce schedule); gather and scatter are direct (every rank
to or from the root at once, through the root's one port).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ReduceOp
from torch._subclasses.fake_tensor import FakeTensor

from relay.collectives.alltoall import layout, split_matrix
from relay.collectives.core import prepare
from relay.collectives.schedules import Recv, Send, Step, shards
from relay.device.backend.collective import choose

NAME = "relay"
_FAKE = (": on fake tensors a size read from a tensor is 0 unless Relay carries it (fake_values.py: balanced routing's "
         "counts); run on real tensors, or cost the model with balanced-routing plans (relay plan)")
_engine = None  # the running program's engine, in this device process


def _create(options, _backend_options=None):
    if _engine is None:
        raise RuntimeError("the relay backend runs only on Relay's devices: start the program with "
                           "cluster.launch(fn) or `relay launch script.py`")
    members = list(options.global_ranks_in_group) or list(range(options.group_size))
    return RelayProcessGroup(_engine, _engine.group(members))


def register() -> None:
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, _create, extended_api=True, devices=["cpu"])


def activate(engine) -> None:
    """The engine that groups created from now on in this process use (None: none)."""
    global _engine
    _engine = engine


_OPS = {ReduceOp.RedOpType.SUM: "sum", ReduceOp.RedOpType.AVG: "avg", ReduceOp.RedOpType.MAX: "max",
        ReduceOp.RedOpType.MIN: "min", ReduceOp.RedOpType.PRODUCT: "product",
        ReduceOp.RedOpType.PREMUL_SUM: "premul_sum"}


def _op(red, tensors) -> tuple[str, object]:
    """torch's reduce op `red` as (Relay's op, PREMUL_SUM's factor), checked against `tensors`."""
    kind = getattr(red, "op", red)
    if kind not in _OPS:
        raise ValueError(f"relay: reduce op {kind} is not supported; use SUM, AVG, MAX, MIN, PRODUCT "
                         "or PREMUL_SUM")
    if kind == ReduceOp.RedOpType.AVG and any(t.dtype == torch.bool for t in tensors):
        raise ValueError("relay: reduce op AVG of a bool tensor has no meaning (torch.mean refuses bool too); "
                         "use MAX for 'any' or MIN for 'all'")
    return _OPS[kind], (red.factor if kind == ReduceOp.RedOpType.PREMUL_SUM else None)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat CPU working copy (the transport sends host memory; inputs may be non-contiguous).
    A fake tensor's (shapes only) is a meta tensor of its size: the transport then sends headers
    alone, and no op touches the fake mode, which is the program thread's (it is not thread-safe)."""
    if isinstance(t, FakeTensor):
        return torch.empty(t.numel(), dtype=t.dtype, device="meta")
    return t.detach().reshape(-1).to("cpu", copy=True).contiguous()


def _reduced(eng, g, primitive: str, buf: torch.Tensor, ready: float, op: str, factor):
    """`primitive` (all_reduce or reduce_scatter) on `buf` with torch's reduce op: PREMUL_SUM
    scales first and AVG divides after, both running as a sum. Returns (emulated end, result)."""
    if op == "premul_sum":
        buf.mul_(factor)
    end = eng.collective(g, primitive, buf, buf.numel(), ready, op="sum" if op in ("avg", "premul_sum") else op)
    return end, (_divide(buf, g.size) if op == "avg" else buf)


def _divide(t: torch.Tensor, n: int) -> torch.Tensor:
    """An average's division (integers truncate, as gloo's do)."""
    return t / n if t.is_floating_point() else torch.div(t, n, rounding_mode="trunc")


def _into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if not src.is_meta:  # (a fake tensor's result: nothing to write)
        dst.detach().copy_(src.reshape(dst.shape))


class _Movement:
    """The data-moving operations of RelayProcessGroup (gathers, broadcast, all-to-all, gather,
    scatter); `self.engine` and `self.g` are the group's."""

    # ------------------------------------------------------------ gathers
    def _all_gather(self, pairs, outputs):
        """pairs: (input, write(flat result)) per gather."""
        eng, g = self.engine, self.g

        def run(ready):
            end = ready
            for inp, write in pairs:
                buf = prepare("all_gather", g.rank, g.size, _flat(inp))
                end = eng.collective(g, "all_gather", buf, buf.numel(), ready)
                write(buf)
            return end
        return self.engine.submit(run, outputs)

    def allgather(self, output_lists, inputs, opts=None):
        def writer(outs):
            def write(buf):
                n = buf.numel() // len(outs)
                for j, o in enumerate(outs):
                    _into(o, buf[j * n:(j + 1) * n])
            return write
        for outs, inp in zip(output_lists, inputs):
            if len(outs) != self.g.size or any(o.numel() != inp.numel() for o in outs):
                raise ValueError("relay: all_gather needs one output per rank, each the size of the input")
        return self._all_gather([(i, writer(outs)) for outs, i in zip(output_lists, inputs)],
                                [o for outs in output_lists for o in outs])

    def all_gather_single(self, output, input, opts=None):
        return self.all_gather_single_coalesced([output], [input], opts)

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for o, i in zip(outputs, inputs):
            if o.numel() != i.numel() * self.g.size:
                raise ValueError(f"relay: all_gather_into_tensor output has {o.numel()} elements, input "
                                 f"{i.numel()}; the output must hold group size ({self.g.size}) x input")
        return self._all_gather([(i, lambda buf, o=o: _into(o, buf)) for o, i in zip(outputs, inputs)],
                                list(outputs))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def broadcast(self, tensors, opts=None):
        opts = opts or dist.BroadcastOptions()
        eng, g = self.engine, self.g

        def run(ready):
            end = ready
            for t in tensors:
                buf = _flat(t)
                end = eng.collective(g, "broadcast", buf, buf.numel(), ready, root=opts.rootRank)
                if g.rank != opts.rootRank:
                    _into(t, buf)
            return end
        return self.engine.submit(run, list(tensors))

    # ------------------------------------------------------------ all-to-all
    def _all_to_all(self, inp, in_elems, out_elems, write, outputs, uneven: bool = True):
        """inp(): the flat input, made on the engine's thread; `uneven`: splits were given."""
        eng, g = self.engine, self.g
        world, me = g.size, g.rank

        def run(ready):
            # every rank needs the whole split matrix to choose the same algorithm and protocol
            # (and the hierarchical schedule to route): given splits are exchanged first
            S = split_matrix(world, 0, eng.exchange(g, in_elems, out_elems) if uneven else [list(in_elems)] * world)
            if [S[i][me] for i in range(world)] != list(out_elems):
                raise ValueError(f"relay: all_to_all on group rank {me}: output splits {list(out_elems)} (elements) "
                                 f"differ from what the other ranks send it, {[S[i][me] for i in range(world)]}")
            data = inp()
            nbytes = sum(map(sum, S)) / world * data.element_size()
            alg, _ = choose("all_to_all", eng.algorithms["all_to_all"], nbytes, g, g.fabric)
            lay = layout(me, world, S, g.topology, alg == "hierarchical")
            buf = prepare("all_to_all", me, world, data, lay)
            end = eng.collective(g, "all_to_all", buf, 0, ready, algorithm=alg, nbytes=nbytes, splits=S)
            write(buf[lay.output[0]:lay.output[1]])
            return end
        return self.engine.submit(run, outputs)

    def all_to_all_single(self, output, input, output_splits, input_splits, opts=None):
        world = self.g.size
        row_in = input[0].numel() if input.dim() and input.shape[0] else 0
        row_out = output[0].numel() if output.dim() and output.shape[0] else 0
        ins = [s * row_in for s in input_splits] if input_splits else [input.numel() // world] * world
        outs = [s * row_out for s in output_splits] if output_splits else [output.numel() // world] * world
        if sum(ins) != input.numel() or sum(outs) != output.numel():
            why = _FAKE if isinstance(input, FakeTensor) and not any(input_splits or [1]) and input.numel() else ""
            raise ValueError(f"relay: all_to_all_single splits {list(input_splits)} / {list(output_splits)} do not "
                             f"add up to the input {tuple(input.shape)} / output {tuple(output.shape)}{why}")
        return self._all_to_all(lambda: _flat(input), ins, outs, lambda buf: _into(output, buf), [output],
                                uneven=bool(input_splits or output_splits))

    alltoall_base = all_to_all_single

    def alltoall(self, outputs, inputs, opts=None):
        def write(buf):
            at = 0
            for o in outputs:
                _into(o, buf[at:at + o.numel()])
                at += o.numel()
        return self._all_to_all(lambda: torch.cat([_flat(t) for t in inputs]), [t.numel() for t in inputs],
                                [t.numel() for t in outputs], write, list(outputs))

    # ------------------------------------------------------------ rooted, direct
    def gather(self, output_lists, inputs, opts=None):
        root, eng, g = (opts or dist.GatherOptions()).rootRank, self.engine, self.g
        inp = inputs[0]
        n = inp.numel()

        def run(ready):
            buf = prepare("all_gather", g.rank, g.size, _flat(inp))
            seg = lambda r: ((r * n, (r + 1) * n),)  # noqa: E731
            step = Step(recvs=tuple(Recv(r, seg(r), False) for r in range(g.size) if r != root)) \
                if g.rank == root else Step(sends=(Send(root, seg(g.rank)),))
            end = eng.steps(g, "gather", [step] if g.size > 1 else [], buf, ready)
            if g.rank == root:
                for r, o in enumerate(output_lists[0]):
                    _into(o, buf[r * n:(r + 1) * n])
            return end
        return self.engine.submit(run, list(output_lists[0]) if output_lists else [])

    def scatter(self, outputs, input_lists, opts=None):
        root, eng, g = (opts or dist.ScatterOptions()).rootRank, self.engine, self.g
        out = outputs[0]
        n = out.numel()

        def run(ready):
            buf = torch.cat([_flat(t) for t in input_lists[0]]) if g.rank == root else \
                torch.zeros(n * g.size, dtype=out.dtype, device="meta" if isinstance(out, FakeTensor) else "cpu")
            seg = lambda r: ((r * n, (r + 1) * n),)  # noqa: E731
            step = Step(sends=tuple(Send((root + k) % g.size, seg((root + k) % g.size)) for k in range(1, g.size))) \
                if g.rank == root else Step(recvs=(Recv(root, seg(g.rank), False),))
            end = eng.steps(g, "scatter", [step] if g.size > 1 else [], buf, ready)
            _into(out, buf[g.rank * n:(g.rank + 1) * n])
            return end
        return self.engine.submit(run, [out])


class RelayProcessGroup(_Movement, dist.ProcessGroup):
    """One `relay` process group: identity, reductions, point to point and the barrier here, the
    data-moving operations in _Movement."""

    def __init__(self, engine, group):
        super().__init__(group.rank, group.size)
        self.engine, self.g = engine, group
        self._group_name, self._group_desc = "", ""

    # ------------------------------------------------------------ identity
    def getBackendName(self) -> str:
        return "relay"

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    def getGroupDesc(self) -> str:
        return self._group_desc

    _set_group_name, _set_group_desc = setGroupName, setGroupDesc

    @property
    def group_name(self) -> str:
        return self._group_name

    @property
    def group_desc(self) -> str:
        return self._group_desc

    def shutdown(self) -> None:  # the engine belongs to the device, not to one group
        pass

    def __repr__(self) -> str:
        return f"RelayProcessGroup(rank {self.g.rank} of devices {list(self.g.members)})"

    # ------------------------------------------------------------ reductions
    def _all_reduce(self, tensors, opts, root=None):
        op, factor = _op(opts.reduceOp, tensors)
        eng, g = self.engine, self.g

        def run(ready):
            end = ready
            for t in tensors:
                end, buf = _reduced(eng, g, "all_reduce", _flat(t), ready, op, factor)
                if root is None or root == g.rank:
                    _into(t, buf)
            return end
        return self.engine.submit(run, list(tensors))

    def allreduce(self, tensors, opts=None):
        return self._all_reduce(tensors, opts or dist.AllreduceOptions())

    def allreduce_coalesced(self, tensors, opts=None):
        """One all-reduce of all tensors, flattened together (as coalescing means)."""
        opts = opts or dist.AllreduceCoalescedOptions()
        op, factor = _op(opts.reduceOp, tensors)
        eng, g = self.engine, self.g

        def run(ready):
            flats = [_flat(t) for t in tensors]
            end, buf = _reduced(eng, g, "all_reduce", torch.cat(flats) if len(flats) > 1 else flats[0], ready,
                                op, factor)
            at = 0
            for t in tensors:
                _into(t, buf[at:at + t.numel()])
                at += t.numel()
            return end
        return self.engine.submit(run, list(tensors))

    def reduce(self, tensors, opts=None):
        opts = opts or dist.ReduceOptions()
        return self._all_reduce(tensors, opts, root=opts.rootRank)

    def _reduce_scatter(self, outputs, inputs, red):
        """inputs(): the flat input of world x output elements for each output (made on the
        engine's thread: working copies are not the program's compute)."""
        op, factor = _op(red, outputs)
        eng, g = self.engine, self.g

        def run(ready):
            end = ready
            for out, buf in zip(outputs, inputs()):
                if buf.numel() != out.numel() * g.size:
                    raise ValueError(f"relay: reduce_scatter input has {buf.numel()} elements, output "
                                     f"{out.numel()}; the input must hold group size ({g.size}) x output")
                end, buf = _reduced(eng, g, "reduce_scatter", buf, ready, op, factor)
                a, b = shards(buf.numel(), g.size)[g.rank]
                _into(out, buf[a:b])
            return end
        return self.engine.submit(run, list(outputs))

    def reduce_scatter(self, outputs, input_lists, opts=None):
        return self._reduce_scatter(outputs, lambda: [torch.cat([_flat(t) for t in ins]) for ins in input_lists],
                                    (opts or dist.ReduceScatterOptions()).reduceOp)

    def reduce_scatter_single(self, output, input, opts=None):
        return self.reduce_scatter_single_coalesced([output], [input], opts)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        return self._reduce_scatter(outputs, lambda: [_flat(i) for i in inputs],
                                    (opts or dist.ReduceScatterOptions()).reduceOp)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # ------------------------------------------------------------ point to point, barrier
    def send(self, tensors, dst: int, tag: int = 0):
        return self.engine.p2p("send", self.g, tensors[0], dst, tag)

    def recv(self, tensors, src: int, tag: int = 0):
        return self.engine.p2p("recv", self.g, tensors[0], src, tag)

    def recv_anysource(self, tensors, tag: int = 0):
        raise NotImplementedError("relay: receiving from any source is not supported; name the source rank")

    def barrier(self, opts=None):
        """Every member arrives (a one-element all-reduce, charged as one)."""
        return self.allreduce([torch.zeros(1)])
