"""The emulated HBM (relay.device.backend.hbm) of a program on fake tensors (`relay launch --tensors
fake`) equals the same program's on real tensors, step after step, with Python's cyclic collector
off as torchtitan keeps it between its own collections (tools/utils.GarbageCollection); a DTensor
holds its local shard."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from _device import gpu, launched  # tests/unit is on the path (no package)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from relay import System
from relay.collectives import Fabric
from relay.device.backend import streams
from relay.device.backend.comm_throttle import CommThrottle
from relay.device.backend.engine import Engine
from relay.device.backend.hbm import Hbm
from relay.device.fake.ops import FreshOps
from relay.device.fake.program import launch_fake
from relay.hardware import chips
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.kernels.timeline import Timeline


@contextlib.contextmanager
def no_cyclic_gc():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def memory_per_step(fake: bool, steps: int = 3) -> list[tuple[int, int]]:
    """(memory_allocated, max_memory_allocated) after each training step of a small MLP under
    AdamW on one emulated H100, the device as a launched program sees it."""
    rows = []
    with launched(fake), no_cyclic_gc():
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            torch.cuda.reset_peak_memory_stats()
            model(torch.randn(64, 256, device="cuda")).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rows.append((torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
    return rows


def test_fake_tensors_hold_the_real_runs_hbm_every_step():
    """Parameters and AdamW's two moments (3 MiB, blocks of 512 bytes) after every step, the same
    peak within the step, on fake tensors as on real ones, and no growth: an op's fake inputs were
    kept alive by a reference cycle of the fake-op memo (fake/ops.py) until the cyclic collector
    ran, their storages still counted (torchtitan's llama3 debug model on 2 emulated H100: 0.45,
    0.81, 1.17, 1.53 GiB at steps 1-4, real tensors 0.12 GiB)."""
    real, fake = memory_per_step(False), memory_per_step(True)
    params = 256 * 512 + 512 + 512 * 256 + 256
    # after zero_grad (gradients None): fp32 weights and AdamW's 2 moments, and 4 step counts (512 bytes each)
    assert real[0][0] == 3 * 4 * params + 4 * 512
    assert fake == real
    assert len(set(fake)) == 1  # flat: nothing left over from one step to the next


def test_the_fake_op_memo_keeps_no_input_alive():
    """An op answered through the memo (fresh, view and remembered) drops its fake inputs when
    the program does, with no cyclic collection."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fresh = FreshOps(mode)
    with mode, no_cyclic_gc():
        for _ in range(2):  # the first call runs fake mode, the second is answered from the memo
            a, b = torch.empty(8, 8), torch.empty(8, 8)
            alive = [weakref.ref(a), weakref.ref(b)]
            out = fresh.run(torch.ops.aten.mm.default, (a, b), {})
            view = fresh.run(torch.ops.aten.t.default, (out,), {})
            alive.append(weakref.ref(out))
            del a, b, out, view
            assert [r() for r in alive] == [None] * 3


@pytest.mark.parametrize("fake", [False, True])
def test_a_dtensor_holds_its_local_shard(fake):
    """An op on a DTensor (FSDP2's parameters: torchtitan's to_empty and init_weights) makes its
    local shard, below the throttle: that is what the HBM holds, not the DTensor's own storage,
    which has the global size (llama3 8B on 8 emulated H100 read 35.3 GiB "memory usage for
    model" where its fp32 shards are 3.7 GiB, and ran out of emulated memory at its first step)."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        weight = distribute_tensor(torch.empty(1024, 512), init_device_mesh("cpu", (8,)), [Shard(0)])
        throttle = Throttle(CostModel(chips.get("h100")), VirtualLane())
        throttle.memory = hbm = Hbm(chips.get("h100"))
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), throttle:
            shard = torch.empty_like(weight)
            assert hbm.allocated == 128 * 512 * 4 and shard.to_local().shape == (128, 512)
            total = shard.sum()  # a scalar DTensor, partial: its local scalar (one block)
            assert hbm.allocated == 128 * 512 * 4 + 512
            del shard, total
            assert hbm.allocated == 0
    finally:
        dist.destroy_process_group()


def test_fsdp2_frees_what_it_all_gathers():
    """FSDP2 all-gathers each parameter group into buffers it frees in place after the group's
    forward and backward (`UntypedStorage.resize_(0)`, no aten op) and allocates again before:
    freed, they hold no HBM (llama3 8B on 8 emulated H100 held all 32 layers' bf16 parameters,
    15 GiB, for the whole run), and the peak holds one group's at a time."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with gpu(count=1, host_clock=True) as (_, throttle):
            hbm = throttle.memory
            torch.manual_seed(0)
            model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(4)))
            mesh = init_device_mesh("cpu", (2,))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            layer_bytes = 1024 * 1024 * 4
            start = hbm.allocated  # the 4 layers' fp32 shards (half a layer each)
            assert start == 4 * layer_bytes // 2 + 512  # (+ a small buffer FSDP2 keeps)
            model(torch.randn(8, 1024)).sum().backward()
            # after the step: each layer's gradient shard, nothing all-gathered (counted so: 4 layers more)
            assert hbm.allocated - start == 4 * layer_bytes // 2
            # the step's peak: a few layers gathered at a time (every gathered layer kept: 8.5 layers)
            assert hbm.peak - start < 6 * layer_bytes
    finally:
        dist.destroy_process_group()


def test_a_collective_waited_inside_a_dtensor_op_is_waited_and_freed():
    """Sequence parallelism reduce-scatters a block's output into a DTensor without waiting
    (`redistribute(..., async_op=True)`: its local tensor an AsyncCollectiveTensor), and the next op
    on the DTensor waits for it below the throttle (funcol.wait_tensor, inside DTensor's dispatch).
    On fake tensors that wait is the engine's too, as c10d's work registry makes it on real ones:
    the program's clock holds for the collective (the recording has the wait) and the engine lets
    go of the output, which is freed with the program's last reference (torchtitan's llama3 70B
    on 256 emulated H100, TP 8: every attention and FFN reduce-scatter output of the step kept,
    204 x 0.25 GiB, and out of emulated memory at the first backward)."""
    from torch.distributed.tensor import DTensor, Partial

    from relay.device.backend import group as relay_group
    from relay.device.fake.launched import ProgramRecorder

    system, chip = System("h100", 2), chips.get("h100")
    cost = CostModel(chip)
    timeline = Timeline(cost.launch_us / 1e6)
    engine = ProgramRecorder(0, None, system, Fabric.of(system), timeline, VirtualLane(), 10.0)
    engine.allowed = frozenset({(0, 1)})
    throttle = CommThrottle(engine, cost, timeline)
    throttle.memory = hbm = Hbm(chip)
    relay_group.register()
    relay_group.activate(engine)
    try:
        dist.init_process_group(relay_group.NAME, rank=0, world_size=2, store=dist.HashStore())
        mesh = init_device_mesh("cpu", (2,))  # (its table of ranks real, as launch_fake makes it)
        with throttle, streams.emulated(timeline, engine), launch_fake(throttle), no_cyclic_gc():
            partial = DTensor.from_local(torch.empty(64, 1024), mesh, [Partial()], run_check=False)
            start = hbm.allocated
            out = partial.redistribute(mesh, [Shard(0)], async_op=True)  # issued, not waited
            assert hbm.allocated - start == 32 * 1024 * 4 and len(engine._writing) == 1
            total = out * 2  # waits for it (below the throttle)
            assert [e[0] for e in engine.events if e[0] in ("issue", "wait")] == ["issue", "wait"]
            assert not engine._writing
            engine.drain()  # (the engine's thread done with the operation)
            del out
            assert hbm.allocated - start == 32 * 1024 * 4  # `total` alone
            del total
            assert hbm.allocated == start
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        relay_group.activate(None)
        engine.close()


@pytest.mark.parametrize("recording", [False, True])
def test_the_engine_keeps_no_buffer_of_a_finished_operation(recording):
    """The engine's thread lets go of an operation (its buffers, its output) once it is done, not
    when the next one comes: a gathered or reduce-scattered buffer is freed with the program's last
    reference, as on a GPU (torchtitan's llama3 70B on 256 emulated H100, TP 8: the last 2 GiB
    all-gather of each block's sequence kept, the step's peak 43.11 GiB for 41.11)."""
    import time

    from relay.device.fake.launched import ProgramRecorder

    system = System("h100", 2)
    kind = ProgramRecorder if recording else Engine
    engine = kind(0, None, system, Fabric.of(system), Timeline(0.0), VirtualLane(), 10.0)
    try:
        with no_cyclic_gc():
            buf, out = torch.empty(1024), torch.empty(1024)
            alive = [weakref.ref(buf), weakref.ref(out)]
            engine.submit(lambda ready, held=buf: ready, [out]).wait()  # (its run holds buf)
            del buf, out
            deadline = time.monotonic() + 5.0  # (the thread lets go just after it signals the wait)
            while any(r() is not None for r in alive) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [r() for r in alive] == [None, None]
    finally:
        engine.close()
