"""Specification of the data-parallel step (trainables.distributed + train_step): two workers,
each given half of a global batch and a `DistributedCollective`, with the model in torch DDP,
end every step with the same weights, EMA weights, method state, CTAugment state, losses and
mask statistics as one process given the whole batch.

The comparison is only meaningful when nothing else differs between the two runs, so the model
has no batch-norm (its statistics are per worker by design) and both augmentations are
deterministic functions of the input (CTAugment's probes are drawn for the whole global batch from
a seed, each worker taking its rows). The two workers are spawned once for the whole module (gloo
on localhost) and run every case; each test compares one case.
"""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainables.augment import Augmenter, CTAugment, Policy
from trainables.config import TrainConfig
from trainables.distributed import DistributedCollective
from trainables.models import MODELS
from trainables.step import build_state, train_step

NUM_CLASSES, IMAGE_SHAPE = 4, (8, 8, 1)
BATCH, MU, STEPS, WORLD_SIZE = 8, 3, 3, 2
NUM_UNLABELED = STEPS * MU * BATCH  # every unlabeled row of every step has its own position

CASES = {  # name: (training options: the method and its options, strong augmentation)
    "cap_cai_cadr": (dict(method="fixmatch", cap=True, cai=True, cadr=True, confidence=0.6), "mirror"),
    "cadr_off": (dict(method="fixmatch", cap=True, cai=True, cadr=False, confidence=0.6), "mirror"),
    "cai_off": (dict(method="fixmatch", cap=True, cai=False, cadr=True, confidence=0.6), "mirror"),
    "cap_off": (dict(method="fixmatch", cap=False, cai=True, cadr=False, confidence=0.6), "mirror"),  # CADR needs CAP
    "ctaugment": (dict(method="fixmatch", cap=True, cai=True, cadr=True, confidence=0.6), "ctaugment"),
    # The peer methods: every batch statistic they keep (means, variances, quantiles, histograms,
    # FlexMatch's per-row memory) is over the global batch. Short EMAs so the state moves.
    "flexmatch": (dict(method="flexmatch", confidence=0.6, thresh_warmup=False), "mirror"),
    "freematch": (dict(method="freematch", ema_m=0.5, ent_loss_ratio=0.5), "mirror"),
    "freematch_quantile": (dict(method="freematch", ema_m=0.5, use_quantile=True, clip_thresh=True), "mirror"),
    "softmatch": (dict(method="softmatch", ema_m=0.5), "mirror"),
    "debiaspl": (dict(method="debiaspl", tau=0.4, qhat_m=0.5, confidence=0.6), "mirror"),
    # The frontier methods add views to the forward (a strong labeled view, a second strong view);
    # SimPro's priors move at the end of every 2-step epoch.
    "simpro": (dict(method="simpro", tau=2.0, ema_u=0.5, confidence=0.6, epoch_steps=2), "mirror"),
    # CDMAD's solid-image probe, from the second step (epoch 1 > debiasstart 0) on.
    "cdmad": (dict(method="cdmad", confidence=0.6, debiasstart=0, epoch_steps=1), "mirror"),
    # ACR's balanced auxiliary head; u_py estimated from the second step, tau adapted from the third.
    "acr": (dict(method="acr", confidence=0.6, est_epoch=0, epoch_steps=1, ema_u=0.5), "mirror"),
}
LABELED_COUNTS = [5, 3, 2, 1]  # the labeled rows per class a method may start from
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# float64 shows the two runs compute the same function (they agree to ~1e-15); in float32 only
# the summation order of the all-reduces differs (measured: <= 5e-7 on losses, <= 1e-6 on weights).
TOLERANCES = {"float32": dict(atol=2e-6, rtol=1e-5), "float64": dict(atol=1e-12, rtol=1e-10)}


class TinyNet(nn.Module):
    """conv -> tanh -> linear: no batch-norm, so a worker's half batch gives the same per-row
    logits as the whole batch. Computes in its own dtype, whatever the input's."""

    def __init__(self, num_classes, in_channels, image_size, dtype):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3, 3, padding=1, dtype=dtype)
        self.fc = nn.Linear(3 * image_size * image_size, num_classes, dtype=dtype)
        with torch.no_grad():
            self.fc.weight.mul_(6)  # confident enough that some pseudo-labels pass the thresholds

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x.to(self.conv.weight.dtype))).flatten(1))


def tiny_net(num_classes, in_channels=1, image_size=8):
    return TinyNet(num_classes, in_channels, image_size, torch.float32)


def tiny_net64(num_classes, in_channels=1, image_size=8):
    return TinyNet(num_classes, in_channels, image_size, torch.float64)


class DeterministicAugmenter(Augmenter):
    """Deterministic branches: labeled and weak views unchanged, the strong view inverted and
    mirrored. With `ctaugment`, its CTAugment learns from probes that are the labeled images
    themselves, with policies drawn for the whole global batch from a per-step seed, each worker
    taking its rows: both runs feed the same (policy, prediction, label) rows to the bin weights."""

    def __init__(self, rank, world_size, ctaugment):
        super().__init__("x.x.cta" if ctaugment else "x.x.rac")
        self.rank, self.world_size, self.probes = rank, world_size, 0

    def __call__(self, branch, images, *, flip, generator):
        return 1 - images.flip(-1) if branch == "strong" else images

    def probe(self, images, *, generator):
        g = torch.Generator().manual_seed(1000 + self.probes)
        self.probes += 1
        rows = images.shape[0]
        policy = self.ctaugment._policy(rows * self.world_size, g, probe=True)
        mine = slice(self.rank * rows, (self.rank + 1) * rows)
        return images, Policy(policy.ops[mine], policy.levels[mine])


def install_test_doubles(patch):
    """Register the models; `patch(obj, name, value)`."""
    patch(MODELS, "tiny_net", tiny_net)
    patch(MODELS, "tiny_net64", tiny_net64)


def global_batches():
    """STEPS fixed global batches: B labeled uint8 images with labels, mu*B unlabeled."""
    batches = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        labeled = torch.randint(0, 256, (BATCH, *IMAGE_SHAPE), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
        unlabeled = torch.randint(0, 256, (MU * BATCH, *IMAGE_SHAPE), generator=g, dtype=torch.uint8)
        batches.append((labeled, labels, unlabeled))
    return batches


def case_config(case, dtype_name):
    options, _ = CASES[case]
    return TrainConfig.from_dict({"model": "tiny_net" if dtype_name == "float32" else "tiny_net64",
                                  "batch_size": BATCH, "mu": MU, "steps": 100, "lr": 0.1, "wd": 5e-3, **options})


def run_case(case, dtype_name, rank=0, world_size=1):
    """STEPS train steps on this worker's rows of every global batch; per-step statistics, masks,
    method state, and the final weights and CTAugment bin weights."""
    config = case_config(case, dtype_name)
    collective = DistributedCollective() if world_size > 1 else None
    state = build_state(config, NUM_CLASSES, IMAGE_SHAPE, torch.device("cpu"), num_unlabeled=NUM_UNLABELED,
                        collective=collective, labeled_counts=LABELED_COUNTS)
    state.augment = DeterministicAugmenter(rank, world_size, ctaugment=CASES[case][1] == "ctaugment")
    state.method.to(dtype=DTYPES[dtype_name])
    if world_size > 1:
        state.model = nn.parallel.DistributedDataParallel(state.model)
    masks, losses = [], state.method.losses

    def recording_losses(*args, **kwargs):
        out = losses(*args, **kwargs)
        masks.append(out.mask.detach().clone())
        return out

    state.method.losses = recording_losses
    labeled_rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    unlabeled_rows = slice(rank * MU * BATCH // world_size, (rank + 1) * MU * BATCH // world_size)
    steps = []
    for step, (labeled, labels, unlabeled) in enumerate(global_batches()):
        positions = torch.arange(MU * BATCH) + step * MU * BATCH
        stats = train_step(state, config, labeled[labeled_rows], labels[labeled_rows], unlabeled[unlabeled_rows],
                           positions[unlabeled_rows], flip=False)
        steps.append({**{k: v for k, v in stats.items() if k not in ("lr", "finite")},
                      **{f"state/{k}": v for k, v in state.method.state_dict().items()}, "mask": masks[-1]})
    rates = state.augment.ctaugment.rates.clone() if state.augment.uses_probes else None
    return {"steps": steps, "model": state.raw_model.state_dict(), "ema_model": state.ema_model.state_dict(),
            "ctaugment_rates": rates}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    # The timeout bounds every collective: if one worker fails, the other does not wait forever.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        install_test_doubles(lambda obj, name, value: (
            obj.__setitem__(name, value) if isinstance(obj, dict) else setattr(obj, name, value)))
        results = {(case, dtype_name): run_case(case, dtype_name, rank, WORLD_SIZE)
                   for case in CASES for dtype_name in DTYPES}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_worker_results(tmp_path_factory):
    """{rank: {(case, dtype): run_case result}} from two spawned gloo workers."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)}


@pytest.fixture
def single_process(monkeypatch):
    install_test_doubles(lambda obj, name, value: monkeypatch.setitem(obj, name, value) if isinstance(obj, dict)
                         else monkeypatch.setattr(obj, name, value))
    return run_case


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_with_half_batches_match_one_process_with_the_whole_batch(
        case, dtype_name, single_process, two_worker_results):
    expected = single_process(case, dtype_name)
    tolerance = TOLERANCES[dtype_name]
    # The comparison means something only if the unlabeled loss and the corrections are active.
    assert any(0 < float(s["mask_rate"]) < 1 for s in expected["steps"])
    if CASES[case][0].get("cadr"):
        assert any(float(s["loss/cadr"]) != 0 for s in expected["steps"])
    for rank in range(WORLD_SIZE):
        got = two_worker_results[rank][case, dtype_name]
        for step, (want, have) in enumerate(zip(expected["steps"], got["steps"], strict=True)):
            assert have.keys() == want.keys()
            for key in sorted(set(want) - {"mask", "mask_rate"}):
                torch.testing.assert_close(have[key], want[key], **tolerance,
                                           msg=lambda m: f"rank {rank} step {step} {key}: {m}")
        for part in ("model", "ema_model"):
            assert got[part].keys() == expected[part].keys()
            for name, tensor in expected[part].items():
                torch.testing.assert_close(got[part][name], tensor, **tolerance,
                                           msg=lambda m: f"rank {rank} {part}.{name}: {m}")
        if expected["ctaugment_rates"] is not None:
            # Every worker updated the bins from all workers' probes: the state of one process, and
            # bit for bit the same on every worker.
            torch.testing.assert_close(got["ctaugment_rates"], expected["ctaugment_rates"], **tolerance)
            rank0 = two_worker_results[0][case, dtype_name]["ctaugment_rates"]
            torch.testing.assert_close(got["ctaugment_rates"], rank0, atol=0, rtol=0)
            assert not torch.equal(expected["ctaugment_rates"], CTAugment().rates)  # the probes moved them


@pytest.mark.parametrize("case", list(CASES))
def test_mask_rate_is_the_global_rate_on_both_workers(case, single_process, two_worker_results):
    expected = single_process(case, "float64")
    rows_per_worker = MU * BATCH // WORLD_SIZE
    halves_differ = False
    for step, want in enumerate(expected["steps"]):
        masks = [two_worker_results[rank][case, "float64"]["steps"][step]["mask"] for rank in range(WORLD_SIZE)]
        assert [len(m) for m in masks] == [rows_per_worker] * WORLD_SIZE
        # Worker r's rows are rows [r * muB/2, (r+1) * muB/2) of the global batch (SoftMatch's
        # weights are continuous: equal to the all-reduces' rounding).
        torch.testing.assert_close(torch.cat(masks), want["mask"], atol=1e-12, rtol=0)
        global_rate = float(want["mask"].mean())
        halves_differ |= float(masks[0].mean()) != float(masks[1].mean())
        for rank in range(WORLD_SIZE):
            have = two_worker_results[rank][case, "float64"]["steps"][step]["mask_rate"]
            assert float(have) == pytest.approx(global_rate, abs=1e-12), (rank, step)
    assert halves_differ  # else a per-worker rate would pass too
