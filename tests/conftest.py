"""Test tiers: tests/unit (no Ray), tests/ray (one shared local Ray cluster per session),
tests/gpu (skipped without CUDA). One Ray start-up (~4 s) and one set of device actors
(~1.3 s each) serve the whole session."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import psutil
    import ray

    from relay.driver.session import start_local_ray
    if not ray.is_initialized():  # as `relay` starts its embedded Ray (loopback only)
        start_local_ray(num_cpus=psutil.cpu_count() or 2, object_store_memory=512 * 2**20, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster8(ray_session):
    """Eight h100 device actors, shared; tests `configure` the system and clock they need."""
    from relay import Cluster, System
    with Cluster(System("h100", 8)) as c:
        yield c


@pytest.fixture
def cluster(cluster8):
    """The shared actors, reset to 4 virtual h100 devices for each test (a test may configure
    up to 8, or another clock; the next test starts from this again)."""
    from relay import System
    cluster8.configure(System("h100", 4), clock="virtual")
    return cluster8
