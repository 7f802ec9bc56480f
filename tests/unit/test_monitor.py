"""The failure monitor's poll loop (emulator/driver/monitor.py) without Ray: gather() takes its wait and
get functions as arguments, so a scripted stand-in for the devices drives it here. The unit under
test is the loop itself (when it pings, when it polls, whom it blames); tests/ray covers it with
real actors."""

import pytest
import ray

from relay.device.plane.peers import PeerError
from relay.driver.monitor import Failed, Unresponsive, blame, failure, gather


class Ref:
    """A stand-in object ref: ready from `ready_at` (a poll round), holding a value or an error."""

    def __init__(self, ready_at: float = 0, value=None, error: BaseException | None = None):
        self.ready_at, self.value, self.error = ready_at, value, error


class Devices:
    """Stand-in device handles and a scripted clock of poll rounds: each wait() with a timeout is
    one round; a device's call finishes at its round; pings are answered unless the device hangs."""

    def __init__(self, finish_at: list, hung=(), errors=None):
        self.round = 0
        self.hung = set(hung)
        self.pings = [0] * len(finish_at)
        self.refs = [Ref(t, value=d, error=(errors or {}).get(d)) for d, t in enumerate(finish_at)]
        self.actors = [self._actor(d) for d in range(len(finish_at))]

    def _actor(self, d):
        devices = self

        class Ping:
            @staticmethod
            def remote():
                devices.pings[d] += 1
                return Ref(float("inf") if d in devices.hung else devices.round)

        return type("Actor", (), {"ping": Ping})()

    def wait(self, refs, num_returns=1, timeout=None):
        if timeout:  # a blocking wait: one poll round passes
            self.round += 1
            assert self.round < 1000, "gather never returned"  # instead of hanging
        ready = [r for r in refs if r.ready_at <= self.round]
        return ready[:num_returns] if timeout else ready, [r for r in refs if r not in ready]

    @staticmethod
    def get(ref):
        if ref.error is not None:  # as Ray delivers a device's exception: wrapped
            raise ray.exceptions.RayTaskError("train", "", ref.error).as_instanceof_cause()
        return ref.value


def test_gather_keeps_polling_and_pinging_every_round():
    dev = Devices([10, 10, 10])
    polls = []
    out = gather(dev.actors, dev.refs, timeout_s=1e9, poll_s=1, on_poll=lambda: polls.append(dev.round),
                 wait=dev.wait, get=dev.get)
    assert out == [0, 1, 2]
    # on_poll ran every round until the results came in (main ran it once: `ping` was shadowed)
    assert polls[:9] == list(range(1, 10))
    assert all(n >= 8 for n in dev.pings), dev.pings


def test_gather_blames_a_device_that_stops_answering_pings(monkeypatch):
    from relay.driver import monitor
    clock = iter(range(0, 10**6, 10))  # 10 s of host time per round
    monkeypatch.setattr(monitor.time, "time", lambda: next(clock))
    dev = Devices([float("inf")] * 3, hung={1})
    with pytest.raises(Failed) as e:
        gather(dev.actors, dev.refs, timeout_s=25, poll_s=1, wait=dev.wait, get=dev.get)
    err = failure(e.value.errors, "training")
    assert err.device == 1 and "no reply to a ping for 25 s" in err.cause


def test_gather_pings_the_others_after_a_first_failure_and_blames_the_silent_one():
    # device 0 gave up on device 2; device 2 never finishes nor answers: the grace-period ping
    # finds it silent, and the blame goes to it rather than to the device that reported
    dev = Devices([1, float("inf"), float("inf")], hung={2},
                  errors={0: PeerError(0, 2, "no message within 10 s")})
    dev.refs[1].ready_at = 2  # device 1 reports within the grace period, also waiting on 2
    dev.refs[1].error = PeerError(1, 2, "no message within 10 s")
    with pytest.raises(Failed) as e:
        gather(dev.actors, dev.refs, timeout_s=1e9, poll_s=1, wait=dev.wait, get=dev.get)
    err = failure(e.value.errors, "training")
    assert err.device == 2 and "stopped answering" in err.cause


def test_blame_order():
    died = ray.exceptions.RayActorError()
    assert blame({0: PeerError(0, 3, "x"), 2: died})[0] == 2
    assert blame({0: PeerError(0, 3, "x"), 1: Unresponsive("hung")})[0] == 1
    assert blame({0: PeerError(0, 3, "x"), 2: RuntimeError("boom")})[0] == 2
    # a device that only missed the grace ping (busy on a loaded host) is not blamed over an own error
    assert blame({1: Unresponsive("late", grace=True), 5: RuntimeError("boom")})[0] == 5
    assert blame({1: Unresponsive("hung"), 5: RuntimeError("boom")})[0] == 1
    assert blame({0: PeerError(0, 3, "x"), 1: Unresponsive("late", grace=True)})[0] == 1
    # everyone waited on someone: a named device that did not report is stuck
    assert blame({0: PeerError(0, 3, "x"), 1: PeerError(1, 0, "y")})[0] == 3
    # all named devices reported: the one most of them waited for
    assert blame({0: PeerError(0, 1, "x"), 1: PeerError(1, 2, "y"), 2: PeerError(2, 1, "z")})[0] == 1
