"""Compare studies: checks before Ray, the verdict's numbers, and a tiny one through both stages
with the driver killed between them."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from study.launch import main
from study.report.comparison import build_comparison
from study.report.trials import TrialRecord
from trainables.metrics import pack_classes

TINY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2},
    "compare": {"methods": ["fixmatch", "freematch"], "trials_per_method": 2, "confirm_seeds": [100, 101]},
    "search": {"max_concurrent": 2},
    "scheduler": {"name": "none"},
}


def _config(tmp_path, **sections) -> str:
    raw = {**json.loads(json.dumps(TINY)), **sections}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("sections, message", [
    ({"compare": {**TINY["compare"], "confirm_seeds": [0, 1]}},
     "compare.confirm_seeds: 0 is the search's seed (train.seed); confirmation seeds must be fresh"),
    ({"search": {"algorithm": "grid"}}, "a compare study searches each method with Optuna"),
    ({"search": {"fixed_points": [{"label": "x", "confidence": 0.9}]}},
     "a compare study runs each method's reference defaults first and the same budget for every method"),
    ({"compare": {**TINY["compare"], "methods": ["fixmatch", "nomatch"]}}, "unknown method or variant 'nomatch'"),
    ({"compare": {**TINY["compare"], "methods": ["cadr", "cadr"]}}, "compare.methods names a method twice"),
    ({"space": {"ema_m": {"uniform": [0.9, 0.99]}}},
     "compare.methods fixmatch: space parameter ema_m=0.9 would fail in training with variant fixmatch: ema_m: not an "
     "option of method fixmatch"),
    ({"compare": {**TINY["compare"], "unlabeled": ["uniform", "sideways"]}},
     "compare.unlabeled: unknown shape 'sideways' (known: consistent, uniform, reversed, middle, head-tail)"),
    ({"compare": {**TINY["compare"], "unlabeled": ["uniform", "reversed"]}},
     "compare.unlabeled: stage 1 searches on the base split, so split.unlabeled must be one of uniform, reversed "
     "(got None)"),
    ({"method_options": {"acr": {"epoch_steps": 0}}}, "method_options.acr: epoch_steps must be >= 1, got 0"),
    ({"method_options": {"acr": {"cai_beta": 0.5}}}, "method_options.acr: cai_beta: not an option of method acr"),
    ({"method_options": {"nomatch": {}}}, "method_options.nomatch: method must be one of"),
])
def test_a_compare_study_that_cannot_be_fair_fails_before_ray(tmp_path, capsys, sections, message):
    assert main(["--config", _config(tmp_path, **sections), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_plan_prints_the_same_budget_for_every_method(tmp_path, capsys):
    from data_prep.convert import prepare

    prepare("digits", tmp_path / "data")
    assert main(["--config", _config(tmp_path), "--storage", str(tmp_path / "studies"), "--data-root",
                 str(tmp_path / "data"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("compare 2 methods (fixmatch, freematch), each with the same budget: stage 1 2 trials (optuna, its "
            "reference defaults first) of 20 steps, scheduler none, split digits_LT_10.1@20-100; stage 2 its winner "
            "and its defaults with seeds 100, 101: 12 trials in all") in out
    assert "  freematch searches: lr log-uniform [0.01, 0.1]; wu log-uniform [0.3, 3]; 1-ema_m log-uniform " in out


def test_stage_two_on_unlabeled_shapes_runs_each_winner_on_every_shape_and_seed_and_no_defaults():
    from study.checks import planned_trials
    from study.compare import confirmation_points
    from study.config import StudyConfig
    from study.splits import split_parameters

    raw = {**json.loads(json.dumps(TINY)), "method_options": {"acr": {"epoch_steps": 25}}}
    raw["split"] |= {"unlabeled": "consistent", "n_max_u": 40}
    raw["compare"] |= {"methods": ["cadr", "acr"], "confirm_defaults": False, "unlabeled": ["consistent", "reversed"]}
    config = StudyConfig.from_dict(raw)
    winners = {"cadr": {"params": {"lr": 0.05}}, "acr": {"params": {"tau1": 1.5}}}
    points = confirmation_points(config, {"cadr": {}, "acr": {}}, winners)
    assert points == [{"label": f"{method} tuned {shape}", "stage": "confirm", "config": "tuned", "variant": method,
                       "unlabeled": shape, "seed": seed, **winners[method]["params"]}
                      for method in ("cadr", "acr") for shape in ("consistent", "reversed") for seed in (100, 101)]
    assert planned_trials(config, {}) == 2 * (2 + 2 * 2)
    assert split_parameters(config, {}) == [{"unlabeled": "consistent"}, {"unlabeled": "reversed"}]
    # Each point trains on its shape's split, ACR with the study's epoch length, CADR untouched by it.
    acr = config.train_config(points[-1])
    assert (acr.split, acr.method.options["epoch_steps"], acr.method.options["tau1"]) == \
        ("digits_LT_10_reversed_u10_m40.1@20-100", 25, 1.5)
    assert config.train_config(points[0]).split == "digits_LT_10_consistent_u10_m40.1@20-100"
    assert "epoch_steps" not in config.train_config(points[0]).method.options


# --- the verdict's numbers ------------------------------------------------------------------------

METRIC = "valid_balanced_accuracy_median_10"
LABELS = np.array([0, 0, 1, 1, 2, 2, 2, 1])


def _trial(trial_id, method, stage, valid, test_gm, *, config="", seed=0, predictions=None, label="search"):
    params = {"variant": method, "stage": stage, "label": label, "seed": seed, **({"config": config} if config else {})}
    result = {METRIC: valid, "test_gm_median_10": test_gm, "test_accuracy_median_10": test_gm,
              "test_balanced_accuracy_median_10": test_gm}
    if predictions is not None:
        result |= {"valid_predictions": pack_classes(predictions), "valid_labels": pack_classes(LABELS)}
    return TrialRecord(trial_id, params, "TERMINATED", [result])


def test_the_leader_is_chosen_on_validation_and_paired_with_each_method_by_seed():
    right, wrong = LABELS, np.zeros_like(LABELS)
    trials = [
        _trial("a1", "cadr", "search", 0.90, 0.5, predictions=right, label="defaults"),
        _trial("a2", "cadr", "search", 0.40, 0.9, predictions=wrong),
        _trial("b1", "flexmatch", "search", 0.70, 0.5, predictions=right, label="defaults"),
        # On validation CADR leads; on test FlexMatch would: the test split never picks.
        *[_trial(f"c{s}", "cadr", "confirm", v, g, config="tuned", seed=s, predictions=right)
          for s, v, g in ((100, 0.9, 0.80), (101, 0.8, 0.84), (102, 0.85, 0.83))],
        *[_trial(f"d{s}", "flexmatch", "confirm", v, g, config="tuned", seed=s, predictions=wrong)
          for s, v, g in ((100, 0.6, 0.90), (101, 0.5, 0.86), (102, 0.55, 0.85))],
        *[_trial(f"e{s}", "cadr", "confirm", 0.7, 0.7, config="defaults", seed=s) for s in (100, 101, 102)],
    ]
    comparison = build_comparison(trials, ["cadr", "flexmatch"], METRIC, "max", [100, 101, 102])
    assert [m.name for m in comparison.methods] == ["cadr", "flexmatch"]
    assert comparison.leader.winner.trial_id == "a1"
    differences = [0.80 - 0.90, 0.84 - 0.86, 0.83 - 0.85]
    paired = comparison.differences["flexmatch"]["test_gm_median_10"]
    assert paired.interval.mean == pytest.approx(sum(differences) / 3, abs=1e-12)
    assert comparison.leader.intervals["defaults"]["test_gm_median_10"].mean == pytest.approx(0.7)
    # The stored predictions: CADR's winner is right on every row, its other trial on class 0's only.
    assert comparison.leader.selection_stability == 1.0
    assert comparison.leader_stability == 1.0
    assert math.isclose(comparison.by_name("flexmatch").selection_stability, 1.0)


def test_every_pair_of_methods_gets_its_paired_difference_on_the_test_metric_with_its_interval():
    from scipy import stats

    gm = {"cadr": (0.80, 0.84, 0.83), "flexmatch": (0.90, 0.86, 0.85), "fixmatch": (0.70, 0.75, 0.71)}
    trials = [_trial(f"{m}{s}", m, "confirm", 0.5 + i / 10, g, config="tuned", seed=s)
              for i, (m, values) in enumerate(gm.items()) for s, g in zip((100, 101, 102), values)]
    comparison = build_comparison(trials, list(gm), METRIC, "max", [100, 101, 102])
    assert set(comparison.pairwise) == {(a, b) for a in gm for b in gm if a != b}
    for (a, b), paired in comparison.pairwise.items():
        d = [x - y for x, y in zip(gm[a], gm[b])]
        mean, sem = sum(d) / 3, math.sqrt(sum((v - sum(d) / 3) ** 2 for v in d) / 2 / 3)
        half = stats.t.ppf(0.975, 2) * sem
        assert paired.interval.mean == pytest.approx(mean, abs=1e-12)
        assert (paired.interval.low, paired.interval.high) == pytest.approx((mean - half, mean + half), abs=1e-12)
        assert paired.p_value == pytest.approx(stats.ttest_rel(gm[a], gm[b]).pvalue, abs=1e-12)


def test_among_stage_one_trials_tied_on_validation_the_winner_is_the_one_the_study_confirmed():
    trials = [
        _trial("a1", "cadr", "search", 0.90, 0.5, label="defaults"),
        _trial("a2", "cadr", "search", 0.95, 0.6),
        _trial("a3", "cadr", "search", 0.95, 0.7),  # tied with a2; compare.json named this one
        *[_trial(f"c{s}", "cadr", "confirm", 0.9, 0.8, config="tuned", seed=s) for s in (100, 101)],
    ]
    confirmed = build_comparison(trials, ["cadr"], METRIC, "max", [100, 101], {"cadr": "a3"})
    assert confirmed.leader.winner.trial_id == "a3"
    unrecorded = build_comparison(trials, ["cadr"], METRIC, "max", [100, 101], {})  # before compare.json
    assert unrecorded.leader.winner.trial_id in ("a2", "a3")


def test_across_shapes_each_shape_leads_on_validation_and_every_method_is_paired_with_its_leader():
    from scipy import stats

    from study.report.shapes import build_across_shapes

    def confirmed(method, shape, seed, valid, gm):
        trial = _trial(f"{method}-{shape}-{seed}", method, "confirm", valid, gm, config="tuned", seed=seed)
        trial.params["unlabeled"] = shape
        return trial

    # (valid, test GM) by seed: on reversed ACR leads on validation though CADR's test GM is higher.
    runs = {("cadr", "consistent"): ((0.9, 0.80), (0.8, 0.84), (0.85, 0.83)),
            ("acr", "consistent"): ((0.6, 0.70), (0.5, 0.75), (0.55, 0.71)),
            ("cadr", "reversed"): ((0.5, 0.66), (0.5, 0.61), (0.5, 0.70)),
            ("acr", "reversed"): ((0.7, 0.60), (0.7, 0.62), (0.7, 0.50))}
    trials = [confirmed(method, shape, seed, valid, gm) for (method, shape), values in runs.items()
              for seed, (valid, gm) in zip((100, 101, 102), values)]
    trials.append(_trial("s1", "acr", "search", 0.99, 0.99))  # stage 1: not a shape's number
    across = build_across_shapes(trials, ["cadr", "acr"], ["consistent", "reversed", "uniform"], METRIC, "max",
                                 [100, 101, 102])
    consistent, reversed_, uniform = across.shapes
    assert (consistent.leader, reversed_.leader, uniform.leader) == ("cadr", "acr", None)
    for result, leader, other in ((consistent, "cadr", "acr"), (reversed_, "acr", "cadr")):
        mine = [gm for _, gm in runs[(leader, result.shape)]]
        theirs = [gm for _, gm in runs[(other, result.shape)]]
        d = [a - b for a, b in zip(mine, theirs)]
        mean = sum(d) / 3
        half = stats.t.ppf(0.975, 2) * math.sqrt(sum((v - mean) ** 2 for v in d) / 2 / 3)
        paired = result.differences[other].interval
        assert (paired.mean, paired.low, paired.high) == pytest.approx((mean, mean - half, mean + half), abs=1e-12)
        assert result.intervals[leader]["test_gm_median_10"].mean == pytest.approx(sum(mine) / 3, abs=1e-12)
    assert uniform.differences == {} and uniform.intervals["acr"]["test_gm_median_10"].n == 0


# --- a tiny compare study, killed between its stages ------------------------------------------------


# Stage 2 on two unlabeled shapes: each winner and its defaults on each, with each seed.
ON_SHAPES = {"split": {**TINY["split"], "unlabeled": "consistent", "n_max_u": 40},
             "compare": {**TINY["compare"], "unlabeled": ["consistent", "reversed"]}}


def _launch(tmp_path, *extra, log=None, env=None):
    argv = [sys.executable, "-m", "study.launch", "--config", _config(tmp_path, **ON_SHAPES), "--storage",
            str(tmp_path / "studies"), "--name", "tiny", "--data-root", str(tmp_path / "data"), *extra]
    return subprocess.Popen(argv, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.ray
def test_a_compare_study_resumes_after_a_kill_between_its_stages_and_reports_the_verdict(tmp_path, ray_address):
    study = tmp_path / "studies" / "tiny"
    with open(tmp_path / "first.log", "w") as log:
        process = _launch(tmp_path, "--address", ray_address, log=log)
        deadline = time.time() + 600
        # Stage 2 starts once every method's stage 1 has finished: its winners are written then.
        # Killed at once, the driver has not yet let stage 2's experiment record a state (only
        # its tuner.pkl): the resume must build that experiment anew, not restart Tune's.
        try:
            while time.time() < deadline and process.poll() is None and not (study / "compare.json").exists():
                time.sleep(0.02)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert (study / "compare.json").exists(), (tmp_path / "first.log").read_text()[-3000:]
    winners = json.loads((study / "compare.json").read_text())["winners"]
    searched = {p: p.joinpath("result.json").read_text() for p in study.glob("search-*/trial_*")}
    assert len(searched) == 4

    process = _launch(tmp_path, "--resume", "--address", ray_address)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-3000:]
    assert json.loads((study / "compare.json").read_text())["winners"] == winners
    assert {p: p.joinpath("result.json").read_text() for p in study.glob("search-*/trial_*")} == searched  # kept
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (2 + 2 * 2 * 2)
    for method in ("fixmatch", "freematch"):
        mine = [r for r in rows if r["group"] == method]
        assert sorted(r["config"] for r in mine if r["stage"] == "search") == ["defaults", "searched"]
        assert {r["unlabeled"] for r in mine if r["stage"] == "search"} == {""}  # the base split's shape
        confirm = [(r["config"], r["unlabeled"], r["seed"]) for r in mine if r["stage"] == "confirm"]
        assert sorted(confirm) == [(kind, shape, seed) for kind in ("defaults", "tuned")
                                   for shape in ("consistent", "reversed") for seed in ("100", "101")]
        tuned = next(r for r in mine if r["stage"] == "confirm" and r["config"] == "tuned")
        for name, value in winners[method]["params"].items():
            assert float(tuned[name]) == pytest.approx(value)
    report = (study / "report.md").read_text()
    assert "## Comparison" in report and "Every method had the same budget: 2 stage-1 trials" in report
    assert (study / "plots" / "comparison_gm.png").stat().st_size > 0
    shapes = report[report.index("## Across unlabeled shapes"):report.index("## Trials")]
    assert "| method | consistent | reversed |" in shapes and shapes.count("| leader") == 2  # one per shape
    assert (study / "plots" / "shapes_gm.png").stat().st_size > 0
    assert "leader (best mean valid_balanced_accuracy_median_10 over the confirmation seeds, tuned): " in out
    assert "leader on each unlabeled shape (best mean valid_balanced_accuracy_median_10, tuned): consistent " in out


def test_the_report_of_a_compare_study_stopped_before_some_stage_started_lists_what_ran(tmp_path):
    from study.errors import StudyError
    from study.report import build_report

    study = tmp_path / "stopped"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"name": "stopped", "config": {"compare": TINY["compare"]}}))
    with pytest.raises(StudyError, match="has no trials yet"):  # not a failure to list search-freematch/
        build_report(study)
