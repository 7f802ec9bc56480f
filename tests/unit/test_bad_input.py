"""Bad input is refused before any device starts, with a message that names the field, the value
and the fix; the command line exits with status 2 and prints no traceback."""

import psutil
import pytest

from relay.launch.cli import main

RUN = ["run", "--chip", "h100", "--devices", "2", "--workload", "mlp", "--steps", "1"]

CASES = [
    # (argv, what the message must say)
    (["run", "--chip", "h1000", "--devices", "2"], r"chip = 'h1000' is not in the catalog; did you mean h100"),
    (["run", "--system", "nvl73"], r"system preset = 'nvl73' is unknown; did you mean nvl72"),
    (["run", "--chip", "h100", "--devices", "2", "--scaleup-gbps", "-5"],
     r"scaleup_gbps = -5.0 is invalid; give a positive"),
    (["run", "--chip", "h100", "--devices", "0"], r"devices = 0 is invalid; give an integer >= 1"),
    (["run", "--chip", "h100", "--devices", "4", "--domain", "8"], r"domain = 8 is larger than devices = 4"),
    (["run", "--chip", "ascend-910b", "--devices", "16", "--domain", "8"],
     r"scaleout_gbps is unknown .* pass scaleout_gbps"),
    (RUN[:4] + ["6", "--workload", "mlp", "--domain", "4", "--algorithm", "hierarchical"],
     r"'hierarchical' needs equal scale-up domains"),
    (RUN + ["--algorithm", "rings"], r"algorithm = 'rings' is unknown; choose one of ring"),
    (["run", "--chip", "tpu-v5e", "--devices", "2", "--workload", "gpt-tiny", "--batch-scale", "1000000"],
     r"memory: gpt-tiny needs .* but tpu-v5e has 16 GB of HBM"),
    (RUN + ["--clock", "wall", "--dilation", "0.001"], r"dilation = 0.001 is too small for this host.* dilation >= "),
    (RUN + ["--dilation", "10"], r"dilation = 10.0 applies to clock='wall' only"),
    (RUN[:6] + ["no_such_pkg.models:w"], r"module 'no_such_pkg.models' could not be imported"),
    (RUN[:6] + ["os:system"], r"workload = 'os:system': system cannot be called with no arguments"),
    (RUN[:6] + [":x"], r"workload = ':x' is not a whole import path"),
    (["run", "--preset", "/nonexistent/mine.toml"], r"preset file '/nonexistent/mine.toml' cannot be read"),
    (["run", "--preset", "headline"], r"preset 'headline' is for `relay breakeven`"),
    (["breakeven", "--fast", "nvl72", "--slow", "910c", "--metric", "speed"], r"metric = 'speed' is unknown"),
    (["breakeven", "--fast", "nvl72", "--slow", "910c", "--metric", "time-to-loss"], r"needs --target-loss"),
    (["breakeven", "--fast", "h100", "--slow", "a100"], r"--fast = 'h100' is a chip; say how many with --fast-devices"),
    (["sweep", "--chips", "h100", "--devices", "1,3", "--scaling", "strong", "--global-batch", "8"],
     r"global_batch = 8 does not divide over 3 devices"),
    (["sweep", "--chips", "h100", "--devices", "1,2", "--scaling", "sideways"], r"scaling = 'sideways' is unknown"),
    (RUN + ["--address", "nowhere"], r"address = 'nowhere' is not an address; give host:port, 'auto' or 'recorded'"),
    (RUN + ["--fail", "device=9,step=1"], r"fail: device = 9 is not a device; give 0..1"),
    (RUN + ["--straggler", "device=0,slowdown=0.5"], r"slowdown = 0.5 for device 0 is invalid; give a factor >= 1"),
    (RUN[:-1] + ["0"], r"steps = 0 is invalid; give an integer >= 1"),
    (["run", "--devices", "910c:x"], r"write chip:count pairs, e.g. 910c:8,h100:2"),
    (["bench", "--chip", "h100", "--devices", "4", "--min-bytes", "lots"], r"size = 'lots' is not a byte count"),
    (["bench", "--chip", "h100", "--devices", "4", "--primitive", "all_to_all", "--algorithm", "ring"],
     r"algorithm = 'ring' does not run all_to_all; choose one of direct, hierarchical"),
    (["launch", "--chip", "h100", "--devices", "2", "/nonexistent/train.py"],
     r"script = '/nonexistent/train.py' is not a file"),
    (["launch", "--chip", "h100", "--devices", "2", "--algorithm", "all_to_all=ring", "README.md"],
     r"algorithm = 'ring' does not run all_to_all"),
    (["launch", "--chip", "h100", "--devices", "2", "--algorithm", "all_reduce:ring", "README.md"],
     r"algorithm = 'all_reduce:ring' is unknown"),
    (["launch", "--chip", "h100", "--devices", "2", "-m", "no_such_package.train"],
     r"module = 'no_such_package.train' is not importable from .*; give a module on the Python path"),
    (["launch", "--chip", "h100", "--devices", "2", "--ranks", "2", "README.md"],
     r"ranks = '2' names a rank outside 0..1"),
    (["launch", "--chip", "h100", "--devices", "2", "--clock", "wall", "--tensors", "fake", "README.md"],
     r"--tensors fake needs the virtual clock"),
]


def device_processes() -> set[int]:
    """Every device worker process this test process started, however deep (Ray titles them
    ray::DeviceWorker); other users' workers on a shared host are not counted."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if any("DeviceWorker" in part for part in p.cmdline()):
                found.add(p.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return found


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_refused_before_any_device(argv, message, capsys, tmp_path):
    before = device_processes()
    code = main(argv + (["--out", str(tmp_path)] if argv[0] != "bench" else []))
    err = capsys.readouterr().err
    assert code == 2, err
    assert pytest.importorskip("re").search(message, err), err
    assert "Traceback" not in err and err.count("\n") == 1  # one line, no traceback
    assert device_processes() <= before  # no device was started


def test_the_table_covers_at_least_fifteen_kinds():
    assert len(CASES) >= 15


def test_unknown_option_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--clock", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_an_internal_error_is_not_reported_as_bad_input(monkeypatch, capsys):
    # a ValueError from a bug (not a relay.errors.ConfigError) must surface with its traceback,
    # not as a one-line "error:" with exit status 2
    import relay.launch.cli as cli

    def bug(parser, args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "with_preset", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["chips"])
    assert "error:" not in capsys.readouterr().err


def test_bad_input_errors_are_config_errors():
    from relay import Cluster, System
    from relay.errors import ConfigError
    # the cost model (kernels/, below Relay's error type) raises ValueError; the Cluster that
    # takes the user's dtype reports it as bad input
    for bad in (lambda: System("h100", 0), lambda: Cluster(System("h100", 1), dtype="fp4"),
                lambda: System.preset("nvl73")):
        with pytest.raises(ConfigError):
            bad()
