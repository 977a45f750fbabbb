"""What a fixed-size cluster can never hold is refused up front, and nothing it could hold is."""

import itertools

import pytest

from trainables.cluster import check_placement
from trainables.errors import TrainConfigError

ONE_CPU_NODES = [{"CPU": 1.0, "GPU": 0.0}] * 3  # the shape of a cluster of small nodes
DRIVER = {"a trial's driver": {"CPU": 0.2}}


def _placeable(workers, per_worker, others, nodes) -> bool:
    """Exhaustive placement, written independently of check_placement: try every node for every
    reservation (small cases only)."""
    items = [per_worker] * workers + list(others.values())
    for choice in itertools.product(range(len(nodes)), repeat=len(items)):
        left = [dict(node) for node in nodes]
        for item, n in zip(items, choice, strict=True):
            for key, value in item.items():
                left[n][key] = left[n].get(key, 0.0) - value
        if all(v >= -1e-9 for node in left for v in node.values()):
            return True
    return False


@pytest.mark.parametrize("workers, per_worker, others, nodes, message", [
    (2, {"CPU": 2.0, "GPU": 0.0}, DRIVER, ONE_CPU_NODES,
     "each worker reserves 2 CPU, more than any node of the cluster has (its 3 node(s): 1 CPU; 1 CPU; 1 CPU); "
     "reserve less, or add a larger node"),
    (1, {"CPU": 0.5, "GPU": 1.0}, {}, [{"CPU": 4.0, "GPU": 0.0}],
     "each worker reserves 0.5 CPU, 1 GPU, more than any node of the cluster has (its 1 node(s): 4 CPU); "
     "reserve less, or add a larger node"),
    (1, {"CPU": 1.0, "GPU": 0.0}, {"a trial's driver": {"CPU": 3.0}}, ONE_CPU_NODES,
     "a trial's driver reserves 3 CPU, more than any node of the cluster has"),
    (4, {"CPU": 0.6, "GPU": 0.0}, {}, ONE_CPU_NODES,
     "4 workers of 0.6 CPU each do not fit on the cluster's nodes at once (its 3 node(s): 1 CPU; 1 CPU; 1 CPU); "
     "use fewer workers, reserve less per worker, or add nodes"),
    (3, {"CPU": 1.0, "GPU": 0.0}, DRIVER, ONE_CPU_NODES,
     "3 worker(s) and a trial's driver reserve 3.2 CPU together; the cluster has 3"),
    (2, {"CPU": 1.0, "GPU": 1.0}, {}, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 0.0}],
     "2 workers of 1 CPU, 1 GPU each do not fit on the cluster's nodes at once"),
])
def test_what_can_never_be_placed_is_refused_in_one_line(workers, per_worker, others, nodes, message):
    assert not _placeable(workers, per_worker, others, nodes)
    with pytest.raises(TrainConfigError) as error:
        check_placement(workers, per_worker, others, nodes)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("workers, per_worker, others, nodes", [
    (2, {"CPU": 0.5, "GPU": 0.0}, {**DRIVER, "Ray Data's tasks": {"CPU": 0.25}}, ONE_CPU_NODES),
    (2, {"CPU": 1.0, "GPU": 0.0}, DRIVER, [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.2}]),
    (4, {"CPU": 0.25, "GPU": 0.25}, {}, [{"CPU": 1.0, "GPU": 1.0}]),  # four trials' worth on one GPU
    (3, {"CPU": 1.0, "GPU": 0.0}, {}, [{"CPU": 3.0}]),
    (1, {"CPU": 0.3333, "GPU": 0.0}, {}, [{"CPU": 0.3333}]),
])
def test_what_could_be_placed_is_never_refused(workers, per_worker, others, nodes):
    assert _placeable(workers, per_worker, others, nodes)
    check_placement(workers, per_worker, others, nodes)
