"""Device side: what runs inside each emulated device's worker process. The stateless worker and
its jobs (worker.py, job.py, jobs.py) sit on four rooms, top to bottom: training/ (the training
loop and parallelism plans on one device), fake/ (fake-tensor steps and shared runs' recording),
backend/ (the `relay` torch.distributed backend) and plane/ (the bytes between devices)."""
