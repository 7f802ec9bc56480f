"""A user's script (or module, `relay launch -m`) run as `__main__` on one device: its output
kept in a log of the device's own, its failure told with its own traceback.

Output: while the script runs, the device's stdout and stderr, Python's (sys.stdout) and the C
level's (fd 1 and 2) alike, go line by line to <log_dir>/rank<N>.log, which the driver reads as
it grows (launch/script.py shows the chosen ranks' lines). A device on another node than the
driver cannot reach that folder: it writes a temporary file and sends the text back instead, with
its result or, when it fails, on its exception (`log`: DeviceError.logs, which `relay launch` writes).

Failure: an exception becomes a ScriptError holding the traceback from the script's own frames
down (runpy's and Relay's dropped) and the device's last lines of output; an exit with a non-zero
status (argparse's, sys.exit(2)) holds the output, where its message is. The traceback is also
appended to the log, where Python would have printed it.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

from relay.device.plane.peers import PeerError

OUTPUT_LINES = 40  # a failed device's last lines of output kept in its error
_RELAY_DIR = str(Path(__file__).resolve().parents[2])  # relay (emulator/): frames a user did not write
_PYTHON_DIRS = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


class ScriptError(RuntimeError):
    """The script raised, or exited with a non-zero status, on a device. `summary`: the one line
    the run's error shows (e.g. 'TypeError: ... (at train.py:12)'); `traceback`: the script's
    ('' for an exit); `output`: the device's last lines before it failed."""

    def __init__(self, summary: str, traceback: str = "", output: str = ""):
        super().__init__(summary)
        self.summary, self.traceback, self.output = summary, traceback, output

    def report(self) -> str:
        """What the device printed last, then its traceback: the end of a terminal's view."""
        return self.output + self.traceback


def run_main(program, device: int) -> str | None:
    """Run the program's script or module as `__main__` on `device`, its output kept (when
    program.log_dir is set). Returns the output's text when it could not go to log_dir (a
    device on another node than the driver), else None."""
    if program.log_dir is None:
        _run(program)
        return None
    here = program.node is None or program.node == _node_id()
    if here:
        path = os.path.join(program.log_dir, f"rank{device}.log")
    else:
        fd, path = tempfile.mkstemp(prefix=f"relay-rank{device}-", suffix=".log")
        os.close(fd)
    text = None
    try:
        with _output_to(path):
            _run(program)
    except BaseException as e:
        if isinstance(e, ScriptError):
            e.output = _last_lines(path, OUTPUT_LINES)
            with open(path, "a", encoding="utf-8") as log:
                log.write(e.traceback)
        if not here:  # the whole output goes back with the error (the driver writes the log)
            with contextlib.suppress(AttributeError):
                e.log = Path(path).read_text(encoding="utf-8", errors="replace")
        raise
    else:
        text = None if here else Path(path).read_text(encoding="utf-8", errors="replace")
    finally:
        if not here:
            os.unlink(path)
    return text


def _node_id() -> str:
    import ray  # (only for a run that names the driver's node)
    return ray.get_runtime_context().get_node_id()


@contextmanager
def _output_to(path: str):
    """sys.stdout, sys.stderr and fd 1 and 2 into `path` (line-buffered), restored after."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log = open(path, "w", buffering=1, encoding="utf-8", errors="replace")
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        log.close()


def _last_lines(path: str, n: int) -> str:
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    return "".join(lines[-n:])


def _run(program) -> None:
    """runpy, as `python script.py args` or `python -m module args` would run it."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [program.script, *program.argv]  # (run_module puts the module's file first)
    try:
        if program.module:
            sys.path.insert(0, program.cwd or os.getcwd())  # python -m: the current directory first
            runpy.run_module(program.script, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(program.script)))
            runpy.run_path(program.script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise _exit_error(program.script, e.code) from None
    except PeerError:  # a peer failed: the driver blames that one (monitor.py), so pass it on as it is
        raise
    except Exception as e:
        raise _script_error(e) from None
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _exit_error(name: str, code) -> ScriptError:
    if not isinstance(code, int):  # sys.exit("message"): Python prints it and exits with 1
        print(code, file=sys.stderr, flush=True)
        return ScriptError(f"{name} exited with status 1: {str(code)[:300]}")
    return ScriptError(f"{name} exited with status {code}")


def _script_error(e: Exception) -> ScriptError:
    """The exception as the script's: its traceback without the frames above the script's own
    (the worker, run_program, runpy), and a summary naming the innermost frame of the user's code."""
    tb = e.__traceback__
    while tb is not None and _not_users(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    frames = traceback.extract_tb(tb)
    text = "".join(traceback.TracebackException(type(e), e, tb).format())
    lines = [x.strip() for x in str(e).split("\n") if x.strip()]
    summary = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    own = [f for f in frames if not f.filename.startswith(_PYTHON_DIRS)] or frames[:1]
    if own:
        summary += f" (at {own[-1].filename}:{own[-1].lineno})"
    return ScriptError(summary, text)


def _not_users(filename: str) -> bool:
    return filename == runpy.__file__ or filename.startswith(_RELAY_DIR) or filename.startswith("<frozen runpy")
