"""Device side: what runs inside each emulated device's worker process (the stateless worker,
the transport to its peers, the jobs and the training loop it runs)."""
