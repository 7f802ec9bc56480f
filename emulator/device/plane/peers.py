"""What the data planes share about peers: the error a device raises when it gives up on one."""

from __future__ import annotations


class PeerError(RuntimeError):
    """Device `device` gave up on a message to or from device `peer`."""

    def __init__(self, device: int, peer: int, detail: str):
        self.device, self.peer = device, peer
        super().__init__(f"device {device} gave up on device {peer} ({detail})")

    def __reduce__(self):  # travels back to the driver intact
        return PeerError, (self.device, self.peer, str(self).split("(", 1)[-1].rstrip(")"))
