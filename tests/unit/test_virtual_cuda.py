"""The virtual CUDA device (relay.device.backend.cuda, hbm, clock), entered in-process as a
program on a Relay device sees it: the chip's answers, tensors on the host, the emulated HBM and
the program's clock on the device's timeline. (tests/ray/test_gpu_programs.py runs whole programs.)"""

from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.distributed as dist
from _device import gpu  # tests/unit is on the path (no package)
from torch._subclasses.fake_tensor import FakeTensorMode

from relay.device.backend import clock, cuda
from relay.device.backend.hbm import Hbm
from relay.hardware import chips
from relay.kernels.timeline import DEFAULT


def test_is_available_and_device_count():
    assert not torch.cuda.is_available()  # a CPU build outside
    with gpu(count=4):
        assert torch.cuda.is_available() and torch.cuda.is_initialized()
        assert torch.cuda.device_count() == 4
    assert not torch.cuda.is_available()  # undone


def test_set_device_and_current_device():
    with gpu(count=4, index=0):
        torch.cuda.set_device(3)
        assert torch.cuda.current_device() == 3
        torch.cuda.set_device(torch.device("cuda", 1))
        assert torch.cuda.current_device() == 1
        torch.cuda.set_device("cuda:2")
        assert torch.cuda.current_device() == 2
        with torch.cuda.device(0):
            assert torch.cuda.current_device() == 0
        assert torch.cuda.current_device() == 2
        with pytest.raises(RuntimeError, match="invalid device ordinal 4"):
            torch.cuda.set_device(4)


def test_device_name_properties_and_capability():
    with gpu("h100"):
        p = torch.cuda.get_device_properties(0)
        assert torch.cuda.get_device_name() == p.name == chips.get("h100").display
        assert p.total_memory == 80 * 10 ** 9  # the catalog's 80 GB HBM, in bytes
        assert p.multi_processor_count == chips.get("h100").compute_units
        assert (p.major, p.minor) == torch.cuda.get_device_capability() == (9, 0)
        assert torch.cuda.is_bf16_supported()
    with gpu("b200"):
        assert torch.cuda.get_device_capability() == (10, 0)
        assert torch.cuda.get_device_properties().total_memory == int(chips.get("b200").hbm_gb * 1e9)


def test_cuda_devices_are_the_host():
    """torch.device("cuda", i), .cuda(), .to("cuda"), .to(local_rank), factories with device="cuda":
    all on the host; the tensor reads cpu (see docs/design.md)."""
    with gpu():
        dev = torch.device("cuda", 1)
        a = torch.ones(3, device="cuda")
        b = torch.zeros(2, 2, device=dev)
        c = torch.randn(4, device=torch.device("cuda:0"))
        d = torch.tensor([1.0, 2.0], device="cuda").to(dev, non_blocking=True)
        e = torch.arange(4).to(1)
        f = a.cuda()
        m = torch.nn.Linear(2, 2).cuda().to("cuda").to(1)
        g = torch.empty_like(a, device="cuda")
        assert all(t.device.type == "cpu" for t in (a, b, c, d, e, f, g, m.weight))
        assert not a.is_cuda and a.pin_memory() is a and f is a
        assert e.tolist() == [0, 1, 2, 3] and d.tolist() == [1.0, 2.0]


def test_factories_and_to_keep_other_arguments():
    with gpu():
        a = torch.full((2,), 3.0, device="cuda", dtype=torch.bfloat16)
        assert a.dtype == torch.bfloat16 and a.tolist() == [3.0, 3.0]
        b = a.to("cuda", torch.float32)
        assert b.dtype == torch.float32
        assert torch.ones(2).to(torch.float64).dtype == torch.float64  # a dtype is not a device


def test_streams_and_events_are_the_timeline():
    with gpu() as (timeline, _):
        s = torch.cuda.Stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            assert torch.cuda.current_stream() == s
            start.record()
            x = torch.randn(128, 128)
            for _ in range(4):
                x = x @ x
            end.record()
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        ms = start.elapsed_time(end)
        assert ms == pytest.approx((timeline.events[end.id] - timeline.events[start.id]) * 1e3)
        assert ms > 0 and timeline.host >= ms / 1e3


def test_memory_counts_storages_and_peak():
    with gpu() as (_, throttle):
        base = torch.cuda.memory_allocated()
        a = torch.empty(1000, device="cuda")  # 4000 bytes -> 4096 (512-byte blocks)
        assert torch.cuda.memory_allocated() - base == 4096
        v = a.view(10, 100)  # a view holds no new storage
        assert torch.cuda.memory_allocated() - base == 4096
        b = torch.empty(256, device="cuda")
        assert torch.cuda.max_memory_allocated() - base == 4096 + 1024
        del a, v
        assert torch.cuda.memory_allocated() - base == 1024
        assert torch.cuda.max_memory_allocated() - base == 5120
        assert torch.cuda.memory_reserved() - base == 5120  # held until empty_cache
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() == torch.cuda.memory_allocated()
        free, total = torch.cuda.mem_get_info()
        assert total == 80 * 10 ** 9 and free == total - torch.cuda.memory_reserved()
        stats = torch.cuda.memory_stats()
        assert stats["allocated_bytes.all.current"] == torch.cuda.memory_allocated()
        del b


def test_out_of_memory_at_the_chips_capacity():
    """An 80 GB H100: 79 GB of (fake) tensors fit, 2 GB more do not, and the error names the chip."""
    with gpu("h100"), FakeTensorMode():
        held = torch.empty(79 * 10 ** 9, dtype=torch.uint8, device="cuda")
        assert torch.cuda.memory_allocated() >= 79 * 10 ** 9
        with pytest.raises(torch.OutOfMemoryError, match="H100.*80 GB"):
            torch.empty(2 * 10 ** 9, dtype=torch.uint8, device="cuda")
        del held
        torch.empty(2 * 10 ** 9, dtype=torch.uint8, device="cuda")  # freed: fits again


def test_nccl_and_autocast():
    with gpu():
        assert dist.is_nccl_available() and dist.Backend.NCCL == "nccl"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = torch.nn.Linear(8, 8)(torch.randn(2, 8, device="cuda"))
        assert y.dtype == torch.bfloat16  # the host's autocast, same dtype
        with torch.autocast(device_type="cuda"):  # CUDA's default: float16
            assert torch.nn.Linear(8, 8)(torch.randn(2, 8)).dtype == torch.float16
        scaler = torch.amp.GradScaler("cuda")
        assert scaler.is_enabled()


def test_unsupported_calls_are_refused_by_name():
    with gpu():
        with pytest.raises(cuda.Unsupported, match="torch.cuda.CUDAGraph"):
            torch.cuda.CUDAGraph()
        with pytest.raises(cuda.Unsupported, match="torch.cuda.graph"):
            torch.cuda.graph(None)


def test_the_programs_clock_is_the_emulated_clock():
    """perf_counter around an emulated GEMM-heavy second reads that second, not the host's time."""
    with gpu("h100") as (timeline, throttle), FakeTensorMode():
        x = torch.randn(16384, 16384, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(16384, 16384, device="cuda", dtype=torch.bfloat16)
        host0 = _real_perf_counter()
        t0, m0, w0, n0 = time.perf_counter(), time.monotonic(), time.time(), time.perf_counter_ns()
        issued = timeline.host
        while timeline.streams[DEFAULT] - issued < 1.0:  # 1 s of emulated GEMMs
            y = x @ w
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        host = _real_perf_counter() - host0
        emulated = timeline.host - issued
        assert dt == pytest.approx(emulated, rel=1e-9) and 1.0 <= dt < 1.01
        assert time.monotonic() - m0 == pytest.approx(dt) and time.time() - w0 == pytest.approx(dt, rel=1e-6)
        assert (time.perf_counter_ns() - n0) / 1e9 == pytest.approx(dt, rel=1e-6)
        assert abs(host - dt) > 1e-3 or host == 0  # the host's own time is another figure
        del y
    assert abs(time.time() - _real_time()) < 1.0  # undone; time.time() stayed a date inside


def test_other_threads_and_relay_keep_the_hosts_clock():
    import threading
    with gpu() as (timeline, _):
        timeline.host += 100.0  # 100 emulated seconds later
        seen = {}
        th = threading.Thread(target=lambda: seen.setdefault("t", time.time()))
        th.start()
        th.join()
        assert abs(seen["t"] - _real_time()) < 5.0  # another thread: the host's
        assert time.time() - _real_time() > 99.0  # the program's thread: emulated
        relay_module = {"__name__": "relay.device.some_module", "time": time}
        exec("def now():\n    return time.time()\n", relay_module)  # Relay's code on the program's thread
        assert abs(relay_module["now"]() - _real_time()) < 5.0


def test_host_clock_keeps_host_time():
    with gpu(host_clock=True) as (timeline, _):
        timeline.host += 100.0
        assert abs(time.time() - _real_time()) < 5.0


def _real_time():
    return time.clock_gettime(time.CLOCK_REALTIME)


def _real_perf_counter():
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def test_seeds_are_the_hosts_generator():
    with gpu():
        torch.manual_seed(3)  # (calls torch.cuda.manual_seed_all)
        a = torch.randn(4, device="cuda")
        torch.cuda.manual_seed(3)
        b = torch.randn(4, device="cuda")
        torch.cuda.manual_seed_all(3)
        assert torch.equal(a, b) and torch.equal(a, torch.randn(4, device="cuda") * 0 + b)
        assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())


def test_a_clock_taken_during_a_program_reads_the_host_after_it():
    """A module imported while a program runs may take the function (`from time import
    perf_counter`); the next program in the same worker must not find the last one's time."""
    with gpu() as (timeline, _):
        taken = time.time
        timeline.host += 100.0
        assert taken() - _real_time() > 99.0
    assert abs(taken() - _real_time()) < 5.0


def test_grad_scaler_step_nvtx_and_small_calls():
    with gpu():
        m = torch.nn.Linear(4, 4).cuda()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m(torch.randn(2, 4, device="cuda")).float().sum()
        before = m.weight.detach().clone()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 1024.0 and not torch.equal(before, m.weight)  # finite: stepped
        torch.cuda.nvtx.range_push("fwd")
        torch.cuda.nvtx.range_pop()
        with torch.cuda.nvtx.range("step"):
            torch.cuda.ipc_collect()
        assert not torch.cuda.is_current_stream_capturing()


def test_memory_fraction_lowers_the_limit():
    with gpu("h100"), FakeTensorMode():
        torch.cuda.set_per_process_memory_fraction(0.5)
        assert torch.cuda.get_per_process_memory_fraction() == 0.5
        held = torch.empty(39 * 10 ** 9, dtype=torch.uint8, device="cuda")
        with pytest.raises(torch.OutOfMemoryError, match="0.5 of it allowed"):
            torch.empty(2 * 10 ** 9, dtype=torch.uint8, device="cuda")
        del held


def test_default_device_load_and_device_class():
    import io
    with gpu(count=2):
        with torch.device("cuda"):
            assert torch.zeros(2).device.type == "cpu"
        torch.set_default_device("cuda")
        try:
            assert torch.zeros(2).device.type == "cpu"
        finally:
            torch.set_default_device(None)
        buffer = io.BytesIO()
        torch.save({"w": torch.arange(3.0)}, buffer)
        for location in ("cuda:0", torch.device("cuda", 1), {"cuda:1": "cuda:0"}, 0):
            buffer.seek(0)
            assert torch.load(buffer, map_location=location)["w"].tolist() == [0.0, 1.0, 2.0]
        d = torch.cuda.device(1)
        assert isinstance(d, torch.cuda.device) and d.idx == 1


def test_an_integer_device_is_the_accelerators():
    """device=local_rank (an int) names cuda:i on a GPU build: factories, *_like and new_* too."""
    with gpu(count=2):
        x = torch.ones(2)
        made = [torch.zeros(3, device=0), torch.randn(3, device=torch.cuda.current_device()),
                torch.tensor([1.0], device=1), torch.empty_like(x, device=0), x.new_zeros(3, device=0),
                torch.full((2,), 2.0, device=1), torch.arange(3, device=0)]
        assert all(t.device.type == "cpu" for t in made)
        assert made[0].tolist() == [0.0, 0.0, 0.0] and made[2].tolist() == [1.0]


def test_a_forked_child_reads_the_hosts_clock():
    """A DataLoader worker forked from the program is another process: the host's time, advancing."""
    import os
    with gpu() as (timeline, _):
        timeline.host += 100.0
        assert time.time() - _real_time() > 99.0
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own clock must be the host's and must advance over a sleep
            try:
                a = time.monotonic()
                time.sleep(0.05)
                ok = abs(time.time() - _real_time()) < 5.0 and time.monotonic() - a >= 0.04
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        seen = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
        assert seen == b"1"
        assert time.time() - _real_time() > 99.0  # the parent's program still reads emulated time


def test_the_programs_clock_runs_on_across_a_restart():
    """relay.dist.restart_clocks() puts the timeline back at emulated 0: the program's clock goes on."""
    with gpu() as (timeline, _):
        timeline.host += 10.0
        before = time.monotonic(), time.perf_counter(), time.time()
        timeline.reset()
        assert timeline.host == 0.0
        after = time.monotonic(), time.perf_counter(), time.time()
        assert all(b >= a for a, b in zip(before, after))
        timeline.host += 2.0
        assert time.monotonic() - before[0] == pytest.approx(2.0)  # 10 s, restart, 2 s more: 2 s after


def test_sleep_moves_the_programs_clock_on():
    """A timeout loop on the program's clock (filelock's acquire(timeout=...)) ends: time.sleep
    moves the host lane on by what was slept, a change the timeline records (shared runs replay it)."""
    with gpu() as (timeline, _):
        seen = []
        timeline.listener = lambda name, args: seen.append((name, args))
        t0, host0 = time.monotonic(), timeline.host
        for polls in range(1, 100):  # (on a frozen clock: 99 polls, or forever in a while loop)
            time.sleep(0.01)
            if time.monotonic() - t0 >= 0.05:
                break
        assert polls in (5, 6) and timeline.host - host0 == pytest.approx(0.01 * polls)
        assert seen == [("sleep", (0.01,))] * polls
        assert timeline.streams[DEFAULT] == 0.0  # the streams did not move
        relay_module = {"__name__": "relay.device.some_module", "time": time}
        exec("def nap():\n    time.sleep(0.01)\n", relay_module)  # Relay's own sleeps: host time only
        relay_module["nap"]()
        assert len(seen) == polls


def test_wall_clock_events_time_the_host():
    """--clock wall (no emulated timeline): CUDA's Event and Stream take their arguments, and
    elapsed_time is milliseconds of the host's time (the wall clock's emulated time)."""
    chip = chips.get("h100")
    with cuda.emulated(chip, Hbm(chip), count=2, index=0):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with pytest.raises(RuntimeError, match="not recorded"):
            start.elapsed_time(end)
        h0 = _real_perf_counter()
        start.record()
        time.sleep(0.02)
        with torch.cuda.stream(torch.cuda.Stream(priority=-1)):
            torch.cuda.Stream().record_event(end)
        torch.cuda.synchronize()
        host_ms = (_real_perf_counter() - h0) * 1e3
        assert 20.0 <= start.elapsed_time(end) <= host_ms


def test_a_tensors_own_device_is_the_current_device():
    """x.device reads cpu (remapped): torch.cuda calls given it answer for the current device."""
    with gpu(count=2, index=1):
        x = torch.ones(2, device="cuda")
        assert torch.cuda.get_device_properties(x.device).name == chips.get("h100").display
        assert torch.cuda.get_device_capability(x.device) == (9, 0)
        with torch.cuda.device(x.device):
            assert torch.cuda.current_device() == 1
        with pytest.raises(ValueError, match="Expected a cuda device"):
            torch.cuda.get_device_properties(torch.device("meta"))


def test_generator_summary_set_stream_type_and_autocast_query():
    with gpu() as (timeline, _):
        g = torch.Generator(device="cuda").manual_seed(0)
        assert isinstance(g, torch.Generator) and g.device.type == "cpu"
        a = torch.randn(3, device="cuda", generator=g)
        assert torch.equal(a, torch.randn(3, generator=torch.Generator("cuda").manual_seed(0)))
        torch.empty(2 ** 20, device="cuda")
        summary = torch.cuda.memory_summary()
        assert "emulated HBM" in summary and "MiB" in summary and torch.cuda.memory.memory_summary() == summary
        s = torch.cuda.Stream()
        torch.cuda.set_stream(s)
        assert timeline.current == s.id and torch.cuda.current_stream() == s
        torch.cuda.set_stream(torch.cuda.default_stream())
        assert timeline.current == DEFAULT
        x = torch.ones(2, dtype=torch.float64).type("torch.cuda.FloatTensor")
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("cuda") and torch.is_autocast_enabled()
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16
        assert not torch.is_autocast_enabled("cuda")
    assert torch.Generator is torch._C.Generator  # undone


def test_torch_accelerator_agrees_with_torch_cuda():
    """torch.accelerator and torch.get_device_module() answer as torch.cuda does, and torch's own
    users of them still run: a DataLoader pinning memory (with a worker), an optimizer's step."""
    from torch.utils.data import DataLoader, TensorDataset
    with gpu(count=2, index=1) as (timeline, _):
        acc = torch.accelerator
        assert acc.is_available() and acc.current_accelerator() == torch.device("cuda")
        assert acc.device_count() == 2 and acc.current_device_index() == 1
        acc.set_device_index(0)
        assert torch.cuda.current_device() == 0
        assert torch.get_device_module() is torch.cuda and torch.get_device_module("cuda") is torch.cuda
        assert acc.current_stream() == torch.cuda.current_stream() and not acc.current_stream().is_capturing()
        x = torch.empty(1000, device="cuda")
        assert acc.memory_allocated() == torch.cuda.memory_allocated() > 0
        data = TensorDataset(torch.arange(16.0).view(8, 2))
        for workers in (0, 1):
            batches = [b for (b,) in DataLoader(data, batch_size=4, pin_memory=True, num_workers=workers)]
            assert torch.equal(torch.cat(batches), data.tensors[0])
        m = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(m.parameters())
        m(torch.ones(1, 2)).sum().backward()
        opt.step()
        del x
    assert not torch.accelerator.is_available() and torch.get_device_module() is torch.cpu  # undone


def test_cluster_launch_takes_the_clusters_tensors():
    """Cluster(tensors="fake").launch(fn) runs fn on fake tensors (its settings are checked as
    such, before any worker starts), and refuses a fake cluster too large to give fn a worker each."""
    from relay import Cluster, System
    from relay.errors import ConfigError
    with pytest.raises(ConfigError, match="tensors = 'fake' needs the virtual clock"):
        Cluster(System("h100", 2), clock="wall", tensors="fake").launch(print)
    with pytest.raises(ConfigError, match=r"Cluster\(tensors='fake'\) of 32 devices starts one worker"):
        Cluster(System("h100", 32), tensors="fake").launch(print, host_clock=True)


def test_a_clock_taken_by_name_before_the_program_reads_emulated_time():
    """A framework that did `from time import perf_counter` at import (tqdm's `from time import
    time`) reads the emulated clock while the program runs, and the host's after; the standard
    library's own (threading's timeouts) keep the host's."""
    import threading
    import types
    framework = types.ModuleType("some_framework")
    exec("from time import perf_counter, time\n", framework.__dict__)
    sys.modules["some_framework"] = framework
    try:
        with gpu() as (timeline, _):
            timeline.host += 100.0
            assert framework.time() - _real_time() > 99.0
            assert framework.perf_counter() - _real_perf_counter() > 99.0
            assert threading._time is clock._REAL["monotonic"]
        assert abs(framework.time() - _real_time()) < 5.0 and framework.time is clock._REAL["time"]
    finally:
        del sys.modules["some_framework"]



def test_a_clock_name_rebound_during_the_program_keeps_its_value_and_the_error_its_type():
    """A program that rebinds a clock name it took (a monkeypatch) and then fails: its own error comes
    out, the rebound name keeps its new value, and the other taken names get the host's clock back."""
    import types
    framework = types.ModuleType("some_framework_2")
    exec("from time import perf_counter, time\n", framework.__dict__)
    sys.modules["some_framework_2"] = framework
    try:
        with pytest.raises(RuntimeError, match="the program's own"):
            with gpu():
                framework.perf_counter = lambda: 1.0
                raise RuntimeError("the program's own")
        assert framework.perf_counter() == 1.0 and framework.time is clock._REAL["time"]
    finally:
        del sys.modules["some_framework_2"]
