"""The `relay` torch.distributed backend on one device: the ProcessGroup torch calls (group.py),
the communication engine and its lanes (engine.py), a group's collective and the one code path of
collectives on a device (collective.py), the throttle waiting for communication an op reads
(comm_throttle.py), and a user's torch.distributed program run under torchrun's environment
(program.py). It moves bytes through the plane below it and charges the emulated fabric's time."""
