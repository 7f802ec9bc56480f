"""`relay launch`'s handling of a script's output and failure, without Ray: a device's runner
(device/backend/scripts.py, the code each device actor runs) in this process, the console's tail of
the rank logs, --ranks, and the results folder a refused run leaves (none)."""

import os
import sys
import textwrap

import pytest

from relay.device.backend.program import Program
from relay.device.backend.scripts import ScriptError, run_main
from relay.errors import ConfigError
from relay.launch.script import Tail, parse_ranks
from relay.results.folder import ResultsDir

ARGPARSE = """
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, required=True)
print("python level", sys.argv[1:])
os.write(1, b"C level\\n")
print("lr", p.parse_args().lr)
"""

RAISES = """
def add(x):
    return x + "a"

print("before the error")
add(1)
"""


def script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_scripts_output_at_the_python_and_the_c_level_goes_to_its_rank_log(tmp_path, capfd):
    path = script(tmp_path, "train.py", ARGPARSE)
    assert run_main(Program(script=path, argv=("--lr", "0.5"), log_dir=str(tmp_path)), 3) is None
    assert (tmp_path / "rank3.log").read_text() == "python level ['--lr', '0.5']\nC level\nlr 0.5\n"
    print("after")  # this process's own streams are back
    assert capfd.readouterr().out == "after\n"


def test_an_argparse_exit_keeps_its_usage_and_message(tmp_path):
    path = script(tmp_path, "train.py", ARGPARSE)
    with pytest.raises(ScriptError) as e:
        run_main(Program(script=path, argv=("--lr", "fast"), log_dir=str(tmp_path)), 0)
    assert e.value.summary == f"{path} exited with status 2"
    assert e.value.output.endswith("usage: train.py [-h] --lr LR\n"
                                   "train.py: error: argument --lr: invalid float value: 'fast'\n")


def test_a_failing_scripts_traceback_starts_at_its_own_frames(tmp_path):
    path = script(tmp_path, "bad.py", RAISES)
    with pytest.raises(ScriptError) as e:
        run_main(Program(script=path, log_dir=str(tmp_path)), 0)
    err = e.value
    assert err.summary == f"TypeError: unsupported operand type(s) for +: 'int' and 'str' (at {path}:3)"
    assert err.traceback.startswith(f'Traceback (most recent call last):\n  File "{path}", line 6, in <module>\n')
    assert f'File "{path}", line 3, in add' in err.traceback
    assert err.traceback.endswith("TypeError: unsupported operand type(s) for +: 'int' and 'str'\n")
    assert "runpy" not in err.traceback and "emulator" not in err.traceback  # Relay's frames are not the user's
    assert err.output == "before the error\n"
    log = (tmp_path / "rank0.log").read_text()
    assert log == "before the error\n" + err.traceback  # the log ends as a terminal would
    assert err.report() == log


def test_a_module_runs_as_python_m_runs_it(tmp_path):
    (tmp_path / "unit_pkg").mkdir()
    (tmp_path / "unit_pkg" / "__init__.py").write_text("")
    script(tmp_path / "unit_pkg", "train.py", 'import sys\nif __name__ == "__main__":\n    print(sys.argv)\n')
    saved = list(sys.path)
    run_main(Program(script="unit_pkg.train", argv=("--steps", "2"), module=True, log_dir=str(tmp_path),
                     cwd=str(tmp_path)), 1)  # found in the driver's directory, as python -m finds it
    assert (tmp_path / "rank1.log").read_text() == f"{[str(tmp_path / 'unit_pkg' / 'train.py'), '--steps', '2']}\n"
    assert sys.path == saved


def test_the_console_shows_the_chosen_ranks_whole_lines_once(tmp_path, capsys):
    (tmp_path / "rank0.log").write_text("one\ntw")
    (tmp_path / "rank1.log").write_text("not shown\n")
    tail = Tail(tmp_path, [0, 2])  # rank 2 has written nothing yet
    tail.poll()
    assert capsys.readouterr().out == "[rank 0] one\n"
    with open(tmp_path / "rank0.log", "a") as f:
        f.write("o\nthree")
    tail.poll()
    tail.close()  # the last line, unfinished, is shown at the end
    assert capsys.readouterr().out == "[rank 0] two\n[rank 0] three\n"


@pytest.mark.parametrize("text,ranks", [(None, [0]), ("all", [0, 1, 2, 3]), ("none", []), ("1,3", [1, 3]),
                                        ("0-2", [0, 1, 2])])
def test_ranks_to_show(text, ranks):
    assert parse_ranks(text, 4) == ranks


@pytest.mark.parametrize("text", ["4", "x", "-1", "1-9"])
def test_ranks_outside_the_devices_are_refused(text):
    with pytest.raises(ConfigError, match=f"ranks = {text!r}"):
        parse_ranks(text, 4)


def test_a_refused_run_leaves_no_results_folder(tmp_path):
    made = ResultsDir(tmp_path / "results", "refused")
    (made.path / "logs").mkdir()
    made.release()  # a run refused before it started: nothing written
    assert not (tmp_path / "results").exists()
    kept = ResultsDir(tmp_path / "results", "ran")
    kept.write_text("summary.json", "{}")
    kept.release()
    assert os.listdir(kept.path) == ["summary.json"]
    (tmp_path / "mine").mkdir()
    ResultsDir(tmp_path, "mine").release()  # a folder that was there before is the user's
    assert (tmp_path / "mine").is_dir()
