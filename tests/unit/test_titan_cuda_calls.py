"""CUDA calls torchtitan 0.3.0 makes on its train path, on the virtual CUDA device (docs/torchtitan.md lists
them all; tests/unit/test_virtual_cuda.py covers the device's own calls)."""

from __future__ import annotations

import torch
from _device import gpu  # tests/unit is on the path (no package)


def test_calls_inside_python_level_torch_functions_are_remapped():
    """Tensor.backward is a torch function written in Python: what runs inside it (a backward
    hook allocating on "cuda", as FSDP2's reduce-scatter does) is remapped too."""
    seen = []

    def hook(grad):
        seen.append(torch.zeros(2, device="cuda").device)
        return grad

    with gpu():
        x = torch.ones(3, device="cuda", requires_grad=True)
        x.register_hook(hook)
        (x * 2).sum().backward()
        torch.nn.init.normal_(w := torch.empty(4, 4, device="cuda"))
    assert seen == [torch.device("cpu")] and w.device.type == "cpu" and x.grad.tolist() == [2.0] * 3


def test_a_python_tensor_method_whose_cpp_half_asks_again_runs_once():
    """Tensor.unflatten (torchtitan's DeepSeek-V3 node-limited routing) is written in Python and
    calls its C++ half, which asks the remapping mode again under the same name: that call runs as
    is (redispatched again, it recursed without end)."""
    with gpu():
        scores = torch.arange(24.0, device="cuda").view(4, 6)
        grouped = scores.unflatten(-1, (2, 3))
    assert grouped.shape == (4, 2, 3) and grouped[1, 1].tolist() == [9.0, 10.0, 11.0]


def test_torch_compile_runs_eager_and_is_charged():
    """torch.compile on the virtual device is the function itself (as a call and as a decorator):
    every op reaches the throttle (compiled kernels would bypass it)."""
    def f(a, b):
        return (a @ b).relu()

    with gpu() as (_, throttle):
        compiled = torch.compile(f, options={"max_autotune": True})
        decorated = torch.compile(fullgraph=True)(f)
        a = torch.randn(64, 64, device="cuda")
        ops = throttle.ops
        compiled(a, a)
        decorated(a, a)
        assert throttle.ops - ops == 4 and throttle.flops >= 2 * 2 * 64 ** 3
    assert compiled is f and decorated is f


def test_set_timeout_is_accepted():
    """torchtitan 0.3.0 calls torch.distributed.set_timeout after its first step (a newer torch's
    API): accepted on the virtual device where this torch lacks it."""
    import torch.distributed as dist
    with gpu():
        dist.set_timeout(__import__("datetime").timedelta(seconds=100))


def test_fake_scalars_keep_a_python_numbers_value():
    """`relay launch --tensors fake`: .item() of a fake tensor made from a Python number is that
    number (nn.init.trunc_normal_ reads its bounds so, then loops until no value is out of them:
    torchtitan's llama3 initialisation); any other fake value reads 0."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from relay.device.backend.comm_throttle import CommThrottle

    throttle = CommThrottle.__new__(CommThrottle)
    throttle.fake_scalars, throttle.fresh = True, None
    with FakeTensorMode(allow_non_fake_inputs=True):
        bound, data = torch.empty(1).new_tensor(-2.5, device="cpu"), torch.randn(3).sum()
    item = torch.ops.aten._local_scalar_dense.default
    assert throttle.execute(item, (bound,), {}) == -2.5 and throttle.execute(item, (data,), {}) == 0


def test_remembered_fake_answers_keep_the_inputs_device():
    """The fake-op memo (relay.device.fake.ops.FreshOps) keys an op by its inputs' device too:
    torchtitan builds its model on "meta" and later runs the same ops at the same shapes on the
    device (FlexAttention's mask); the answer remembered for meta was given for cpu
    (FakeTensorDeviceMismatchError: meta and cpu)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from relay.device.fake.ops import FreshOps

    class Remembering(TorchDispatchMode):
        def __init__(self, fresh):
            super().__init__()
            self.fresh = fresh

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return self.fresh.run(func, args, kwargs or {})

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, Remembering(FreshOps(mode)):
        on_meta = torch.arange(16, device="meta")[:, None] * 2
        on_host = torch.arange(16, device="cpu")[:, None] * 2
        assert (on_meta.device.type, on_host.device.type) == ("meta", "cpu")
        assert (on_host >= torch.arange(16)).device.type == "cpu"


def test_meta_tensors_take_no_hbm():
    """torchtitan builds its model on "meta" (8B: 32 GB of fp32 parameters), shards it, then
    materialises the shards: only those count (emulated HBM; meta tensors hold no memory)."""
    with gpu() as (_, throttle):
        before = torch.cuda.memory_allocated()
        with torch.device("meta"):
            w = torch.nn.Linear(4096, 4096)
        assert torch.cuda.memory_allocated() == before
        x = torch.empty(1024, 1024, device="cuda")
        assert torch.cuda.memory_allocated() == before + 4 * 2 ** 20
    del w, x


def test_a_pipeline_step_takes_the_micro_batches_split():
    """torchtitan 0.3.0 runs its pipeline as schedule.step(arg_mbs=, kwarg_mbs=, target_mbs=) (torch
    2.14's form; 2.13's step takes the whole batch only): on the virtual device that call runs the
    same micro-batches as a whole-batch step, with the same per-micro-batch losses and gradients, on
    a single-stage schedule (GPipe) and a multi-stage one (LoopedBFS, two stages on this rank), and
    mixing the two forms is refused as torch 2.14 refuses it."""
    import pytest
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, ScheduleLoopedBFS

    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    cpu = torch.device("cpu")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for multi in (False, True):
            runs = []
            for pre_split in (False, True):
                torch.manual_seed(1)
                layers, losses = [torch.nn.Linear(8, 8) for _ in range(2 if multi else 1)], []
                with gpu():
                    stages = [PipelineStage(m, i, len(layers), cpu) for i, m in enumerate(layers)]
                    schedule = (ScheduleLoopedBFS(stages, 2, loss_fn=torch.nn.functional.mse_loss) if multi else
                                ScheduleGPipe(stages[0], 2, loss_fn=torch.nn.functional.mse_loss))
                    if pre_split:
                        schedule.step(arg_mbs=[(x[:2],), (x[2:],)], kwarg_mbs=[{}, {}], target_mbs=[y[:2], y[2:]],
                                      losses=losses, return_outputs=False)
                        with pytest.raises(ValueError, match="pre-split"):
                            schedule.step(x, arg_mbs=[(x[:2],), (x[2:],)])
                        with pytest.raises(TypeError, match="micro-batch 0"):
                            schedule.step(arg_mbs=[[x[:2]], [x[2:]]], target_mbs=[y[:2], y[2:]])
                    else:
                        schedule.step(x, target=y, losses=losses)
                runs.append(([float(v.detach()) for v in losses], [m.weight.grad.clone() for m in layers]))
            (whole, grads_whole), (split, grads_split) = runs
            assert len(whole) == 2 and whole == split, multi
            assert all(torch.equal(a, b) for a, b in zip(grads_whole, grads_split)), multi
    finally:
        dist.destroy_process_group()
