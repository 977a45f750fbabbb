"""Every paper config (examples/paper/*.yaml) goes through the real launcher on a tiny synthetic
dataset written in its publisher's format and converted by `python -m data_prep convert`. Configs
that differ only in their split (cifar100 at three imbalance ratios, say) train the same code on
other sizes: the first of each such group runs, for 2 steps on CPU, and the others are checked
and have their splits cut by the launcher's dry run. The command line changes only how long and
how big a run is, where it lives and what it runs on: the method, split, model and every other
setting are the file's own."""

import csv
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray

from data_prep.__main__ import main as data_prep_main
from data_prep.splits import long_tail_counts
from study.checks import checked, planned_trials
from study.config import load

sys.path.append(str(Path(__file__).resolve().parents[1] / "data_prep"))  # the data_prep suite's raw_sources
from raw_sources import make_cifar10, make_cifar100, make_miniimagenet_pickle, make_stl10  # noqa: E402

PAPER_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "examples" / "paper").glob("*.yaml"))


def _training(path) -> str:
    """What a config's trials train, its name and split aside."""
    values = load(str(path)).to_dict()
    return json.dumps({k: v for k, v in values.items() if k not in ("name", "split")}, sort_keys=True, default=str)


# The first config of each group that trains alike runs; the others are dry runs.
RUN = sorted({_training(path): path for path in reversed(PAPER_CONFIGS)}.values())
CHECKED = [path for path in PAPER_CONFIGS if path not in RUN]
STEPS = 2
# Sizes and resources, the only settings the runs below change (besides storage and data root).
# One trial at a time: a study's next trial reuses the trial process, as in_trial studies do.
OVERRIDES = ["--steps", str(STEPS), "--set", "train.batch_size=1", "--set", "train.mu=1",
             "--set", "resources.num_workers=1", "--set", "resources.use_gpu=false",
             "--set", "resources.cpus_per_worker=1", "--max-concurrent", "1"]
OVERRIDDEN = {("train", "steps"), ("train", "batch_size"), ("train", "mu"), ("resources", "num_workers"),
              ("resources", "use_gpu"), ("resources", "cpus_per_worker"), ("search", "max_concurrent"),
              ("storage",), ("data_root",), ("address",)}
LAUNCHES_AT_ONCE = 3  # while one launcher imports or writes its report, the others train


def _write_miniimagenet(directory: Path, counts) -> tuple[Path, list]:
    """The common release: mini-imagenet-cache-{test,train,val}.pkl with 20, 64 and 16 disjoint
    classes (class k of the converted dataset, files and wnids in sorted order, gets counts[k]
    training rows). It has no test set: the converter takes a per-class share, here just large
    enough to give the largest class one test row."""
    fraction = 0.505 / max(counts)
    rows = []
    for count in counts:
        n = count
        while n - round(n * fraction) < count:  # the converter's per-class test share
            n += 1
        rows.append(n)
    directory.mkdir()
    start = 0
    for part, n in (("test", 20), ("train", 64), ("val", 16)):
        wnids = tuple(f"n{k:08d}" for k in range(start, start + n))
        make_miniimagenet_pickle(directory / f"mini-imagenet-cache-{part}.pkl", seed=start, wnids=wnids,
                                 per_class=rows[start:start + n])
        start += n
    return directory, ["--test-fraction", str(fraction)]


def _head_and_tail(num_classes) -> list:
    """A test set of two images, of the first and the last class: evaluation works, and costs little."""
    return [1] + [0] * (num_classes - 2) + [1]


# Per dataset: its number of classes and a writer of its raw source in the publisher's format,
# given the training rows each class needs; returns the source and extra `convert` options.
PUBLISHED = {
    "cifar10": (10, lambda d, counts: (make_cifar10(d, train_counts=counts, test_counts=_head_and_tail(10)).path, [])),
    "cifar100": (100, lambda d, counts: (make_cifar100(d, train_counts=counts,
                                                       test_counts=_head_and_tail(100)).path, [])),
    "stl10": (10, lambda d, counts: (make_stl10(d, train_counts=counts, test_counts=_head_and_tail(10),
                                                unlabeled=2).path, [])),
    "miniimagenet": (100, lambda d, counts: _write_miniimagenet(d / "mini-imagenet", counts)),
}


def _rows_needed(config, num_classes) -> np.ndarray:
    """Training rows each class needs for the config's split: its labeled rows and validation rows."""
    spec = config.split_spec()
    if spec.kind == "lt":
        need = long_tail_counts(spec.n_max, spec.gamma_l, num_classes)
    elif spec.kind == "rand":
        need = np.full(num_classes, spec.n_max)
    else:
        need = np.full(num_classes, -(-spec.size // num_classes))
    if spec.valid_size >= num_classes:
        need = need + (-(-spec.valid_size // num_classes) if spec.valid_kind == "balanced" else spec.valid_size)
    return need


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Each dataset the paper configs use, as small as their splits allow, converted once."""
    root, raw = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("raw")
    needs = {}
    for path in PAPER_CONFIGS:
        config = load(str(path))
        if config.dataset not in PUBLISHED:
            pytest.fail(f"{path.name}: no synthetic {config.dataset} source; add a writer to PUBLISHED")
        num_classes = PUBLISHED[config.dataset][0]
        needs[config.dataset] = np.maximum(needs.get(config.dataset, 0), _rows_needed(config, num_classes))
    for dataset, counts in needs.items():
        (raw / dataset).mkdir()
        source, options = PUBLISHED[dataset][1](raw / dataset, counts.tolist())
        assert data_prep_main(["convert", dataset, "--source", str(source), "--data-root", str(root),
                               *options]) == 0
    return root


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for every launch; each launcher connects to it as a driver of its own."""
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def launches(data_root, ray_address, tmp_path_factory):
    """{config file: (exit code, output, study directory)}, the launches running a few at once."""
    storage = tmp_path_factory.mktemp("studies")

    def launch(path):
        argv = [sys.executable, "-m", "study.launch", "--config", str(path), "--storage", str(storage),
                "--data-root", str(data_root), "--address", ray_address, *OVERRIDES,
                *([] if path in RUN else ["--dry-run"])]
        try:
            run = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
            code, out = run.returncode, run.stdout
        except subprocess.TimeoutExpired as exc:
            code, out = "timeout", exc.output or ""
        study = storage / load(str(path)).name
        for checkpoint in study.glob("trial_*/checkpoint_*"):  # a WRN-28-8 trial's is 270 MB
            shutil.rmtree(checkpoint)
        return path, (code, out, study)

    def image_side(path):
        meta = json.loads((data_root / load(str(path)).dataset / "dataset.json").read_text())
        return meta["image_shape"][0]

    # The largest images first: their trials take longest.
    order = sorted(PAPER_CONFIGS, key=lambda path: (-image_side(path), path.name))
    with ThreadPoolExecutor(LAUNCHES_AT_ONCE) as pool:
        return dict(pool.map(launch, order))


def test_the_paper_configs_are_found_and_each_group_that_trains_alike_runs_one():
    assert PAPER_CONFIGS, "no examples/paper/*.yaml"
    assert {_training(path) for path in RUN} == {_training(path) for path in PAPER_CONFIGS}
    assert [path.stem for path in RUN] == ["cifar100_lt_100", "cifar100_lt_100_cadr", "cifar10_lt_100",
                                           "miniimagenet_lt_100", "stl10_lt_100"]


@pytest.mark.ray
@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.stem)
def test_a_paper_config_like_one_that_runs_is_checked_and_its_split_cut(path, launches, data_root):
    code, out, study = launches[path]
    assert code == 0, out[-4000:]
    config = load(str(path))
    split = config.split_spec().default_name(config.dataset)
    assert (f"split {split}: cut now" in out or f"split {split}: found" in out), out[-4000:]  # _cadr shares it
    assert (data_root / config.dataset / "splits" / f"{split}.json").is_file()
    assert f"trials: {planned_trials(*checked(config))} " in out
    assert out.rstrip().endswith("dry run: nothing was trained") and not (study / "study.json").exists()


@pytest.mark.ray
@pytest.mark.parametrize("path", RUN, ids=lambda p: p.stem)
def test_a_paper_config_runs_through_the_launcher_and_reports_every_trial(path, launches):
    code, out, study = launches[path]
    assert code == 0, out[-4000:]
    config = load(str(path))
    trials = planned_trials(*checked(config))
    # Only sizes, storage, data root and resources differ from the file (its empty keys the launcher fills).
    recorded = json.loads((study / "study.json").read_text())["config"]
    for section, values in config.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) and section != "space" else [(None, values)]):
            if (section, key) not in OVERRIDDEN and (section,) not in OVERRIDDEN and value is not None:
                got = recorded[section] if key is None else recorded[section][key]
                assert got == value, f"{section}.{key}: {got!r} != the file's {value!r}"
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == trials
    assert all(row["status"] == "TERMINATED" for row in rows), rows
    report = (study / "report.md").read_text()
    for row in rows:
        assert row["trial_id"] in report
        results = (study / f"trial_{row['trial_id']}" / "result.json").read_text().splitlines()
        assert json.loads(results[-1])["step"] == STEPS
