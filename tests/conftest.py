"""Helpers shared by the test packages (e.g. tensorboard_events) import by plain name; fixtures
shared by every package."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_HEAD = """
import os, sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(ray.get_runtime_context().gcs_address)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
sys.stdin.read()  # until the test module closes it
"""


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """One local Ray for a module's launcher runs that do not test how a launcher starts its own:
    each joins it with --address, as a driver of its own, as on a cluster (a fresh local Ray per
    launch costs seconds of CPU for its servers and dashboard). It runs in a process of its own,
    so this process is never a Ray driver (tests here check that a refusal came before Ray)."""
    address = tmp_path_factory.mktemp("ray-head") / "gcs_address"
    head = subprocess.Popen([sys.executable, "-c", _HEAD, str(address)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not address.exists() and head.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert address.exists(), f"the module's Ray did not start (exit code {head.poll()})"
        # It has Ray's token authentication (on by default for a new local Ray), and a driver
        # that joins a cluster by its address sends the token only when told to: the launchers
        # inherit this, whatever tests ran in this process before.
        saved = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            yield address.read_text()
        finally:
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE")
            else:
                os.environ["RAY_AUTH_MODE"] = saved
    finally:
        head.stdin.close()  # the head's driver exits, and its Ray with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
