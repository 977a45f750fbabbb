"""Helpers shared by the test packages (e.g. tensorboard_events) import by plain name; fixtures
shared by every package."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for a module's launcher runs that do not test how a launcher starts its own:
    each joins it with --address, as a driver of its own, as on a cluster (a fresh local Ray per
    launch costs seconds of CPU for its servers and dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
