"""Driver side: what runs in the user's process (the Ray session and the pool of workers, failure
monitoring, training results, experiments)."""
