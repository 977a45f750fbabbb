"""Trial resources: what each kind of trial reserves on a given cluster."""

import pytest

from study.config import from_dict
from study.tune import trial_resources


def _study(**resources):
    return from_dict({"search": {"max_concurrent": 2}, "resources": resources})


@pytest.mark.parametrize("cluster_cpus, expected", [(2, 1.0), (1, 0.5), (16, 1.0)])
def test_in_trial_trials_share_the_cpus_without_a_ray_data_reserve(cluster_cpus, expected):
    resources = trial_resources(_study(), cluster_cpus)
    assert resources == {"num_workers": 1, "use_gpu": False, "cpus_per_worker": expected}


def test_torch_trainer_trials_leave_one_cpu_for_ray_data_and_the_trial_driver():
    # (2 CPUs - 1 for Ray Data) / 2 trials - 0.2 for each trial's driver = 0.3, split over 1 worker.
    resources = trial_resources(_study(trainer="torch_trainer"), 2)
    assert resources == {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.3}
    # 2 workers per trial on 8 CPUs: (7 / 2 - 0.2) / 2 = 1.65, capped at one CPU each.
    resources = trial_resources(_study(num_workers=2), 8)
    assert resources == {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1.0}


def test_an_explicit_worker_cpu_count_wins():
    assert trial_resources(_study(cpus_per_worker=0.25), 2)["cpus_per_worker"] == 0.25


def test_a_resume_refuses_tune_state_that_a_storage_failure_left_empty_or_cut_short(tmp_path):
    import json

    from study.tune import damaged_state

    (tmp_path / "tuner.pkl").write_bytes(b"pickled")
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    (tmp_path / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"pickled")
    assert damaged_state(str(tmp_path)) is None
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_data": [["{\\"trial')  # cut short
    assert damaged_state(str(tmp_path)) == str(tmp_path / "experiment_state-2026-01-02_00-00-00.json")
    (tmp_path / "tuner.pkl").write_bytes(b"")
    assert damaged_state(f"file://{tmp_path}") == f"file://{tmp_path}/tuner.pkl"
