"""Training on one device: the data-parallel training loop and its gradient buckets (loop.py), and
training under a parallelism plan (parallel.py) applied with PyTorch's own APIs (plans.py), expert
parallelism included (experts.py)."""
