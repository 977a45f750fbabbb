"""Specification of study reports (study.report): report.csv, report.md and plots/*.png are built
from the files a real Ray Tune study leaves on disk. One tiny Tune study (a fake trainable that
reports known numbers, a FixMatch baseline, two seeds per method, a trial stopped early and a
trial that fails) serves the module; tests that change files work on a copy of it."""

import csv
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest

import data_prep.files
import study.report as report_module
from search_spaces import VARIANTS
from study.callbacks import RecordEndedTrials
from study.errors import StudyError
from study.report import TrialRecord, build_report, compare_to_baseline, load_trials, write_report
from study.report.__main__ import main
from study.report.ranking import _grid_parameters, _groups

pytestmark = pytest.mark.ray

EVALS, STEPS_PER_EVAL, NUM_CLASSES = 4, 10, 5
BASE_ACCURACY = {"fixmatch": 0.60, "cap": 0.66, "cadr": 0.72}
FAILING, STOPPED = ("cap", 1), ("cap", 0)  # (variant, seed)
STOPPED_AFTER = 2  # evaluations
METRIC = "valid_balanced_accuracy_median_10"  # what the fake study selected on
# Best first by the validation metric (median of evaluations 1..4 = base - 0.01 seed + 0.07; the
# stopped trial's median is over evaluations 1..2); the failed trial after all the others. On the
# test split the seeds rank the other way round: the test's own winner is ("cadr", 1).
EXPECTED_ORDER = [("cadr", 0), ("cadr", 1), ("cap", 0), ("fixmatch", 0), ("fixmatch", 1), ("cap", 1)]


def fake_accuracy(variant, seed, evaluation) -> float:
    """Test accuracy; validation accuracy is base - 0.01 seed + 0.02 evaluation + 0.03."""
    return BASE_ACCURACY[variant] + 0.01 * seed + 0.02 * evaluation


def fake_training(config):
    """Reports what trainables' training loop reports, with values known from the params."""
    from ray import tune

    variant, seed = config["variant"], config["seed"]
    history = {}
    for evaluation in range(1, EVALS + 1):
        if (variant, seed) == FAILING and evaluation > 2:
            raise RuntimeError("loss became NaN on purpose")
        accuracy = fake_accuracy(variant, seed, evaluation)
        valid_accuracy = BASE_ACCURACY[variant] - 0.01 * seed + 0.02 * evaluation + 0.03
        current = {
            "test_accuracy": accuracy, "test_gm": accuracy - 0.1 - (0.05 if variant == "fixmatch" else 0.0),
            "test_balanced_accuracy": accuracy - 0.02,
            "valid_accuracy": valid_accuracy, "valid_gm": valid_accuracy - 0.08,
            "valid_balanced_accuracy": valid_accuracy - 0.01,
        }
        metrics = {"step": evaluation * STEPS_PER_EVAL, "loss/total": 1.0 / evaluation, "mask_rate": 0.5,
                   "lr": 0.03, "images_per_second": 100.0, **current}
        for name, value in current.items():
            history.setdefault(name, []).append(value)
            metrics.update({f"{name}_median_{w}": statistics.median(history[name][-w:]) for w in (10, 20)})
        metrics.update({f"test_class_accuracy/{c}": accuracy + 0.1 - 0.05 * c for c in range(NUM_CLASSES)})
        metrics.update({f"p_ema/{c}": 1.0 / NUM_CLASSES for c in range(NUM_CLASSES)})
        tune.report(metrics)


def stop_one_trial(trial_id, result) -> bool:
    config = result["config"]
    return (config["variant"], config["seed"]) == STOPPED and result["training_iteration"] >= STOPPED_AFTER


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import tune

    storage = tmp_path_factory.mktemp("studies")
    name = "fake-ablation"
    param_space = {
        "variant": tune.grid_search(list(BASE_ACCURACY)),
        "seed": tune.grid_search([0, 1]),
        "label": tune.sample_from(lambda spec: "fixmatch" if spec.config.variant == "fixmatch" else "search"),
        "confidence": tune.sample_from(lambda spec: 0.8 + 0.05 * spec.config.seed
                                       + {"fixmatch": 0.0, "cap": 0.02, "cadr": 0.04}[spec.config.variant]),
        **{flag: tune.sample_from(lambda spec, flag=flag: VARIANTS[spec.config.variant][flag])
           for flag in ("cap", "cai", "cadr")},
    }
    # pytest imports this file by path; Ray's workers cannot import it by name, so ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(fake_training, {"CPU": 0.2}),
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), stop=stop_one_trial, verbose=0,
                                      callbacks=[RecordEndedTrials()]),  # as the launcher does
        )
        tuner.fit()
    finally:
        ray.shutdown()
    path = storage / name
    study = {"name": name, "swept": ["confidence", "variant", "seed"], "versions": {"ray": ray.__version__},
             "dataset": {"name": "digits"}, "metric": METRIC, "mode": "max", "selected_on": "valid",
             "config": {"dataset": "digits", "split": {"kind": "lt", "n_max": 50, "gamma_l": 20, "seed": 1},
                        "train": {"steps": EVALS * STEPS_PER_EVAL}, "space": "ablation",
                        "metric": METRIC, "mode": "max", "scheduler": {"name": "none"}}}
    (path / "study.json").write_text(json.dumps(study))
    return path


@pytest.fixture
def study_copy(study_dir, tmp_path):
    return Path(shutil.copytree(study_dir, tmp_path / study_dir.name))


# --- what Tune recorded, read independently -------------------------------------------------


def recorded(study_dir) -> dict:
    """{trial_id: (params, result lines)} straight from the trial directories."""
    trials = {}
    for params_file in Path(study_dir).glob("*/params.json"):
        lines = [json.loads(line) for line in (params_file.parent / "result.json").read_text().splitlines()]
        trials[lines[0]["trial_id"]] = (json.loads(params_file.read_text()), lines)
    return trials


def key_of(params) -> tuple:
    return params["variant"], params["seed"]


def read_csv(study_dir) -> list[dict]:
    with open(Path(study_dir) / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- report.csv -------------------------------------------------------------------------------


def test_csv_rows_hold_exactly_what_tune_recorded(study_dir):
    write_report(study_dir)
    rows, trials = read_csv(study_dir), recorded(study_dir)
    assert len(rows) == len(trials) == len(EXPECTED_ORDER)
    for row in rows:
        params, lines = trials[row["trial_id"]]
        last = lines[-1]
        for name in ("label", "variant", "seed", "confidence", "cap", "cai", "cadr"):
            assert row[name] == str(params[name]), name
        for column, key in report_module.METRIC_COLUMNS.items():
            assert float(row[column]) == last[key], column
    for column in ("valid_accuracy_median_10", "valid_gm_median_10", "valid_balanced_accuracy_median_10",
                   "test_accuracy_median_10", "test_gm_median_10", "test_balanced_accuracy_median_10",
                   "valid_accuracy_last", "test_gm_median_20"):
        assert column in rows[0], column
        assert int(row["steps"]) == last["step"]
        assert float(row["wall_time_s"]) == last["time_total_s"]


def test_trials_are_ranked_best_first_by_the_validation_metric_and_failed_trials_last(study_dir):
    write_report(study_dir)
    assert [(row["variant"], int(row["seed"])) for row in read_csv(study_dir)] == EXPECTED_ORDER


def test_ranking_follows_the_mode_of_the_study_metric(study_copy):
    study = json.loads((study_copy / "study.json").read_text())
    study.update(metric="test_gm_median_10", mode="min")
    (study_copy / "study.json").write_text(json.dumps(study))
    report = build_report(study_copy)
    assert report.metric == "test_gm_median_10"
    assert [key_of(t.params) for t in report.trials] == [
        ("fixmatch", 0), ("fixmatch", 1), ("cap", 0), ("cadr", 0), ("cadr", 1), FAILING]


def test_a_study_that_selected_on_test_says_so_in_its_first_lines(study_copy):
    study = json.loads((study_copy / "study.json").read_text())
    study.update(metric="test_balanced_accuracy_median_10", selected_on="test")
    (study_copy / "study.json").write_text(json.dumps(study))
    write_report(study_copy)
    head = (study_copy / "report.md").read_text().splitlines()[:3]
    assert head[0] == "# Study fake-ablation" and head[1] == ""
    assert head[2].startswith("**Selected on the test split**: the winner was chosen by its test score "
                              "(test_balanced_accuracy_median_10), so its number is optimistic")


def test_statuses_come_from_tunes_experiment_state(study_dir):
    statuses = {key_of(t.params): t.status for t in load_trials(study_dir)}
    assert statuses.pop(FAILING) == "ERROR"
    assert statuses.pop(STOPPED) == "STOPPED_EARLY"  # TERMINATED to Tune, before its planned steps
    assert set(statuses.values()) == {"TERMINATED"}
    write_report(study_dir)
    failed = next(r for r in read_csv(study_dir) if (r["variant"], int(r["seed"])) == FAILING)
    assert (failed["status"], failed["error"]) == ("ERROR", "RuntimeError: loss became NaN on purpose")


def test_a_trial_stopped_before_its_planned_steps_says_so_and_at_which_step(study_dir):
    report = write_report(study_dir)
    stopped = next(t for t in report.trials if key_of(t.params) == STOPPED)
    assert (stopped.status, stopped.steps) == ("STOPPED_EARLY", STOPPED_AFTER * STEPS_PER_EVAL)
    text = (study_dir / "report.md").read_text()
    assert "- Trials: 6: 4 TERMINATED, 1 STOPPED_EARLY, 1 ERROR\n" in text
    assert "| STOPPED_EARLY at step 20 of 40 |" in text
    assert "Unfinished" not in text  # every trial ended
    row = next(r for r in read_csv(study_dir) if (r["variant"], int(r["seed"])) == STOPPED)
    assert (row["status"], row["steps"]) == ("STOPPED_EARLY at step 20 of 40", "20")


def test_without_experiment_state_statuses_are_inferred_from_the_files(study_copy):
    for state in study_copy.glob("experiment_state-*.json"):
        state.unlink()
    shutil.rmtree(study_copy / "finished")  # nor the launcher's records: from the trials' files alone
    statuses = {key_of(t.params): t.status for t in load_trials(study_copy)}
    assert statuses[FAILING] == "ERROR"
    assert statuses[("cadr", 1)] == statuses[("fixmatch", 0)] == "TERMINATED"
    assert statuses[STOPPED] == "STOPPED_EARLY"  # Tune marks the last result of a stopped trial done


def test_trials_tune_has_queued_but_not_started_are_listed_as_pending(study_copy):
    state_file = max(study_copy.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    queued = json.loads(state["trial_data"][0][0])
    queued.update(trial_id="queued_00042", status="PENDING", relative_logdir="fake_training_queued_00042_42_x",
                  config={**queued["config"], "seed": 7})
    state["trial_data"].append([json.dumps(queued), state["trial_data"][0][1]])
    state_file.write_text(json.dumps(state))
    report = build_report(study_copy)
    pending = report.trials[-1]
    assert (pending.trial_id, pending.status, pending.path) == ("queued_00042", "PENDING", None)
    assert pending.params["seed"] == 7
    text = report_module.format_markdown(report)
    assert "- Trials: 7: 4 TERMINATED, 1 STOPPED_EARLY, 1 PENDING, 1 ERROR\n" in text
    assert text.splitlines()[2] == ("**Unfinished**: 6 of 7 planned trials ended (1 PENDING); the study was "
                                    "interrupted (or is still running). Continue it with the command that started "
                                    "it, and --resume; the numbers below are those of the trials so far.")


# --- report.md ------------------------------------------------------------------------------


def test_header_states_plainly_whether_the_best_trial_beat_the_fixmatch_baseline(study_dir):
    report = write_report(study_dir)
    text = (study_dir / "report.md").read_text()
    by_key = {key_of(params): (trial_id, lines[-1]) for trial_id, (params, lines) in recorded(study_dir).items()}
    best_id, best = by_key[("cadr", 0)]  # the validation metric's winner
    test_winner_id, _ = by_key[("cadr", 1)]
    baseline_id, baseline = by_key[("fixmatch", 0)]  # the better of the two baseline seeds on validation
    d_accuracy = 100 * (best["test_accuracy_median_10"] - baseline["test_accuracy_median_10"])
    d_gm = 100 * (best["test_gm_median_10"] - baseline["test_gm_median_10"])
    assert d_accuracy > 0 and d_gm > 0
    assert (f"CADR (trial {best_id}) beat the baseline (fixmatch: FixMatch, trial {baseline_id}) by "
            f"+{d_accuracy:.1f} points accuracy and +{d_gm:.1f} GM") in text
    assert text.startswith(f"# Study {report.name}\n\nSelected on the validation split ({METRIC})")
    assert "- Dataset: digits, split lt (n_max 50, gamma_l 20, seed 1)" in text
    assert "- Trials: 6: 4 TERMINATED, 1 STOPPED_EARLY, 1 ERROR" in text
    assert (f"- Best: trial {best_id} (CADR, confidence=0.84, seed=0): {METRIC} {100 * best[METRIC]:.1f}; test "
            f"accuracy {100 * best['test_accuracy_median_10']:.1f}, GM {100 * best['test_gm_median_10']:.1f}, "
            f"balanced accuracy {100 * best['test_balanced_accuracy_median_10']:.1f}") in text
    assert (f"- Had the study ranked on test_balanced_accuracy_median_10 instead, it would have picked trial "
            f"{test_winner_id} (CADR, ") in text


def test_the_sentence_says_did_not_beat_when_the_baseline_is_ahead_in_either_number():
    def trial(trial_id, accuracy, gm, **flags):
        return TrialRecord(trial_id, {"label": "search", **flags}, "TERMINATED",
                           [{"test_accuracy_median_10": accuracy, "test_gm_median_10": gm}])

    baseline = trial("base", 0.70, 0.60, cap=False, cai=False, cadr=False)
    worse_gm = trial("cadr1", 0.75, 0.58, cap=True, cai=True, cadr=True)
    assert compare_to_baseline(worse_gm, baseline) == (
        "CADR (trial cadr1) did not beat the baseline (fixmatch: FixMatch, trial base): "
        "+5.0 points accuracy and -2.0 GM (test, median of the last 10 evaluations).")
    better = compare_to_baseline(trial("cap1", 0.71, 0.61, cap=True), baseline)
    assert "beat the baseline (fixmatch: FixMatch, trial base) by +1.0 points accuracy and +1.0 GM" in better
    assert "is the baseline (fixmatch) itself" in compare_to_baseline(baseline, baseline)


def test_seeds_give_the_ablation_table_with_mean_and_std_per_method(study_dir):
    report = write_report(study_dir)
    lines = {key_of(params): lines[-1] for params, lines in recorded(study_dir).values()}
    groups = {g.name: g for g in report.groups}
    assert list(groups) == ["cadr", "cap", "fixmatch"]  # best mean first; the failed seed is left out
    for name in ("cadr", "fixmatch"):
        group = groups[name]
        assert group.seeds == [0, 1]
        assert group.score == pytest.approx(statistics.fmean(lines[(name, s)][METRIC] for s in (0, 1)), abs=1e-12)
        for measure in ("accuracy", "gm", "balanced_accuracy"):
            values = [lines[(name, s)][f"test_{measure}_median_10"] for s in (0, 1)]
            mean, std = group.test[measure]
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert std == pytest.approx(statistics.stdev(values), abs=1e-12)
        tails = [statistics.fmean(lines[(name, s)][f"test_class_accuracy/{c}"] for c in (2, 3, 4)) for s in (0, 1)]
        assert group.tail_accuracy_mean == pytest.approx(statistics.fmean(tails), abs=1e-12)
        assert list(group.tail_class_accuracy) == [2, 3, 4]
        for c in (2, 3, 4):
            expected = statistics.fmean(lines[(name, s)][f"test_class_accuracy/{c}"] for s in (0, 1))
            assert group.tail_class_accuracy[c] == pytest.approx(expected, abs=1e-12)
    assert groups["cap"].seeds == [0] and groups["cap"].test["accuracy"][1] is None
    text = (study_dir / "report.md").read_text()
    cadr = groups["cadr"]
    assert (f"| cadr | CADR | 0, 1 | {100 * cadr.score:.1f} | "
            + " | ".join(f"{100 * cadr.test[m][0]:.1f} ± {100 * cadr.test[m][1]:.1f}"
                         for m in ("accuracy", "gm", "balanced_accuracy"))
            + f" | {100 * cadr.tail_accuracy_mean:.1f} | "
            + " | ".join(f"{100 * cadr.tail_class_accuracy[c]:.1f}" for c in (2, 3, 4)) + " |") in text
    assert ("| group | method | seeds | valid bal-acc med10 (mean) | test acc med10 (mean ± std) | "
            "test GM med10 (mean ± std) | test bal-acc med10 (mean ± std) |") in text
    assert "| class 2 acc | class 3 acc | class 4 acc |" in text
    d_accuracy = 100 * (cadr.test["accuracy"][0] - groups["fixmatch"].test["accuracy"][0])
    assert (f"Over seeds, cadr (CADR, 2 seeds) beat the baseline fixmatch (FixMatch, 2 seeds) by "
            f"+{d_accuracy:.1f} points accuracy") in text


def test_no_grouped_table_without_repeated_seeds(study_copy):
    for params_file in study_copy.glob("*/params.json"):
        params = json.loads(params_file.read_text())
        if params["seed"] == 1:
            shutil.rmtree(params_file.parent)
    for state in study_copy.glob("experiment_state-*.json"):
        state.unlink()
    report = write_report(study_copy)
    assert len(report.trials) == 3 and report.groups == []
    assert "## Over seeds" not in (study_copy / "report.md").read_text()


# --- plots ----------------------------------------------------------------------------------


def test_plots_are_valid_pngs_for_per_class_history_and_each_numeric_swept_param(study_dir):
    from PIL import Image

    write_report(study_dir)
    plots = study_dir / "plots"
    names = {p.name for p in plots.iterdir()}
    assert names == {"per_class_accuracy.png", "history.png", "param_confidence.png", "param_seed.png"}
    for path in plots.iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
            image.verify()
    assert "![history](plots/history.png)" in (study_dir / "report.md").read_text()


# --- a study still running, and atomic rebuilds ---------------------------------------------


def test_rebuilding_while_trials_are_still_writing_uses_the_complete_lines(study_copy):
    shutil.rmtree(study_copy / "finished")  # still running: no trial has ended yet
    trial_dirs = {key_of(json.loads(p.read_text())): p.parent for p in study_copy.glob("*/params.json")}
    writing = trial_dirs[("cadr", 1)] / "result.json"
    lines = writing.read_text().splitlines(keepends=True)
    writing.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # cut mid-line
    (trial_dirs[("fixmatch", 0)] / "result.json").unlink()  # started, nothing reported yet
    new_trial = study_copy / "fake_training_abcde_00099_99_new"
    new_trial.mkdir()
    (new_trial / "params.json").write_text(json.dumps({"label": "search", "variant": "cadr", "seed": 2,
                                                       "cap": True, "cai": True, "cadr": True}))
    write_report(study_copy)
    rows = {(r["variant"], int(r["seed"])): r for r in read_csv(study_copy)}
    second = json.loads(lines[1])
    assert int(rows[("cadr", 1)]["steps"]) == second["step"]
    assert float(rows[("cadr", 1)]["valid_accuracy_median_10"]) == second["valid_accuracy_median_10"]
    assert rows[("cadr", 2)]["status"] == "PENDING" and rows[("cadr", 2)]["trial_id"] == "abcde_00099"
    last_two = [(r["variant"], int(r["seed"])) for r in read_csv(study_copy)][-2:]
    assert set(last_two) == {("fixmatch", 0), ("cadr", 2)}  # no results: last
    assert all(rows[("fixmatch", 0)][name] == "" for name in report_module.METRIC_COLUMNS)
    assert (study_copy / "report.md").exists()


def test_a_failed_rebuild_leaves_the_previous_report_whole(study_copy, monkeypatch):
    write_report(study_copy)
    before = {name: (study_copy / name).read_bytes() for name in ("report.md", "report.csv")}
    shutil.rmtree(study_copy / "finished")
    for params_file in study_copy.glob("*/params.json"):
        (params_file.parent / "result.json").write_text("")  # the next report would differ

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_prep.files.os, "replace", refuse)
    with pytest.raises(StudyError, match="No space left on device"):
        write_report(study_copy)
    monkeypatch.undo()
    assert {name: (study_copy / name).read_bytes() for name in before} == before
    leftovers = [p.name for p in study_copy.rglob("*.tmp")]
    assert leftovers == []


# --- command line ---------------------------------------------------------------------------


def test_cli_rebuilds_the_report_and_prints_the_table(study_copy, capsys):
    for name in ("report.md", "report.csv"):
        (study_copy / name).unlink(missing_ok=True)
    shutil.rmtree(study_copy / "plots", ignore_errors=True)
    assert main([str(study_copy)]) == 0
    out, err = capsys.readouterr()
    *table, blank, wrote = out.splitlines()
    assert table[0].startswith("| # | trial | label | method | confidence |")
    assert len(table) == 2 + len(EXPECTED_ORDER) and err == ""
    assert (blank, wrote) == ("", f"wrote {study_copy}/report.md, {study_copy}/report.csv and {study_copy}/plots/")
    assert (study_copy / "report.md").exists() and (study_copy / "report.csv").exists()
    assert (study_copy / "plots" / "history.png").exists()


def test_cli_reads_and_writes_a_study_given_as_a_uri(study_copy, capsys):
    # file:// goes through the same pyarrow filesystem code as s3:// or gs://: the report is built
    # on a local mirror without checkpoints, then its files are uploaded.
    (study_copy / "report.md").unlink(missing_ok=True)
    (study_copy / "report.csv").write_text("stale")
    shutil.rmtree(study_copy / "plots", ignore_errors=True)
    local = build_report(study_copy)
    assert main([f"file://{study_copy}"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("| # | trial | label |") and err == ""
    assert (study_copy / "report.md").read_text() == report_module.format_markdown(local)
    rows = list(csv.DictReader((study_copy / "report.csv").open()))
    assert [row["trial_id"] for row in rows] == [row["trial_id"] for row in local.rows()]
    assert (study_copy / "plots" / "history.png").stat().st_size > 0
    assert not list(study_copy.glob(".*.tmp"))


def test_cli_refuses_a_uri_without_a_study_or_with_an_unknown_scheme(tmp_path, capsys):
    assert main([f"file://{tmp_path / 'missing'}"]) == 2
    assert capsys.readouterr().err == f"error: no study at {tmp_path / 'missing'}\n"
    assert main(["nosuchfs://bucket/study"]) == 2
    assert capsys.readouterr().err.startswith("error: storage nosuchfs://bucket/study cannot be opened")


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_cli_refuses_a_directory_that_is_not_a_study_with_one_line_and_exit_2(tmp_path, capsys, make):
    assert main([str(make(tmp_path))]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "report.md").exists()


def test_a_finished_trial_whose_files_a_storage_failure_emptied_keeps_its_last_result(study_copy):
    before = {row["trial_id"]: row for row in (write_report(study_copy), read_csv(study_copy))[1]}
    trial_dirs = {key_of(json.loads(p.read_text())): p.parent for p in study_copy.glob("*/params.json")}
    for key, cut in ((("cadr", 1), 0), (("cadr", 0), 2)):  # emptied; cut after two of its four results
        lines = (trial_dirs[key] / "result.json").read_text().splitlines(keepends=True)
        (trial_dirs[key] / "result.json").write_text("".join(lines[:cut]))  # what a full disk leaves
        (trial_dirs[key] / "params.json").write_text("")
        (trial_dirs[key] / "checkpoint_000001").mkdir()  # it ran
    for state in study_copy.glob("experiment_state-*.json"):
        state.write_text("")  # and the state Tune uploads with them
    write_report(study_copy)
    after = {row["trial_id"]: row for row in read_csv(study_copy)}
    assert after == before  # every column: parameters, status, steps and metrics from the study's record
    records = {p.stem: json.loads(p.read_text()) for p in (study_copy / "finished").glob("*.json")}
    assert records.keys() == before.keys()  # Tune's word for each (the report tells a stopped one apart)
    assert sorted(r["status"] for r in records.values()) == ["ERROR"] + ["TERMINATED"] * 5


def test_a_trial_that_went_on_after_its_record_is_reported_from_its_files(study_copy):
    """A resumed trial runs again past the record of how it ended before: its files are newer."""
    trial_dir = next(p.parent for p in study_copy.glob("*/params.json") if key_of(json.loads(p.read_text())) == FAILING)
    lines = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    record_path = study_copy / "finished" / f"{lines[0]['trial_id']}.json"
    record = json.loads(record_path.read_text())
    assert record["status"] == "ERROR"
    record["last_result"] = lines[0]  # it had ended ERROR after its first result; resumed, it went on
    record_path.write_text(json.dumps(record))
    trial = next(t for t in load_trials(study_copy) if key_of(t.params) == FAILING)
    assert trial.results == lines


def test_a_trial_whose_result_files_a_storage_failure_emptied_is_listed_as_lost(study_copy):
    trial_dirs = {key_of(json.loads(p.read_text())): p.parent for p in study_copy.glob("*/params.json")}
    lost = trial_dirs[("cadr", 1)]
    trial_id = json.loads((lost / "result.json").read_text().splitlines()[0])["trial_id"]
    (study_copy / "finished" / f"{trial_id}.json").unlink()  # it ended on a full disk: no record either
    (lost / "result.json").write_text("")  # what a full disk leaves
    (lost / "params.json").write_text("")
    (lost / "checkpoint_000001").mkdir()  # it ran
    report = write_report(study_copy)
    lost_rows = [row for row in read_csv(study_copy) if row["status"] == "LOST"]
    assert len(lost_rows) == 1 and lost_rows[0]["error"].startswith("its results were lost")
    assert len(report.trials) == len(EXPECTED_ORDER)  # never dropped
    assert "- Trials: 6: 3 TERMINATED, 1 STOPPED_EARLY, 1 ERROR, 1 LOST\n" in (study_copy / "report.md").read_text()


def test_a_malformed_study_json_is_a_study_error(study_copy):
    (study_copy / "study.json").write_text("{not json")
    with pytest.raises(StudyError, match="study.json is not a valid study file"):
        build_report(study_copy)


def test_trial_values_ignore_what_is_not_a_finite_number():
    trial = TrialRecord("t", {}, "RUNNING", [{"test_accuracy": math.nan, "test_gm": True, "step": 3,
                                              "test_class_accuracy/1": 0.5}])
    assert trial.value("test_accuracy") is None and trial.value("test_gm") is None and trial.steps == 3
    assert trial.class_accuracy[1] == 0.5 and math.isnan(trial.class_accuracy[0])


def test_groups_over_seeds_keep_the_other_swept_parameters_apart():
    def trial(i, variant, gamma_l, seed, accuracy):
        return TrialRecord(f"t{i}", {"variant": variant, "gamma_l": gamma_l, "seed": seed, "label": "grid"},
                           "TERMINATED", [{"step": 10, "valid_gm_median_10": accuracy,
                                           "test_accuracy_median_10": accuracy - 0.1}])

    trials = [trial(0, "cadr", 10, 0, 0.9), trial(1, "cadr", 10, 1, 0.8), trial(2, "cadr", 50, 0, 0.5),
              trial(3, "cadr", 50, 1, 0.7)]
    groups = _groups(trials, "valid_gm_median_10", "max", ["variant", "gamma_l", "seed"])
    assert [(g.name, g.seeds) for g in groups] == [("cadr, gamma_l=10", [0, 1]), ("cadr, gamma_l=50", [0, 1])]
    assert groups[0].score == pytest.approx(0.85) and groups[1].score == pytest.approx(0.6)
    assert groups[0].test["accuracy"][0] == pytest.approx(0.75) and groups[1].test["accuracy"][0] == pytest.approx(0.5)


def test_grid_parameters_are_read_from_the_space_study_json_describes():
    from search_spaces.spaces import Grid, Uniform

    study = {"space": {"variant": Grid(("fixmatch", "cadr")).describe(), "gamma_l": Grid((10, 50)).describe(),
                       "confidence": Uniform(0.7, 0.9).describe(), "seed": Grid((0, 1)).describe()}}
    assert _grid_parameters(study) == ["variant", "gamma_l", "seed"]
