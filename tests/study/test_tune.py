"""Trial resources: what each kind of trial reserves on a given cluster."""

import time

import pytest
import ray

from study.config import StudyConfig, StudyError
from trainables.resources import Resources


def _study(**resources):
    return StudyConfig.from_dict({"search": {"max_concurrent": 2}, "resources": resources})


def trial_resources(config, cluster_cpus):
    return config.resources.for_trial(cluster_cpus, config.search.max_concurrent)


@pytest.mark.parametrize("cluster_cpus, expected", [(2, 1.0), (1, 0.5), (16, 1.0)])
def test_in_trial_trials_share_the_cpus_without_a_ray_data_reserve(cluster_cpus, expected):
    resources = trial_resources(_study(), cluster_cpus)
    assert resources == Resources(num_workers=1, use_gpu=False, gpus_per_worker=None, cpus_per_worker=expected)


def test_torch_trainer_trials_leave_one_cpu_for_ray_data_and_the_trial_driver():
    # (2 CPUs - 1 for Ray Data) / 2 trials - 0.2 for each trial's driver = 0.3, split over 1 worker.
    resources = trial_resources(_study(trainer="torch_trainer"), 2)
    assert resources == Resources(num_workers=1, use_gpu=False, gpus_per_worker=None, cpus_per_worker=0.3)
    # 2 workers per trial on 8 CPUs: (7 / 2 - 0.2) / 2 = 1.65, capped at one CPU each.
    resources = trial_resources(_study(num_workers=2), 8)
    assert resources == Resources(num_workers=2, use_gpu=False, gpus_per_worker=None, cpus_per_worker=1.0)


def test_an_explicit_worker_cpu_count_wins():
    assert trial_resources(_study(cpus_per_worker=0.25), 2).cpus_per_worker == 0.25


def test_a_run_alone_leaves_one_cpu_for_ray_data():
    # (2 CPUs - 1) over 2 workers; on one CPU, half a CPU between them.
    assert Resources(num_workers=2).sized(2).cpus_per_worker == 0.5
    assert Resources(num_workers=2).sized(1).cpus_per_worker == 0.25


def test_a_gpu_share_implies_use_gpu_and_is_what_each_trial_and_worker_reserves():
    config = _study(gpus_per_worker=0.25)
    resources = trial_resources(config, 8)
    assert resources == Resources(num_workers=1, use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=1.0)
    assert config.resources.reservation(resources) == {"CPU": 1.0, "GPU": 0.25}  # in-trial: the trial is the worker
    whole = _study(use_gpu=True, num_workers=2)
    resources = trial_resources(whole, 8)
    assert whole.resources.reservation(resources) == {"CPU": 0.2}  # a TorchTrainer's driver; its workers:
    scaling = resources.scaling_config()
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}


@pytest.mark.parametrize("resources, message", [
    ({"gpus_per_worker": 0.3}, "resources.gpus_per_worker must divide a GPU evenly (1, 0.5, 0.25, 0.2, ... 1/n), "
                               "got 0.3"),
    ({"gpus_per_worker": 2}, "resources.gpus_per_worker must be in (0, 1], got 2"),
    ({"gpus_per_worker": 0}, "resources.gpus_per_worker must be in (0, 1], got 0"),
    ({"gpus_per_worker": 0.5, "num_workers": 2}, "the workers of one trial would share a GPU, which NCCL refuses"),
])
def test_a_gpu_share_that_does_not_pack_is_refused(resources, message):
    with pytest.raises(StudyError) as error:
        _study(**resources)
    assert message in str(error.value)


@pytest.mark.ray
def test_four_trials_with_a_quarter_gpu_each_run_at_once_on_one_gpu(tmp_path):
    # Ray schedules by declared resources, so a cluster declaring one GPU shows what Tune does with
    # the study's reservations: each trial only finishes once all four are running together.
    from ray import tune

    config = _study(gpus_per_worker=0.25, cpus_per_worker=0.25)
    reservation = config.resources.reservation(trial_resources(config, 2))
    arrived = tmp_path / "arrived"
    arrived.mkdir()

    def trial(params):
        (arrived / str(params["i"])).touch()
        deadline = time.time() + 120
        while len(list(arrived.iterdir())) < 4 and time.time() < deadline:
            time.sleep(0.1)
        tune.report({"together": len(list(arrived.iterdir())), "gpus": ray.get_gpu_ids()})

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        tuner = tune.Tuner(tune.with_resources(trial, reservation), param_space={"i": tune.grid_search([0, 1, 2, 3])},
                           tune_config=tune.TuneConfig(max_concurrent_trials=4),
                           run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert [r.metrics["together"] for r in results] == [4, 4, 4, 4]
    assert all(r.metrics["gpus"] == [0] for r in results)  # all on the one GPU


def test_a_resume_refuses_tune_state_that_a_storage_failure_left_empty_or_cut_short(tmp_path):
    import json

    from study.tune_files import damaged_state

    (tmp_path / "tuner.pkl").write_bytes(b"pickled")
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    (tmp_path / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"pickled")
    assert damaged_state(str(tmp_path)) is None
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_data": [["{\\"trial')  # cut short
    assert damaged_state(str(tmp_path)) == str(tmp_path / "experiment_state-2026-01-02_00-00-00.json")
    (tmp_path / "tuner.pkl").write_bytes(b"")
    assert damaged_state(f"file://{tmp_path}") == f"file://{tmp_path}/tuner.pkl"


def test_an_experiment_continues_only_where_tune_recorded_a_state(tmp_path):
    # A driver stopped before Tune's first save leaves only tuner.pkl: nothing of it ran, and
    # study_tuner builds it anew instead of letting Tune restart it with another plan.
    from study.tune_files import recorded_a_state

    assert not recorded_a_state(str(tmp_path / "never-started"))
    (tmp_path / "tuner.pkl").write_bytes(b"pickled")
    assert not recorded_a_state(str(tmp_path))
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert recorded_a_state(str(tmp_path)) and recorded_a_state(f"file://{tmp_path}")
