"""Parquet -> decoded images -> weak + strong augmented batches: ours vs a torchvision DataLoader.

    python bench/data_path.py --images 8192 --batch-size 448 --rounds 3

The script writes a CIFAR-10-format archive of synthetic 32x32 images (smooth shapes plus noise,
so PNG sizes are realistic), converts it with data_prep, and compares on the same images:

  ours, in-process  load_arrays: Parquet -> uint8 arrays (threaded PNG decode, once), then each
                    batch is sampled from memory and augmented on tensors, weak (flip +
                    reflect-padded shift) and strong (weak + 2 RandAugment ops + cutout), batched.
  ours, Ray Data    ray_datasets iterated as a training worker does (PNG decode in map_batches),
                    then the same batched augmentation. Ray is started before the clock runs,
                    as it is before any training worker reads its shard.
  baseline          a torchvision VisionDataset over the archive's images (held in memory, as
                    torchvision's CIFAR10 does), per sample: PIL image, weak = RandomHorizontalFlip
                    + RandomCrop(32, padding=4, reflect), strong = weak + RandAugment(2, 10) +
                    RandomErasing (cutout), ToTensor; batched by DataLoader(num_workers=2).

Throughput counts augmented (weak, strong) pairs per second over whole epochs; rounds alternate
between ours and the baseline and medians are compared. Our augmentation runs on `--threads`
torch threads (default 2, the same two cores the baseline's two loader processes use). One-off
costs (decode, loader start-up) are reported apart, and folded into a one-epoch end-to-end time.
The last line is JSON.
"""

import argparse
import io
import json
import os
import pickle
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.convert import convert  # noqa: E402
from data_prep.loading import load_arrays, ray_datasets  # noqa: E402
from data_prep.splits import SplitSpec, make_split, save_split  # noqa: E402
from trainables.augment import strong_augment, weak_augment  # noqa: E402
from trainables.step import to_unit_float  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- the images ---------------------------------------------------------------------------------


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 32x32 RGB images: a coloured disc on a gradient, plus noise; label = disc colour index."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    labels = rng.integers(0, 10, n)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        background = (x * rng.uniform(0, 4) + y * rng.uniform(0, 4))[..., None] + rng.uniform(0, 120, 3)
        cy, cx, r = rng.uniform(8, 24, 2).tolist() + [rng.uniform(4, 10)]
        disc = ((y - cy) ** 2 + (x - cx) ** 2 < r * r)[..., None]
        colour = np.array([25 * labels[i], 255 - 20 * labels[i], 128], float)
        image = np.where(disc, colour, background) + rng.normal(0, 8, (32, 32, 3))
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar10_archive(path: Path, images: np.ndarray, labels: np.ndarray, test: int) -> None:
    """The CIFAR-10 python release's layout: 5 training batches, a test batch, batches.meta."""
    def member(tar, name, obj):
        data = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def rows(part):  # 1024 red values, then green, then blue
        return np.ascontiguousarray(part.transpose(0, 3, 1, 2)).reshape(len(part), 3072)

    train_images, train_labels = images[test:], labels[test:]
    with tarfile.open(path, "w:gz") as tar:
        member(tar, "batches.meta", {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072})
        for b, chunk in enumerate(np.array_split(np.arange(len(train_images)), 5), 1):
            member(tar, f"data_batch_{b}", {b"data": rows(train_images[chunk]), b"labels": train_labels[chunk].tolist(),
                                            b"batch_label": f"training batch {b} of 5".encode()})
        member(tar, "test_batch", {b"data": rows(images[:test]), b"labels": labels[:test].tolist(),
                                   b"batch_label": b"testing batch 1 of 1"})


# --- ours ---------------------------------------------------------------------------------------


def ours_epoch(images: np.ndarray, batch_size: int, generator: torch.Generator) -> int:
    """One shuffled epoch of (weak, strong) batches, augmented on tensors; returns pairs made."""
    order = torch.randperm(len(images), generator=generator)
    made = 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch = to_unit_float(torch.from_numpy(images[order[start:start + batch_size].numpy()]))
        weak = weak_augment(batch, flip=True, generator=generator)
        strong = strong_augment(batch, flip=True, generator=generator)
        made += min(len(weak), len(strong))
    return made


def ray_data_decode(dataset: str, split: str, data_root: str) -> tuple[np.ndarray, float]:
    """The unlabeled rows through Ray Data, as a training worker materializes its shard."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    unlabeled = ray_datasets(dataset, split, data_root, verify=False)["unlabeled"]
    images = np.concatenate([b["image"] for b in unlabeled.iter_batches(batch_size=4096, batch_format="numpy")])
    return images, time.perf_counter() - start


# --- the baseline -------------------------------------------------------------------------------


def baseline_loader(archive: Path, batch_size: int, workers: int):
    """A torchvision-style CIFAR Dataset with PIL transforms behind a DataLoader."""
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import VisionDataset

    class PairDataset(VisionDataset):
        """The archive's training images; each item is (weak, strong) as float tensors."""

        def __init__(self, path):
            super().__init__(str(path))
            data = []
            with tarfile.open(path) as tar:
                for b in range(1, 6):
                    batch = pickle.load(tar.extractfile(f"cifar-10-batches-py/data_batch_{b}"), encoding="bytes")
                    data.append(batch[b"data"])
            self.data = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            weak = [transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=4, padding_mode="reflect")]
            self.weak = transforms.Compose([*weak, transforms.ToTensor()])
            cutout = transforms.RandomErasing(p=1.0, scale=(0.0, 0.25), ratio=(1, 1), value=0.5)
            self.strong = transforms.Compose([*weak, transforms.RandAugment(2, 10), transforms.ToTensor(), cutout])

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            image = Image.fromarray(self.data[i])
            return self.weak(image), self.strong(image)

    dataset = PairDataset(archive)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def baseline_epoch(loader) -> int:
    return sum(len(weak) for weak, _ in loader)


# --- the benchmark --------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192, help="images in the generated archive (train + test)")
    parser.add_argument("--test", type=int, default=1000, help="of which test images")
    parser.add_argument("--batch-size", type=int, default=448, help="unlabeled batch (B * mu: 64 * 7)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per path, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for our augmentation")
    parser.add_argument("--workers", type=int, default=2, help="the baseline DataLoader's num_workers")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray Data path")
    parser.add_argument("--workdir", help="where to write the archive and Parquet (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-data-path-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        images, labels = synthetic_images(args.images, seed=0)
        archive = tmp / "cifar-10-python.tar.gz"
        write_cifar10_archive(archive, images, labels, args.test)
        info, convert_rate = convert("cifar10", archive, tmp / "data")
        split = make_split(info, SplitSpec("mcar", 1, size=250))
        save_split(info, split)
        print(f"converted {args.images} images ({convert_rate:.0f} img/s); unlabeled pool "
              f"{len(split.unlabeled_indices)}", flush=True)

        start = time.perf_counter()
        ours_images = load_arrays("cifar10", split.name, tmp / "data").unlabeled_images
        inprocess_decode_s = time.perf_counter() - start
        start = time.perf_counter()
        loader = baseline_loader(archive, args.batch_size, args.workers)
        baseline_first = baseline_epoch(loader)  # includes starting the workers
        baseline_first_s = time.perf_counter() - start
        generator = torch.Generator().manual_seed(0)
        ours_first_s = _timed(lambda: ours_epoch(ours_images, args.batch_size, generator))[1]

        ours_rates, baseline_rates = [], []
        for round_ in range(args.rounds):
            made, seconds = _timed(lambda: ours_epoch(ours_images, args.batch_size, generator))
            ours_rates.append(made / seconds)
            made, seconds = _timed(lambda: baseline_epoch(loader))
            baseline_rates.append(made / seconds)
            print(f"round {round_ + 1}: ours {ours_rates[-1]:.0f} pairs/s, baseline {baseline_rates[-1]:.0f} pairs/s",
                  flush=True)

        result = {
            "images": args.images, "unlabeled": len(ours_images), "batch_size": args.batch_size,
            "threads": args.threads, "baseline_workers": args.workers, "rounds": args.rounds,
            "ours_pairs_per_s": round(statistics.median(ours_rates), 1),
            "baseline_pairs_per_s": round(statistics.median(baseline_rates), 1),
            "inprocess_decode_s": round(inprocess_decode_s, 2),
            "ours_first_epoch_s": round(inprocess_decode_s + ours_first_s, 2),
            "baseline_first_epoch_s": round(baseline_first_s, 2),
            "baseline_first_epoch_pairs": baseline_first,
        }
        result["ratio_steady"] = round(result["ours_pairs_per_s"] / result["baseline_pairs_per_s"], 2)
        result["ratio_first_epoch"] = round(result["baseline_first_epoch_s"] / result["ours_first_epoch_s"], 2)
        if not args.skip_ray:
            ray_images, ray_decode_s = ray_data_decode("cifar10", split.name, str(tmp / "data"))
            assert np.array_equal(_sorted_rows(ray_images), _sorted_rows(ours_images)), "the two paths' rows differ"
            ray_epoch_s = _timed(lambda: ours_epoch(ray_images, args.batch_size, generator))[1]
            result["ray_data_decode_s"] = round(ray_decode_s, 2)
            result["ray_data_first_epoch_s"] = round(ray_decode_s + ray_epoch_s, 2)
            result["ratio_first_epoch_ray_data"] = round(baseline_first_s / result["ray_data_first_epoch_s"], 2)
    print(json.dumps(result))


def _sorted_rows(images: np.ndarray) -> np.ndarray:
    """The images as whole rows (one opaque value each), sorted: equal multisets compare equal."""
    rows = np.ascontiguousarray(images.reshape(len(images), -1))
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())


def _timed(work):
    start = time.perf_counter()
    out = work()
    return out, time.perf_counter() - start


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
