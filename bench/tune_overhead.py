"""What a study costs on top of its trainings: K short trials as a study vs run directly.

    python bench/tune_overhead.py --trials 4 --steps 500
    python bench/tune_overhead.py --trials 2 --steps 500 --trainer torch_trainer

Both sides train the same K configurations (CADR on the digits long-tailed split, cnn_small,
seeds 0..K-1), one at a time, each on one torch thread with OMP_NUM_THREADS=1 (as Ray sets for
its workers), and each side is timed as a user waits for it: a fresh Python process from start
to exit.

  direct  one process runs trainables.loop.train(config) K times (the dataset is decoded
          once and cached, as a reused trial actor does too).
  study   python -m study.launch with a grid over the K seeds and max_concurrent 1: Ray
          start-up, Tune, Optuna-free grid search, a checkpoint and report per evaluation, the
          report and plots at the end.

ratio = study wall time / direct wall time (goal: <= 1.10). The trials' own wall times (from the
study's report.csv) split the difference into per-trial and fixed costs. Each trial's start-up
(the time before its first training step) is estimated from its results: the time of its first
report less one evaluation window (the time between its first and second reports); the first
trial's and the later trials' mean are printed apart. `--trainer
torch_trainer` runs each trial through a Ray Train TorchTrainer instead of inside the trial.
The last line is JSON.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPLIT = {"kind": "lt", "n_max": 50, "gamma_l": 20, "seed": 1}


def train_settings(steps: int) -> dict:
    return {"model": "cnn_small", "steps": steps, "eval_every": 50, "batch_size": 32, "mu": 3,
            "cap": True, "cai": True, "cadr": True}


def run_direct(trials: int, steps: int, data_root: str) -> None:
    """The K trainings, one after another, in this process."""
    import torch

    from data_prep.convert import prepare
    from data_prep.splits import SplitSpec
    from trainables.config import TrainConfig
    from trainables.loop import train

    torch.set_num_threads(1)
    prepare("digits", data_root)
    split = SplitSpec(**SPLIT).default_name("digits")
    for seed in range(trials):
        config = TrainConfig.from_dict({**train_settings(steps), "dataset": "digits", "split": split,
                                        "data_root": data_root, "seed": seed, "device": "cpu"})
        metrics = train(config, progress=False)["metrics"]
        print(f"direct seed {seed}: test accuracy {metrics['test_accuracy']:.4f}", flush=True)


def study_config(trials: int, steps: int, trainer: str, concurrent: int) -> dict:
    return {
        "dataset": "digits", "split": SPLIT, "train": train_settings(steps),
        "space": {"seed": {"grid": list(range(trials))}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": concurrent},
        "metric": "test_accuracy_median_10", "scheduler": {"name": "none"},
        "resources": {"trainer": trainer},
    }


def trial_startups(study: Path) -> list[float]:
    """Each trial's seconds before its first training step, in the order the trials started."""
    startups = []
    for trial in study.glob("trial_*"):
        results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        first, second = results[0]["time_total_s"], results[1]["time_total_s"]
        started = results[0]["timestamp"] - first
        startups.append((started, first - (second - first)))
    return [seconds for _, seconds in sorted(startups)]


def timed(argv: list[str], log: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(argv[:4])} failed (exit {done.returncode}); see {log}")
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500, help="training steps per trial")
    parser.add_argument("--trainer", choices=("in_trial", "torch_trainer"), default="in_trial")
    parser.add_argument("--concurrent", type=int, default=1, help="study trials at once (1 compares like with like)")
    parser.add_argument("--workdir", help="where data, studies and logs go (default: a temp dir, removed)")
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # the direct side's process
    parser.add_argument("--data-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct:
        run_direct(args.trials, args.steps, args.data_root)
        return

    with tempfile.TemporaryDirectory(prefix="bench-tune-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        data_root = str(tmp / "data")
        subprocess.run([sys.executable, "-m", "data_prep", "convert", "digits", "--data-root", data_root],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        # Ray starts its workers with OMP_NUM_THREADS=1; without it the direct side runs 18% slower
        # on one torch thread (measured), which would flatter the study.
        direct_s = timed([sys.executable, __file__, "--direct", "--trials", str(args.trials), "--steps",
                          str(args.steps), "--data-root", data_root], tmp / "direct.log", {"OMP_NUM_THREADS": "1"})
        print(f"direct: {direct_s:.1f} s", flush=True)
        config = tmp / "study.yaml"
        config.write_text(yaml.safe_dump(study_config(args.trials, args.steps, args.trainer, args.concurrent)))
        study_s = timed([sys.executable, "-m", "study.launch", "--config", str(config), "--storage",
                         str(tmp / "studies"), "--name", "overhead", "--data-root", data_root], tmp / "study.log")
        print(f"study: {study_s:.1f} s", flush=True)
        with open(tmp / "studies" / "overhead" / "report.csv") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != args.trials or any(row["status"] != "TERMINATED" for row in rows):
            sys.exit(f"error: the study did not finish its {args.trials} trials; see {tmp / 'study.log'}")
        trial_s = sum(float(row["wall_time_s"]) for row in rows)
        startups = trial_startups(tmp / "studies" / "overhead")
        print(f"start-up per trial: first {startups[0]:.1f} s, later ones "
              f"{sum(startups[1:]) / max(len(startups) - 1, 1):.1f} s on average", flush=True)
    print(json.dumps({
        "trials": args.trials, "steps": args.steps, "trainer": args.trainer, "concurrent": args.concurrent,
        "direct_s": round(direct_s, 1), "study_s": round(study_s, 1),
        "trials_own_s": round(trial_s, 1), "ratio": round(study_s / direct_s, 3),
        "startup_s": [round(s, 1) for s in startups],
    }))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
