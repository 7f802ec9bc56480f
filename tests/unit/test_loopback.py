"""Messages a device sends itself (device/backend/loopback.py): matched by group and tag in posting
order, copied locally; a receive waiting for its send fails with it when the sizes differ."""

import pytest
import torch

from relay.device.backend.engine import Work
from relay.device.backend.loopback import Loopback

KEY = ((0, 1), 3)  # (group members, tag)


def test_sends_and_receives_to_itself_match_in_posting_order_either_way_round():
    box, first, second = Loopback(), torch.zeros(2), torch.zeros(2)
    waiting = Work(None, [first])
    assert box.post("recv", KEY, first, 1.0, waiting) is None  # posted before its send: it waits
    assert box.post("send", KEY, torch.ones(2), 2.0, None, payload=torch.ones(2)) == 2.0
    assert waiting.is_success() and waiting.end == 2.0 and first.tolist() == [1.0, 1.0]
    assert box.post("send", KEY, torch.ones(2), 3.0, None, payload=torch.full((2,), 5.0)) == 3.0
    assert box.post("send", (KEY[0], 4), torch.ones(2), 3.0, None, payload=torch.full((2,), 7.0)) == 3.0
    assert box.post("recv", KEY, second, 4.0, Work(None, [second])) == 4.0  # its tag's, not tag 4's
    assert second.tolist() == [5.0, 5.0]


def test_a_waiting_receive_fails_at_once_when_its_send_has_another_size():
    box, into = Loopback(), torch.zeros(2)
    waiting = Work(None, [into])
    box.post("recv", KEY, into, 1.0, waiting)
    with pytest.raises(RuntimeError, match="sizes differ"):
        box.post("send", KEY, torch.ones(3), 2.0, None, payload=torch.ones(3))
    assert waiting.is_completed() and "sizes differ" in str(waiting.exception())  # no wait for a timeout
