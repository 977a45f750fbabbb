"""A TorchTrainer trial's start-up with its data read and decoded per trial vs decoded once per study.

    python bench/data_once.py --images 20000 --rounds 2

Writes a synthetic CIFAR-shaped dataset (32x32x3, `--images` training rows of which 10% labeled,
and 2,000 test rows) as Parquet, then times short `trainables.ray_train.fit` runs (one worker,
2 steps, one evaluation) on a local Ray, alternating the two ways a study can feed a trial:

  per trial   fit reads and decodes the split's Parquet files through Ray Data (what every
              TorchTrainer trial did before a study decoded its data once)
  once        fit takes datasets the study materialized into Ray's object store beforehand
              (`study.splits.decode_once`; its one-off time is printed apart)

A run's wall time is almost all start-up (worker group, dataset shards, the first step); the
medians over `--rounds` are compared. The last line is JSON.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_dataset(root: Path, images: int) -> tuple[str, str]:
    from data_prep.parquet import write_dataset as write
    from data_prep.readers import PartitionSource, RawDataset
    from data_prep.splits import SplitSpec, make_split, save_split

    rng = np.random.default_rng(0)

    def partition(rows):
        def chunks():
            for start in range(0, rows, 5000):
                n = min(5000, rows - start)
                yield rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(start, start + n) % 10
        return PartitionSource(rows, chunks)

    raw = RawDataset("synthetic", [str(c) for c in range(10)], (32, 32, 3),
                     {"train": partition(images), "test": partition(2000)}, source_sha256="synthetic")
    info = write(raw, root)
    split = make_split(info, SplitSpec("mcar", 0, size=images // 10))
    save_split(info, split)
    return info.name, split.name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="training rows of the synthetic dataset")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import ray

    from study.config import StudyConfig
    from study.splits import decode_once
    from trainables.config import TrainConfig
    from trainables.ray_train import fit
    from trainables.resources import Resources

    with tempfile.TemporaryDirectory(prefix="bench-data-once-") as tmp:
        tmp = Path(tmp)
        dataset, split = write_dataset(tmp / "data", args.images)
        settings = {"dataset": dataset, "split": split, "data_root": str(tmp / "data"), "model": "cnn_small",
                    "steps": 2, "eval_every": 2, "batch_size": 16, "mu": 2}
        config = TrainConfig.from_dict(settings)
        ray.init(address="local", num_cpus=2, include_dashboard=True)  # Ray Train cleans up through it
        start = time.perf_counter()
        study = StudyConfig.from_dict({"dataset": dataset, "data_root": str(tmp / "data")})
        decoded = decode_once(study, [split])[split]
        decode_s = time.perf_counter() - start
        times = {"per trial": [], "once": []}
        for round_ in range(args.rounds):
            for way, datasets in (("per trial", None), ("once", decoded)):
                start = time.perf_counter()
                result = fit(config, Resources(num_workers=1, cpus_per_worker=1),
                             storage_path=str(tmp / "runs"),
                             name=f"{way.replace(' ', '-')}-{round_}", tensorboard=False, verify=False,
                             datasets=datasets)
                if result.error is not None:
                    raise SystemExit(f"error: a run failed: {result.error}")
                times[way].append(time.perf_counter() - start)
                print(f"round {round_ + 1}, data {way}: {times[way][-1]:.1f} s", flush=True)
        ray.shutdown()
    per_trial, once = statistics.median(times["per trial"]), statistics.median(times["once"])
    print(f"decoding once for the study: {decode_s:.1f} s; a trial's run: {per_trial:.1f} s with its data read "
          f"per trial, {once:.1f} s with the study's ({per_trial - once:+.1f} s per trial, {once / per_trial:.2f}x)")
    print(json.dumps({"images": args.images, "rounds": args.rounds, "decode_once_s": round(decode_s, 2),
                      "run_per_trial_s": round(per_trial, 2), "run_once_s": round(once, 2),
                      "ratio": round(once / per_trial, 3)}))


if __name__ == "__main__":
    main()
