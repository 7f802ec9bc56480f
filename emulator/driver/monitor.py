"""Watching the devices while they work: results, failures, and who is to blame.

A run fails promptly when one device fails: its process dies (Ray says so at once), it raises,
or it stops answering (it misses pings for timeout_s; the devices serve pings on a second thread
while they work). The devices waiting on a failed peer give up after timeout_s too, each naming
the peer it waited for (a PeerError). The blame then goes, in this order, to a device that died,
one that stopped answering, one that raised an error of its own, and otherwise to the peer that
the others were waiting for.
"""

from __future__ import annotations

import time

import ray

from relay.device.backend.scripts import ScriptError
from relay.device.plane.peers import PeerError

GRACE_S = 2.0  # after a first failure, how long to collect the others before blaming one


class DeviceError(RuntimeError):
    """A run that failed, as one value (built only by `failure`): `device` is the device to
    blame, `what` the job, `cause` why, `step` the training step it failed in (None outside
    training), `completed` what was measured before (a TrainResult of the steps every surviving
    device finished, or None), `details` each failed device's account ({device: text}: its
    cause, then for a script its last output and its traceback)."""

    def __init__(self, device: int, what: str, cause: str, step: int | None = None, completed=None,
                 details: dict | None = None, logs: dict | None = None):
        self.device, self.what, self.cause, self.step, self.completed = device, what, cause, step, completed
        self.details = details or {device: cause}
        self.logs = logs or {}  # {device: its whole output}, from failed devices on other nodes than the driver's
        super().__init__(device, what, cause, step, completed, details, logs)

    def __str__(self) -> str:
        where = f" in step {self.step}" if self.step is not None else ""
        return f"device {self.device} failed during {self.what}{where}: {self.cause}"

    def last_lines(self, n: int = 12) -> list[str]:
        """The end of the blamed device's account (a traceback's end, or argparse's message)."""
        return self.details.get(self.device, "").splitlines()[1:][-n:]

    def report(self) -> str:
        """Every failed device's account, the blamed one first (what error.txt holds)."""
        order = [self.device] + sorted(d for d in self.details if d != self.device)
        return f"{self}\n\n" + "\n\n".join(f"device {d}: {self.details[d].rstrip()}"
                                           for d in order if d in self.details) + "\n"


class Unresponsive(Exception):
    """A device that did not answer pings. `grace`: it only missed the one ping sent in the grace
    after another device failed (on a loaded host, a busy device can): weaker than an own error."""

    def __init__(self, text: str, grace: bool = False):
        super().__init__(text)
        self.grace = grace


class Failed(Exception):
    """What `gather` raises: every failure it saw, {device: exception}; `failure` turns it into
    the run's DeviceError once the caller knows what else to say (the step, the steps kept)."""

    def __init__(self, errors: dict):
        self.errors = errors
        super().__init__(errors)


def _cause(e: BaseException) -> tuple[str, BaseException]:
    """The useful line of a Ray error, and the exception inside it."""
    if isinstance(e, ray.exceptions.RayTaskError):
        inner = e.cause if getattr(e, "cause", None) is not None else e
        if isinstance(inner, ScriptError):  # a script's own failure names its exception and line
            return inner.summary[:500], inner
        lines = [x.strip() for x in str(inner).split("\n") if x.strip()]
        return f"{type(inner).__name__}: {lines[0] if lines else ''}"[:500], inner
    if isinstance(e, ray.exceptions.RayActorError):
        return "the device process died (" + str(e).split("\n")[0][:200] + ")", e
    return str(e).split("\n")[0][:500], e


def blame(errors: dict[int, BaseException]) -> tuple[int, str]:
    """The device to blame for a set of failures ({device: exception}), and why."""
    causes = {d: _cause(e) for d, e in errors.items()}

    def rank(inner) -> int:  # a dead process, a hung one, its own error, a ping missed in the grace
        if isinstance(inner, ray.exceptions.RayActorError):
            return 0
        if isinstance(inner, Unresponsive):
            return 3 if inner.grace else 1
        return 4 if isinstance(inner, PeerError) else 2

    d = min(causes, key=lambda d: (rank(causes[d][1]), d))
    if rank(causes[d][1]) < 4:
        return d, causes[d][0]
    # everyone who reported was waiting on someone: blame a device they waited for that did not
    # report itself (it is stuck), else the one most of them waited for
    named = [inner.peer for _, inner in causes.values()]
    silent = sorted(set(named) - set(causes))
    culprit = silent[0] if silent else max(set(named), key=named.count)
    text = next(t for t, inner in causes.values() if inner.peer == culprit)
    return culprit, f"it stopped answering: {text}"


def failure(errors: dict[int, BaseException], what: str, step: int | None = None,
            completed=None) -> DeviceError:
    """The one place a failed run's DeviceError is made."""
    device, cause = blame(errors)
    causes = {d: _cause(e) for d, e in errors.items()}
    details = {d: (cause if d == device else text) + "\n" + (inner.report() if isinstance(inner, ScriptError) else "")
               for d, (text, inner) in causes.items()}
    details.setdefault(device, cause + "\n")  # (blamed for its silence: it said nothing)
    logs = {d: inner.log for d, (_, inner) in causes.items() if isinstance(getattr(inner, "log", None), str)}
    return DeviceError(device, what, cause, step, completed, details, logs)


def gather(actors: list, refs: list, timeout_s: float, poll_s: float = 1.0, on_poll=None,
           ping: bool = True, deadline_s: float | None = None, wait=None, get=None) -> list:
    """The result of one call per device (refs[i] on actors[i]). Raises Failed as soon as a
    device fails as described above; on_poll() runs about every poll_s while waiting. Without
    `ping` (actors still starting cannot answer), a device that has not finished after
    deadline_s fails instead. `wait` and `get` default to ray.wait and ray.get (tests of the poll
    loop pass stand-ins)."""
    wait, get = wait or ray.wait, get or ray.get
    index = {ref: i for i, ref in enumerate(refs)}
    results, pending, errors, pings = [None] * len(refs), set(refs), {}, {}
    start = time.time()
    while pending and not errors:
        done, _ = wait(list(pending), num_returns=1, timeout=poll_s)
        for ref in done:
            pending.discard(ref)
            try:
                results[index[ref]] = get(ref)
            except ray.exceptions.RayError as e:
                errors[index[ref]] = e
        if errors:  # let the other devices report what they saw, and ping the rest, before blaming one
            asked = {index[ref]: actors[index[ref]].ping.remote() for ref in pending} if ping else {}
            late, _ = wait(list(pending), num_returns=len(pending), timeout=GRACE_S)
            for ref in late:
                try:
                    get(ref)
                except ray.exceptions.RayError as e:
                    errors[index[ref]] = e
            for d, reply in asked.items():
                if d not in errors and not wait([reply], timeout=0)[0]:
                    errors[d] = Unresponsive(f"it stopped answering (no reply to a ping within {GRACE_S:g} s, "
                                             "while the devices waiting on it gave up)", grace=True)
            break
        now = time.time()
        if not ping:
            if deadline_s is not None and now - start > deadline_s:
                errors.update({index[r]: Unresponsive(f"it did not finish within {deadline_s:g} s") for r in pending})
            continue
        for ref in pending:
            d = index[ref]
            # (not named `ping`: that is the flag above, and the next round would read it as False)
            sent = pings.get(d)
            if sent is not None and not wait([sent[0]], timeout=0)[0]:
                if now - sent[1] > timeout_s:
                    errors[d] = Unresponsive(f"it stopped answering (no reply to a ping for {timeout_s:g} s)")
                continue
            pings[d] = (actors[d].ping.remote(), now)
        if on_poll is not None:
            on_poll()
    if errors:
        raise Failed(errors)
    return results
