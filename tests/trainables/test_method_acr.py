"""Specification of ACR (trainables/methods/acr.py, docs/method.md "Frontier methods").

The reference below is written again in float64 numpy from ACR's train.py, in its own shape (an
epoch loop of eval_step steps): at the top of an epoch past est_epoch, tau = tau1 softmax(count_KL /
eval_step)[0] re-makes the main head's adjustment, and count_KL restarts; each step it takes the
four pseudo-label distributions (adjusted by tau and by tau12, the balanced head's, the plain one),
their masks at the threshold, the two unlabeled losses with OR-ed masks over both strong views and
the two labeled losses; past est_epoch it moves u_py toward the histogram of the balanced head's
confident pseudo-labels of the rows that are not labeled rows too (its targets -2) and adds the
symmetric KL distances to the three anchors. It uses no helper
of the implementation. Pseudo-labels and masks are frozen at the input point; the reference
gradient is the central finite difference of the rest.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from method_checks import (
    assert_continues_identically,
    assert_gradients_match_finite_differences,
    assert_two_workers_on_halves_reproduce_one_process,
    gradient_of,
    np_cross_entropy,
    np_softmax,
    one_intra_op_thread,  # noqa: F401 (an autouse fixture: importing it applies it)
    random_batches,
    restored_from_checkpoint,
    run_keeping_dtype,
    run_step,
    with_extras,
)

from trainables.errors import TrainConfigError
from trainables.evaluation import predict
from trainables.methods import create_method
from trainables.methods.acr import ACR
from trainables.models import create_model

TOLERANCE = dict(rtol=1e-9, atol=1e-12)
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


# --- the independent float64 reference ---------------------------------------------------------

def np_kl(p, q):
    """sum p log(p / q) with 0 log 0 = 0: torch's KLDivLoss(reduction='sum')(log q, p)."""
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0) - p * np.log(q))


@dataclass(frozen=True)
class Frozen:
    targets_u: np.ndarray
    targets_u_h2: np.ndarray
    mask_ss_t: np.ndarray
    mask_ss_b_h2: np.ndarray
    adjustment_l2: np.ndarray


class ReferenceACR:
    """train.py's epoch loop, one step at a time."""

    def __init__(self, labeled_counts, tau1, tau12, tau2, ema_u, est_epoch, confidence, T, epoch_steps):
        counts = np.asarray(labeled_counts, np.float64)
        self.py_con = counts / counts.sum()
        self.py_uni = np.full(len(counts), 1.0 / len(counts))
        self.py_rev = self.py_con[::-1]
        self.adjustment_l1 = np.log(self.py_con ** tau1 + 1e-12)
        self.adjustment_l12 = np.log(self.py_con ** tau12 + 1e-12)
        self.adjustment_l2 = np.log(self.py_con ** tau2 + 1e-12)
        self.taumin, self.taumax = 0, tau1
        self.tau = tau1
        self.ema_u, self.est_epoch, self.threshold = ema_u, est_epoch, confidence
        self.T, self.eval_step = T, epoch_steps
        self.u_py = self.py_uni.copy()
        self.epoch, self.batch_idx = 0, 0
        self.count_KL = np.zeros(3)

    def step(self, zw, bw, index) -> Frozen:
        if self.batch_idx == 0:  # the top of an epoch
            if self.epoch > self.est_epoch:
                count_KL = self.count_KL / self.eval_step
                KL_softmax = np.exp(count_KL[0]) / np.exp(count_KL).sum()
                tau = self.taumin + (self.taumax - self.taumin) * KL_softmax
                if not math.isnan(tau):
                    self.tau = tau
                    self.adjustment_l1 = np.log(self.py_con ** tau + 1e-12)
            self.count_KL = np.zeros(3)
        pseudo_label = np_softmax((zw - self.adjustment_l1) / self.T)
        pseudo_label_h2 = np_softmax((zw - self.adjustment_l12) / self.T)
        pseudo_label_b = np_softmax(bw / self.T)
        pseudo_label_t = np_softmax(zw / self.T)
        mask, mask_h2, mask_b, mask_t = (p.max(axis=1) >= self.threshold
                                         for p in (pseudo_label, pseudo_label_h2, pseudo_label_b, pseudo_label_t))
        mask_l = ~LABELED_IN_POOL[index]
        if self.epoch > self.est_epoch:
            counted = mask_b & mask_l
            now_mask = np.bincount(pseudo_label_b.argmax(axis=1)[counted], minlength=len(self.u_py)).astype(float)
            if now_mask.sum() > 0:
                now_mask = now_mask / now_mask.sum()
                self.u_py = self.ema_u * self.u_py + (1 - self.ema_u) * now_mask
                self.count_KL = self.count_KL + [0.5 * np_kl(self.u_py, anchor) + 0.5 * np_kl(anchor, self.u_py)
                                                 for anchor in (self.py_con, self.py_uni, self.py_rev)]
        self.batch_idx += 1
        if self.batch_idx == self.eval_step:
            self.epoch, self.batch_idx = self.epoch + 1, 0
        return Frozen(pseudo_label.argmax(axis=1), pseudo_label_h2.argmax(axis=1), (mask | mask_t).astype(float),
                      (mask_b | mask_h2).astype(float), self.adjustment_l2)


def reference_terms(zx, aux_x, y, zs, strong2, aux_strong, aux_strong2, frozen: Frozen, wu: float) -> dict:
    """The losses as functions of the logits; broadcast over leading dimensions (z: (..., N, C))."""
    labeled = np_cross_entropy(zx, y).mean(axis=-1) + np_cross_entropy(aux_x + frozen.adjustment_l2, y).mean(axis=-1)

    def twice(a, b):
        return np.concatenate(np.broadcast_arrays(a, b), axis=-2)

    def masked_mean(logits, targets, mask):
        return (np_cross_entropy(logits, np.concatenate([targets, targets])) * np.concatenate([mask, mask])).mean(-1)

    unlabeled = (masked_mean(twice(zs, strong2), frozen.targets_u, frozen.mask_ss_t)
                 + masked_mean(twice(aux_strong, aux_strong2), frozen.targets_u_h2, frozen.mask_ss_b_h2))
    return dict(total=labeled + wu * unlabeled, labeled=labeled, unlabeled=unlabeled)


DIFFERENTIABLE = ("zx", "aux_x", "zs", "strong2", "aux_strong", "aux_strong2")


def reference_losses(arrays, frozen, wu):
    return reference_terms(**{name: arrays[name] for name in DIFFERENTIABLE}, y=arrays["y"], frozen=frozen, wu=wu)


# --- inputs --------------------------------------------------------------------------------------

C, B, MU = 4, 3, 2
LABELED_COUNTS = [4, 2, 1, 1]  # a labeled distribution exact in float32
POOL = 30  # unlabeled rows; every third is a labeled row too
LABELED_IN_POOL = np.arange(POOL) % 3 == 0
# Epochs of 2 steps, estimation from epoch 2 (steps 4, 5, ...), tau adapted from epoch 3 (step 6).
SHORT = dict(est_epoch=1, epoch_steps=2, ema_u=0.5, confidence=0.7, wu=0.6)
CASES = {"short": SHORT, "other-strengths": dict(SHORT, tau1=1.5, tau12=1.0, tau2=0.5, T=0.8, est_epoch=0)}


def make_steps(seed=0, steps=9, scale=2.5, B=B, mu=MU):
    batches = random_batches(seed, steps, B, mu, C, scale, weak_shift=np.array([1.0, 0.3, 0.0, -0.5]), pool=POOL)
    return with_extras(batches, ACR.extra_logits(), seed + 100, scale)


def options_of(case):
    defaults = dict(tau1=2.0, tau12=2.0, tau2=2.0, ema_u=0.9, est_epoch=5, confidence=0.95, T=1.0, epoch_steps=500,
                    wu=1.0)
    return defaults | CASES[case]


def float64_method(collective=None, **options) -> ACR:
    return ACR(C, POOL, collective, LABELED_COUNTS, labeled_in_pool=LABELED_IN_POOL, **options).to(dtype=torch.float64)


def reference_of(o) -> ReferenceACR:
    return ReferenceACR(LABELED_COUNTS, *(o[k] for k in ("tau1", "tau12", "tau2", "ema_u", "est_epoch", "confidence",
                                                         "T", "epoch_steps")))


# --- agreement with the reference over several epochs ------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_losses_masks_and_estimates_match_the_reference_across_epochs(case):
    o = options_of(case)
    method, reference = float64_method(**CASES[case]), reference_of(o)
    taus = []
    for step, arrays in enumerate(make_steps()):
        out, _ = run_step(method, arrays)
        frozen = reference.step(arrays["zw"], arrays["aux_weak"], arrays["index"])
        expected = reference_losses(arrays, frozen, o["wu"])
        for name, value in expected.items():
            np.testing.assert_allclose(getattr(out, name).item(), value, **TOLERANCE, err_msg=f"{name}, step {step}")
        np.testing.assert_array_equal(out.mask.numpy(), frozen.mask_ss_t, err_msg=f"mask, step {step}")
        assert out.stats["acr/mask_balanced"].item() == pytest.approx(frozen.mask_ss_b_h2.mean(), abs=1e-12)
        np.testing.assert_allclose(method.state["u_py"].numpy(), reference.u_py, **TOLERANCE)
        np.testing.assert_allclose(method.state["count_KL"].numpy(), reference.count_KL, **TOLERANCE)
        np.testing.assert_allclose(method.state["tau_now"].item(), reference.tau, **TOLERANCE)
        taus.append(reference.tau)
    if case == "short":  # tau1 for epochs 0-2, tau1 / 3 from epoch 2's empty count, then estimated
        assert taus[:4] == [2.0] * 4 and taus[4:6] == [pytest.approx(2 / 3)] * 2
        assert len({round(t, 9) for t in taus[6:]}) == 2 and taus[6] != pytest.approx(2 / 3)


def test_the_reference_run_masks_some_rows_of_each_head():
    reference, masks = reference_of(options_of("short")), []
    for arrays in make_steps():
        frozen = reference.step(arrays["zw"], arrays["aux_weak"], arrays["index"])
        masks.append((frozen.mask_ss_t.mean(), frozen.mask_ss_b_h2.mean()))
    assert any(0 < main < 1 for main, _ in masks) and any(0 < balanced < 1 for _, balanced in masks)
    assert not np.allclose(reference.u_py, 0.25)


@pytest.mark.parametrize("step", [1, 7])  # before the estimation, and with an adapted tau
def test_gradients_of_the_total_match_finite_differences_of_the_reference(step):
    o, steps = options_of("short"), make_steps(seed=2)
    method, reference = float64_method(**SHORT), reference_of(o)
    for arrays in steps[:step]:
        run_step(method, arrays)
        reference.step(arrays["zw"], arrays["aux_weak"], arrays["index"])
    arrays = steps[step]
    out, leaves = run_step(method, arrays)
    out.total.backward()
    frozen = reference.step(arrays["zw"], arrays["aux_weak"], arrays["index"])
    assert frozen.mask_ss_t.sum() > 0 and frozen.mask_ss_b_h2.sum() > 0

    def total(**logits):
        return reference_terms(**logits, y=arrays["y"], frozen=frozen, wu=o["wu"])["total"]

    assert_gradients_match_finite_differences(leaves, total, {name: arrays[name] for name in DIFFERENTIABLE},
                                              DIFFERENTIABLE, **GRADIENT_TOLERANCE)
    for name in ("zw", "aux_weak"):  # the pseudo-labels are taken without gradient
        np.testing.assert_array_equal(gradient_of(leaves[name]), np.zeros(arrays[name].shape))


def test_the_estimate_leaves_out_the_pools_labeled_rows():
    # The same run, once with every third row of the pool a labeled row and once with none.
    steps, options = make_steps(seed=4), dict(SHORT, est_epoch=0)
    marked, unmarked = float64_method(**options), ACR(C, POOL, None, LABELED_COUNTS, **options).to(dtype=torch.float64)
    for arrays in steps[:4]:
        for method in (marked, unmarked):
            run_step(method, arrays)
    assert not torch.allclose(marked.state["u_py"], unmarked.state["u_py"])
    assert any(LABELED_IN_POOL[arrays["index"]].any() for arrays in steps[:4])


def test_the_pools_labeled_rows_are_one_flag_per_unlabeled_row():
    with pytest.raises(TrainConfigError, match="labeled_in_pool"):
        ACR(C, POOL, None, LABELED_COUNTS, labeled_in_pool=[True, False])


def test_initial_state_is_uniform_with_the_full_strength():
    method = ACR(C, POOL, None, LABELED_COUNTS)
    torch.testing.assert_close(method.state["u_py"], torch.full((C,), 0.25))
    assert method.state["tau_now"].item() == 2.0 and method.state["count_KL"].tolist() == [0, 0, 0]
    assert set(method.class_state()) == {"u_py"}


# --- the balanced head --------------------------------------------------------------------------

def test_the_model_gets_a_second_head_on_the_same_features_and_evaluation_reads_it():
    torch.manual_seed(0)
    model = create_model("cnn_small", C, in_channels=1, image_size=8, auxiliary_head=True).eval()
    images = torch.randint(0, 256, (5, 8, 8, 1), dtype=torch.uint8)
    inputs = images.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        logits = model(inputs)
        features = model.features(inputs).mean(dim=(2, 3))
    assert logits.shape == (5, 2 * C)
    torch.testing.assert_close(logits[:, :C], model.fc.main(features))
    torch.testing.assert_close(logits[:, C:], model.fc.auxiliary(features))
    assert not torch.equal(model.fc.main.weight, model.fc.auxiliary.weight)
    got = predict(model, images, "cpu", channels_last=False, method=ACR(C, POOL, None, LABELED_COUNTS))
    assert got.tolist() == logits[:, C:].argmax(dim=1).tolist()
    assert predict(model, images, "cpu", channels_last=False, method=create_method("fixmatch", C)).tolist() == \
        logits[:, :C].argmax(dim=1).tolist()


# --- state ---------------------------------------------------------------------------------------

def test_state_round_trip_mid_epoch_continues_identically():
    steps = make_steps(seed=3)
    original = float64_method(**SHORT)
    for arrays in steps[:5]:  # mid-epoch, estimating
        run_step(original, arrays)
    assert original.state["count_KL"].sum() > 0
    resumed = restored_from_checkpoint(original, float64_method(**SHORT))
    assert_continues_identically(original, resumed, steps[5:])


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("tau1", -1.0), ("tau12", -0.5), ("tau2", math.nan), ("ema_u", 1.0), ("est_epoch", -1), ("confidence", 0.0),
    ("confidence", 1.1), ("T", 0.0), ("epoch_steps", 0), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(field, value):
    with pytest.raises(TrainConfigError, match=field):
        ACR(C, POOL, None, LABELED_COUNTS, **{field: value})


def test_options_default_to_the_reference_values():
    # train.py's argparse defaults.
    assert ACR(C, POOL, None, LABELED_COUNTS).config == dict(
        wu=1.0, tau1=2.0, tau12=2.0, tau2=2.0, ema_u=0.9, est_epoch=5, confidence=0.95, T=1.0, epoch_steps=500)


def test_the_labeled_counts_are_required():
    with pytest.raises(TrainConfigError, match="labeled_counts"):
        create_method("acr", C, POOL)


def test_losses_need_the_balanced_heads_logits_and_the_second_strong_view():
    arrays = make_steps(steps=1)[0]
    with pytest.raises(ValueError, match="strong2, aux_x, aux_weak, aux_strong, aux_strong2"):
        float64_method().losses(*(torch.tensor(arrays[name]) for name in ("zx", "y", "zw", "zs", "index")))


# --- dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_logits_keep_their_dtype_and_the_state_its_own(dtype):
    low = ACR(C, POOL, None, LABELED_COUNTS, **SHORT)
    totals = run_keeping_dtype(low, float64_method(**SHORT), make_steps(seed=7, steps=8), dtype)
    assert low.state["u_py"].dtype == torch.float32 and low.state["step"].dtype == torch.int64
    if dtype == torch.float32:
        for total, exact in totals:
            assert total == pytest.approx(exact, rel=1e-4, abs=1e-5)


# --- the data-parallel hook --------------------------------------------------------------------------

def test_two_workers_with_half_batches_reproduce_one_process_with_the_whole_batch():
    workers, _ = assert_two_workers_on_halves_reproduce_one_process(
        lambda collective: float64_method(collective, **SHORT), make_steps(seed=8, steps=8, B=4, mu=3))
    assert workers[0].state["count_KL"].sum() > 0
