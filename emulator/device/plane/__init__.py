"""The data plane: bytes between devices. Shared memory between devices on one node (shm.py over
shm_file.py's doorbells and rings, near.py's staging and point-to-point mailbox), gloo across nodes,
and the executor that runs a collective's schedule of sends and receives over them (transport.py).
A peer that goes away is a PeerError (peers.py). It knows nothing of the `relay` backend that
torch.distributed calls, of training or of fake tensors (pyproject's contracts check it)."""
