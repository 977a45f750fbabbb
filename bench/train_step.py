"""Whole FixMatch training steps per second: ours vs a plain eager PyTorch step, same shapes.

    python bench/train_step.py --model wrn28_2 --batch-size 16 --mu 7 --steps 6

Both steps start from uint8 images already in memory and include augmentation, one forward
over labeled + weak + strong, the loss, backward, SGD and the EMA update. The plain step is how a
straightforward PyTorch port does it: per-image torchvision transforms in a Python loop,
contiguous (NCHW) tensors, a `.item()` per step for logging, a per-parameter EMA loop.
Ours is `trainables.step.train_step` (batched tensor augmentation, channels-last, no host
sync, fused EMA; optionally torch.compile). Rounds alternate between the two so that machine
noise hits both alike; the medians are compared. The last line is JSON.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from trainables.config import TrainConfig
from trainables.models import create_model, weight_decay_parameters
from trainables.step import build_state, normalize, train_step


class PlainFixMatchStep:
    """A straightforward eager FixMatch step: the baseline."""

    def __init__(self, model, num_classes, *, flip, confidence=0.95, lr=0.03, wd=5e-4, ema_decay=0.999):
        self.model, self.confidence, self.ema_decay = model, confidence, ema_decay
        self.ema_params = [p.detach().clone() for p in model.parameters()]
        decay, no_decay = weight_decay_parameters(model)
        self.optimizer = torch.optim.SGD([{"params": decay, "weight_decay": wd},
                                          {"params": no_decay, "weight_decay": 0.0}],
                                         lr=lr, momentum=0.9, nesterov=True)
        self.flip = flip
        self.strong = v2.RandAugment(num_ops=2, magnitude=10)

    def weak(self, image):
        side = image.shape[-1]
        ops = [v2.RandomHorizontalFlip()] if self.flip else []
        ops.append(v2.RandomCrop(side, padding=int(0.125 * side), padding_mode="reflect"))
        return v2.Compose(ops)(image)

    def __call__(self, labeled_images, labels, unlabeled_images):
        # Per-image augmentation, as a Dataset.__getitem__ would do it.
        labeled = torch.stack([self.weak(img) for img in labeled_images.permute(0, 3, 1, 2)])
        unlabeled = unlabeled_images.permute(0, 3, 1, 2)
        weak = torch.stack([self.weak(img) for img in unlabeled])
        strong = torch.stack([self.strong(self.weak(img)) for img in unlabeled])
        batch = normalize(torch.cat([labeled, weak, strong]).float() / 255).contiguous()
        logits = self.model(batch)
        logits_x, logits_weak, logits_strong = logits.split([len(labeled), len(weak), len(strong)])
        loss_x = F.cross_entropy(logits_x, labels)
        probs = torch.softmax(logits_weak.detach(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= self.confidence).float()
        loss_u = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
        loss = loss_x + loss_u
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for ema, p in zip(self.ema_params, self.model.parameters()):
                ema.mul_(self.ema_decay).add_(p, alpha=1 - self.ema_decay)
        return loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wrn28_2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--cadr", action="store_true",
                        help="time ours with CAP+CAI+CADR (default: plain FixMatch loss)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators for one step of each")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = (args.image_size, args.image_size, args.channels)
    flip = args.channels == 3
    g = torch.Generator().manual_seed(0)
    n_labeled, n_unlabeled = args.batch_size, args.batch_size * args.mu
    labeled = torch.randint(0, 256, (n_labeled, *shape), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, args.num_classes, (n_labeled,), generator=g).to(device)
    unlabeled = torch.randint(0, 256, (n_unlabeled, *shape), generator=g, dtype=torch.uint8).to(device)

    flags = {"cap": True, "cai": True, "cadr": True} if args.cadr else {}
    config = TrainConfig.from_dict({"model": args.model, "batch_size": args.batch_size, "mu": args.mu,
                                    "steps": 10_000, "compile": args.compile, **flags})
    state = build_state(config, args.num_classes, shape, device)
    forward = torch.compile(state.model) if args.compile else state.model
    torch.manual_seed(0)
    plain_model = create_model(args.model, args.num_classes, in_channels=args.channels,
                               image_size=args.image_size).to(device)
    plain = PlainFixMatchStep(plain_model, args.num_classes, flip=flip)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        stats = train_step(state, config, labeled, labels, unlabeled, flip=flip, forward=forward)
        return stats

    def baseline():
        return plain(labeled, labels, unlabeled)

    def timed(step_fn):
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            last = step_fn()
        if isinstance(last, dict):
            float(last["loss/total"])  # one host read per round, as a logger would do
        sync()
        return (time.perf_counter() - start) / args.steps

    for step_fn in (ours, baseline):  # warm-up (and compilation) outside the timing
        for _ in range(2):
            step_fn()
    ours_times, plain_times = [], []
    for _ in range(args.rounds):
        ours_times.append(timed(ours))
        plain_times.append(timed(baseline))

    if args.profile:
        for name, step_fn in (("ours", ours), ("plain", baseline)):
            with torch.profiler.profile() as profiler:
                step_fn()
                sync()
            print(f"--- {name}: one step, top operators by total CPU time")
            print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=12))

    images_per_step = n_labeled + 2 * n_unlabeled
    ours_ips = images_per_step / statistics.median(ours_times)
    plain_ips = images_per_step / statistics.median(plain_times)
    result = {
        "model": args.model, "batch_size": args.batch_size, "mu": args.mu, "device": str(device),
        "torch_threads": torch.get_num_threads(), "compile": args.compile, "cadr": args.cadr,
        "images_per_step": images_per_step,
        "images_per_second": round(ours_ips, 1),
        "plain_images_per_second": round(plain_ips, 1),
        "ratio": round(ours_ips / plain_ips, 3),
        "ours_seconds_per_step": [round(t, 4) for t in ours_times],
        "plain_seconds_per_step": [round(t, 4) for t in plain_times],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
