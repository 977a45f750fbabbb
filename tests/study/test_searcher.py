"""Specification of how the searcher hears how trials ended (study/searcher.py): a trial ASHA stopped
before its planned steps is STOPPED_EARLY in the report and PRUNED in the Optuna study kept in a
database, with the value it was stopped at; a finished one is TERMINATED and COMPLETE; one that
diverged is ERROR and FAIL."""

import csv
import subprocess
import sys

import optuna
import pytest
import yaml

METRIC = "valid_balanced_accuracy_median_10"
STUDY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": 40, "eval_every": 20, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    # One trial learns; the next barely moves from its initial weights (the same seed), so at ASHA's
    # one rung (the first evaluation) it is behind the first and stopped there; the last diverges.
    "space": {"lr": {"choice": [0.03, 1.0e-9, 1.0e6]}},
    "search": {"algorithm": "optuna", "num_samples": 3, "max_concurrent": 1, "seed": 0,
               "points_to_evaluate": [{"label": "learns", "lr": 0.03}, {"label": "stands still", "lr": 1.0e-9},
                                      {"label": "diverges", "lr": 1.0e6}],
               "storage": "sqlite:///{study}/optuna.db"},
    "scheduler": {"name": "asha", "grace_period": 1},
}


@pytest.mark.ray
def test_a_trial_asha_stopped_early_is_stopped_early_in_the_report_and_pruned_in_optuna(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    done = subprocess.run([sys.executable, "-m", "study.launch", "--config", str(config), "--storage",
                           str(tmp_path / "studies"), "--name", "asha", "--data-root", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    study = tmp_path / "studies" / "asha"
    with open(study / "report.csv") as f:
        rows = {row["label"]: row for row in csv.DictReader(f)}
    learns, still = rows["learns"], rows["stands still"]
    assert (learns["status"], learns["steps"]) == ("TERMINATED", "40")
    assert (still["status"], still["steps"]) == ("STOPPED_EARLY at step 20 of 40", "20")
    assert rows["diverges"]["status"] == "ERROR" and rows["diverges"]["error"].startswith("training diverged")
    text = (study / "report.md").read_text()
    assert "- Trials: 3: 1 TERMINATED, 1 STOPPED_EARLY, 1 ERROR\n" in text
    assert "| STOPPED_EARLY at step 20 of 40 |" in text
    trials = optuna.load_study(study_name="asha", storage=f"sqlite:///{study}/optuna.db").trials
    states = {trial.params["lr"]: (trial.state, trial.value) for trial in trials}
    assert states == {0.03: (optuna.trial.TrialState.COMPLETE, pytest.approx(float(learns[METRIC]))),
                      1.0e-9: (optuna.trial.TrialState.PRUNED, pytest.approx(float(still[METRIC]))),
                      1.0e6: (optuna.trial.TrialState.FAIL, None)}


def test_a_searcher_pickled_before_its_newer_attributes_existed_resumes_with_them_unknown():
    import pickle

    from study.searcher import FixedPointsFirst, NothingToSearch

    searcher = FixedPointsFirst(NothingToSearch(metric="m", mode="max"), [{"lr": 0.1}], "m", "max",
                                steps=100, constants={"stage": "search"})
    old = pickle.loads(pickle.dumps(searcher))
    for name in ("start_labels", "constants", "steps", "planned", "total", "known"):  # what earlier versions lacked
        del old.__dict__[name]
    resumed = pickle.loads(pickle.dumps(old))
    assert resumed.get_state() == {"pending": [{"lr": 0.1}], "fixed_trials": set(), "start_labels": [],
                                   "steps": None, "planned": {}, "constants": {}, "total": None, "known": 0}
    assert resumed.suggest("t1") == {"label": "fixed", "lr": 0.1}
    assert resumed.suggest("t2") == FixedPointsFirst.FINISHED


# --- a resumed search whose saved state is older than the trial list -------------------------------

class Ran:
    """What the search reads of one of Tune's trials."""

    def __init__(self, trial_id, config, finished=True):
        self.trial_id, self.config, self.finished = trial_id, config, finished

    def is_finished(self):
        return self.finished


def test_a_grid_resumed_from_a_state_older_than_its_trials_neither_waits_nor_runs_a_point_again():
    from ray import cloudpickle, tune

    from study.searcher import Grid, reconcile_search

    grid = Grid(max_concurrent=1)
    grid.add_configurations([tune.Experiment("grid", lambda config: None,
                                             config={"seed": tune.grid_search([0, 1, 2]), "label": "grid"})])
    first = grid.next_trial()
    assert first.config == {"seed": 0, "label": "grid"} and grid.next_trial() is None  # one at a time
    saved = cloudpickle.dumps(grid.get_state())  # as Tune saves it, just before the driver was killed
    ran = [Ran(first.trial_id, first.config), Ran("b", {"seed": 1, "label": "grid"}),
           Ran("c", {"seed": 2, "label": "grid"}, finished=False)]  # all three in the newer trial list

    resumed = Grid(max_concurrent=1)
    resumed.set_state(cloudpickle.loads(saved))
    assert resumed.next_trial() is None and not resumed.is_finished()  # Tune's own: waits on the first forever
    resumed = Grid(max_concurrent=1)
    resumed.set_state(cloudpickle.loads(saved))
    reconcile_search(resumed, ran)
    assert resumed.next_trial() is None and resumed.is_finished()  # seeds 1 and 2 ran, or run: nothing again


def test_fixed_points_resumed_from_a_state_older_than_the_trials_are_not_run_again_and_the_total_holds():
    import pickle

    from ray.tune.search import ConcurrencyLimiter, Searcher

    from study.searcher import FixedPointsFirst, reconcile_search

    class Samples(Searcher):
        def suggest(self, trial_id):
            return {"lr": 0.05}

    def search():
        return ConcurrencyLimiter(FixedPointsFirst(Samples(metric="m", mode="max"), [{"lr": 0.1}, {"lr": 0.2}], "m",
                                                   "max", total=3), max_concurrent=1)

    limiter = search()
    assert limiter.suggest("t1") == {"label": "fixed", "lr": 0.1} and limiter.suggest("t2") is None
    saved = pickle.dumps((limiter.get_state(), limiter.searcher.get_state()))
    ran = [Ran("t1", {"label": "fixed", "lr": 0.1}), Ran("t2", {"label": "fixed", "lr": 0.2}),
           Ran("t3", {"label": "search", "lr": 0.05}, finished=False)]

    resumed = search()
    state, inner = pickle.loads(saved)
    resumed.set_state(state)
    resumed.searcher.set_state(inner)
    reconcile_search(resumed, ran)
    assert resumed.live_trials == set() and resumed.searcher.pending == []
    assert resumed.suggest("t4") == Searcher.FINISHED  # three trials planned, three in Tune's list
