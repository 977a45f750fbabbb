"""The Ray cluster a run or a study uses, and whether what it asks for can ever be placed on it.

`connect` starts a new local Ray bound to this machine's loopback address, or joins the cluster
the user names (`--address`, or RAY_ADDRESS, which `ray job submit` sets); it never attaches to
some other instance it happens to find. `check_placement` refuses, before anything waits, a
reservation that no node of a fixed-size cluster could ever hold (README, "Reliability").
"""

import math
import os
from pathlib import Path

from trainables.errors import TrainConfigError

# Ray's switch for a one-machine instance (its default on macOS and Windows): the node's address
# is 127.0.0.1, so every server the instance starts (GCS, raylet, agents, workers, metrics)
# listens on the loopback interface only.
_ONE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(address: str | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray that listens on
    127.0.0.1 only, with Ray's token authentication as configured (on by default). The
    dashboard, on 127.0.0.1 too, is started: Ray Train's clean-up of its workers queries it.
    Returns True when it started a local Ray."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, include_dashboard=True)
        except ConnectionError as exc:
            auth = os.environ.get("RAY_AUTH_MODE", "not set")
            raise TrainConfigError(f"cannot join the Ray cluster at {address} ({' '.join(str(exc).split())[:200]}); "
                                   "check the address, and for a cluster with token authentication (Ray's default) "
                                   f"set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
                                   f"(RAY_AUTH_MODE is {auth})") from None
        return False
    from ray._private import ray_constants

    # The processes Ray starts read the switch from the environment they inherit; this process
    # read it when Ray was imported, so its copy is set too. Both are put back once Ray runs: a
    # later connection to a real cluster from this process must see its true address.
    saved = os.environ.get(_ONE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_ONE_MACHINE], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(address="local", include_dashboard=True)
    finally:
        if saved[0] is None:
            os.environ.pop(_ONE_MACHINE, None)
        else:
            os.environ[_ONE_MACHINE] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
    return True


GROWS = "STUDY_CLUSTER_GROWS"  # =1: an autoscaler adds nodes that `can_grow` does not see


def can_grow() -> bool:
    """Whether an autoscaler may add nodes to the connected cluster: one started by Ray's cluster
    launcher (its bootstrap config on the head, where `ray job submit` runs the driver), one whose
    autoscaler published its node types (autoscaler v2, as on KubeRay with v2), or one the user
    says grows (STUDY_CLUSTER_GROWS=1: e.g. KubeRay's v1 autoscaler, which publishes none). A
    cluster that cannot grow is judged by the nodes it has."""
    if os.environ.get(GROWS) == "1" or Path("~/ray_bootstrap_config.yaml").expanduser().exists():
        return True
    from ray._private.state import state

    try:
        return bool(state.get_max_resources_from_cluster_config())
    except Exception:  # an older GCS without the autoscaler's state: judge by the nodes
        return False


def node_resources() -> list[dict]:
    """The CPUs and GPUs of each live node."""
    import ray

    return [{key: node["Resources"].get(key, 0.0) for key in ("CPU", "GPU")} for node in ray.nodes() if node["Alive"]]


def _describe(resources: dict) -> str:
    return ", ".join(f"{value:g} {key}" for key, value in resources.items() if value) or "nothing"


def check_placement(workers: int, per_worker: dict, others: dict[str, dict], nodes: list[dict],
                    local: bool = False) -> None:
    """Refuse what these nodes can never hold at once: `workers` reservations of `per_worker`
    ({"CPU": c, "GPU": g}) and one each of `others` (name -> reservation: a trial's driver, Ray
    Data's tasks). Only necessary conditions are checked (each reservation fits some node, the
    workers fit the nodes together, the totals fit the cluster), so nothing that could be placed
    is ever refused. TrainConfigError names what does not fit and what the nodes have (and, on a
    cluster not started here, how to say that an autoscaler will add nodes)."""
    grows = "" if local else f" (if an autoscaler will add nodes, set {GROWS}=1)"
    tolerance = 1e-6  # Ray counts resources in units of 1e-4
    listed = "; ".join(_describe(node) for node in nodes[:8]) + ("; ..." if len(nodes) > 8 else "")
    for name, need in {"each worker": per_worker, **others}.items():
        if not any(all(node.get(k, 0.0) + tolerance >= v for k, v in need.items()) for node in nodes):
            raise TrainConfigError(f"{name} reserves {_describe(need)}, more than any node of the cluster has "
                                   f"(its {len(nodes)} node(s): {listed}); reserve less, or add a larger node{grows}")

    def fits(node):
        return min((math.floor(node.get(k, 0.0) / v + tolerance) for k, v in per_worker.items() if v > 0),
                   default=workers)

    if sum(fits(node) for node in nodes) < workers:
        raise TrainConfigError(f"{workers} workers of {_describe(per_worker)} each do not fit on the cluster's "
                               f"nodes at once (its {len(nodes)} node(s): {listed}); use fewer workers, reserve "
                               f"less per worker, or add nodes{grows}")
    for key in ("CPU", "GPU"):
        total = workers * per_worker.get(key, 0.0) + sum(need.get(key, 0.0) for need in others.values())
        have = sum(node.get(key, 0.0) for node in nodes)
        if total > have + tolerance:
            parts = [f"{workers} worker(s)", *others]
            parts = " and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else parts[0]
            raise TrainConfigError(f"{parts} reserve {total:g} {key} together; the cluster has {have:g} "
                                   f"(its {len(nodes)} node(s): {listed}); reserve less, or add nodes{grows}")
