"""Specification of the one-command GPU benchmark (bench/gpu.py): on a CPU, with tiny shapes,
every part runs through its real code path (the training step in-process, Ray Train workers,
packed Ray actors) and reports a finite, positive rate as a JSON line that names the device, the
torch version and the shapes, and says it is a CPU smoke run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"model": "cnn_small", "image_size": 8, "channels": 1, "batch_size": 8, "mu": 2}
STEPS, WARMUP = 2, 1
# Dynamo and AOTAutograd trace the step as with inductor, without generating and compiling C++ for
# the CPU (tests/trainables/test_train.py trains a model inductor compiled).
BACKEND = "aot_eager"


@pytest.fixture(scope="module")
def run():
    """One CPU smoke run of every part: (human lines, JSON records)."""
    pytest.importorskip("ray")
    argv = ["--device", "cpu", "--steps", STEPS, "--warmup", WARMUP, "--compile-backend", BACKEND]
    for name, value in SHAPES.items():
        argv += [f"--{name.replace('_', '-')}", value]
    # One torch thread per process: the driver, Ray's workers and the actors share two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "bench/gpu.py", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [line for line in lines if not line.startswith("{")], records


def part(records, name):
    return [r for r in records if r["part"] == name]


def test_every_part_reports_a_finite_positive_rate(run):
    _, records = run
    assert {r["part"] for r in records} == {"precision", "scaling", "packing"}
    for record in records:
        for key in ("iterations_per_second", "images_per_second"):
            assert math.isfinite(record[key]) and record[key] > 0, record


def test_every_record_names_the_device_torch_and_shapes_and_is_marked_a_cpu_smoke_run(run):
    lines, records = run
    for record in records:
        assert {k: record[k] for k in SHAPES} == SHAPES
        assert (record["device"], record["torch"], record["cpu_smoke_run"]) == ("cpu", torch.__version__, True)
        assert record["device_name"]
        assert (record["steps"], record["warmup_steps_excluded"]) == (STEPS, WARMUP)
        assert record["images_per_step"] == 8 * (1 + 2 * 2)
    assert lines[0].startswith("CPU smoke run, not a GPU figure")
    assert all("CPU smoke run" in line for line in lines if line.startswith(("scaling", "packing")))


def test_precision_times_fp32_and_bf16_eager_and_compiled_against_fp32_eager(run):
    _, records = run
    precision = part(records, "precision")
    assert [(r["precision"], r["compile"], r["compile_backend"]) for r in precision] == [
        ("fp32", False, None), ("fp32", True, BACKEND), ("bf16", False, None), ("bf16", True, BACKEND)]
    assert precision[0]["ratio_to_fp32_eager"] == 1.0
    for record in precision:
        assert record["ratio_to_fp32_eager"] == pytest.approx(
            record["iterations_per_second"] / precision[0]["iterations_per_second"])


def test_scaling_runs_one_and_two_workers_on_the_same_global_batch(run):
    _, records = run
    scaling = part(records, "scaling")
    assert [r["workers"] for r in scaling] == [1, 2]
    assert scaling[0]["speedup"] == 1.0
    assert scaling[1]["speedup"] == pytest.approx(scaling[1]["iterations_per_second"]
                                                  / scaling[0]["iterations_per_second"])


def test_packing_runs_four_trials_together_against_one_at_a_time(run):
    _, records = run
    packing = part(records, "packing")
    assert [(r["mode"], r["trials"], r["share"]) for r in packing] == [
        ("one_at_a_time", 4, 0.25), ("together", 4, 0.25)]
    assert packing[1]["ratio"] == pytest.approx(packing[1]["iterations_per_second"]
                                                / packing[0]["iterations_per_second"])
