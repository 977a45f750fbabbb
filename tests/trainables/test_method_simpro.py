"""Specification of SimPro (trainables/methods/simpro.py, docs/method.md "Frontier methods").

The reference below is written again in float64 numpy from SimPro's train.py, in its own shape: at
the start of each epoch (eval_step steps) it takes the adjustments log(pi ** tau + 1e-12) and
log(pi_u ** tau + 1e-12) and zeroes its counts; each step it takes soft pseudo-labels
softmax(z_w + A_u), masks max >= threshold, counts the labels and the masked pseudo-label mass,
and computes L_x = mean CE([z_l; z_l_strong] + A, [y; y]) / scale_ratio and
L_u = mean [mask; mask] CE([z_s; z_s2] + A, [P; P]); at the end of each epoch it moves both priors.
It uses no helper of the implementation. What SimPro takes without gradient (P, the mask, the
priors) is frozen at the input point; the reference gradient is the central finite difference of
the rest.
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
    np_softmax,
    one_intra_op_thread,  # noqa: F401 (an autouse fixture: importing it applies it)
    random_batches,
    restored_from_checkpoint,
    run_keeping_dtype,
    run_step,
    with_extras,
)

from trainables.errors import TrainConfigError
from trainables.methods import create_method
from trainables.methods.simpro import SimPro

TOLERANCE = dict(rtol=1e-9, atol=1e-12)
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


# --- the independent float64 reference ---------------------------------------------------------

def np_soft_cross_entropy(z, targets):
    """-sum_c targets[c] log softmax(z)[c] per row; broadcasts over leading dimensions of z."""
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -(targets * log_probs).sum(axis=-1)


@dataclass(frozen=True)
class Frozen:
    """What one step takes without gradient."""

    adjustment: np.ndarray  # log(pi ** tau + 1e-12) of this epoch
    pseudo_labels: np.ndarray  # (muB, C) soft
    mask: np.ndarray
    scale_ratio: float


class ReferenceSimPro:
    """SimPro/train.py's epoch loop, one step at a time."""

    def __init__(self, labeled_counts, num_unlabeled, tau, ema_u, confidence, epoch_steps):
        counts = np.asarray(labeled_counts, np.float64)
        self.tau, self.ema_u, self.threshold, self.eval_step = tau, ema_u, confidence, epoch_steps
        self.num_labeled, self.num_unlabeled = counts.sum(), num_unlabeled
        self.adapt_dis = counts / counts.sum()  # py_con
        self.estimated_dis = np.full(len(counts), 1.0 / len(counts))  # py_uni
        self.batch_idx = 0

    def step(self, y, zw) -> Frozen:
        C = len(self.adapt_dis)
        if self.batch_idx == 0:  # the top of an epoch
            self.adjustment_u = np.log(self.estimated_dis ** self.tau + 1e-12)
            self.adjustment = np.log(self.adapt_dis ** self.tau + 1e-12)
            self.dis_unlabeled = np.zeros(C)
            self.count_labeled_dataset = np.zeros(C)
        pseudo_label = np_softmax(zw + self.adjustment_u)
        mask = pseudo_label.max(axis=1) >= self.threshold
        self.count_labeled_dataset += np.bincount(y, minlength=C)
        self.dis_unlabeled += pseudo_label[mask].sum(axis=0)
        u_len = max(1, int(self.num_unlabeled // len(zw)))
        l_len = max(1, int(self.num_labeled // len(y)))
        frozen = Frozen(self.adjustment, pseudo_label, mask.astype(np.float64), u_len / l_len)
        self.batch_idx += 1
        if self.batch_idx == self.eval_step:  # the end of the epoch
            self.batch_idx = 0
            estimated = self.dis_unlabeled / (self.dis_unlabeled.sum() + 1)
            self.estimated_dis = self.estimated_dis * self.ema_u + estimated * (1 - self.ema_u)
            count_forward = self.count_labeled_dataset + self.dis_unlabeled
            self.adapt_dis = self.adapt_dis * self.ema_u + count_forward / count_forward.sum() * (1 - self.ema_u)
        return frozen


def reference_terms(zx, labeled_strong, y, zs, strong2, frozen: Frozen, wu: float) -> dict:
    """The losses as functions of the logits; broadcast over leading dimensions (z: (..., N, C))."""
    labeled_views = np.concatenate(np.broadcast_arrays(zx, labeled_strong), axis=-2) + frozen.adjustment
    labeled = np_soft_cross_entropy(labeled_views, np.eye(zx.shape[-1])[np.concatenate([y, y])]).mean(axis=-1)
    labeled = labeled / frozen.scale_ratio
    strong_views = np.concatenate(np.broadcast_arrays(zs, strong2), axis=-2) + frozen.adjustment
    targets = np.concatenate([frozen.pseudo_labels, frozen.pseudo_labels])
    mask = np.concatenate([frozen.mask, frozen.mask])
    unlabeled = (mask * np_soft_cross_entropy(strong_views, targets)).mean(axis=-1)
    return dict(total=labeled + wu * unlabeled, labeled=labeled, unlabeled=unlabeled)


def reference_losses(arrays, frozen, wu):
    return reference_terms(arrays["zx"], arrays["labeled_strong"], arrays["y"], arrays["zs"], arrays["strong2"],
                           frozen, wu)


# --- inputs --------------------------------------------------------------------------------------

C, B, MU = 4, 3, 2
LABELED_COUNTS = [4, 2, 1, 1]  # 8 rows: 2 labeled batches of 3 per pass (a distribution exact in float32)
NUM_UNLABELED = 20  # 3 unlabeled batches of 6 per pass: scale_ratio 3 / 2
# Fast priors, a strong adjustment and a low bar, so that masks and priors move within a few steps.
FAST = dict(tau=2.0, ema_u=0.5, confidence=0.6, epoch_steps=3, wu=0.7)
CASES = {"fast": FAST, "defaults-short-epochs": dict(epoch_steps=2)}


def make_steps(seed=0, steps=8, scale=3.0, B=B, mu=MU):
    bias = np.array([1.5, 0.5, 0.0, -0.5])  # the model favours class 0: the priors move away from where they start
    return with_extras(random_batches(seed, steps, B, mu, C, scale, weak_shift=bias), SimPro.extra_logits(),
                       seed + 100, scale)


def options_of(case):
    return {"tau": 1.0, "ema_u": 0.9, "confidence": 0.95, "epoch_steps": 500, "wu": 1.0} | CASES[case]


def float64_method(collective=None, **options) -> SimPro:
    return SimPro(C, NUM_UNLABELED, collective, LABELED_COUNTS, **options).to(dtype=torch.float64)


def reference_of(o) -> ReferenceSimPro:
    return ReferenceSimPro(LABELED_COUNTS, NUM_UNLABELED, o["tau"], o["ema_u"], o["confidence"], o["epoch_steps"])


# --- agreement with the reference over several epochs ------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_losses_masks_and_priors_match_the_reference_step_after_step_across_epochs(case):
    o = options_of(case)
    method, reference = float64_method(**CASES[case]), reference_of(o)
    for step, arrays in enumerate(make_steps()):
        out, _ = run_step(method, arrays)
        frozen = reference.step(arrays["y"], arrays["zw"])
        expected = reference_losses(arrays, frozen, o["wu"])
        for name, value in expected.items():
            np.testing.assert_allclose(getattr(out, name).item(), value, **TOLERANCE, err_msg=f"{name}, step {step}")
        np.testing.assert_array_equal(out.mask.numpy(), frozen.mask, err_msg=f"mask, step {step}")
        np.testing.assert_allclose(method.state["pi"].numpy(), reference.adapt_dis, **TOLERANCE)
        np.testing.assert_allclose(method.state["pi_u"].numpy(), reference.estimated_dis, **TOLERANCE)
        assert method.state["step"].item() == step + 1


def test_the_reference_run_masks_some_rows_and_moves_the_priors_only_at_epoch_ends():
    o = options_of("fast")
    reference, masks, priors = reference_of(o), [], []
    for arrays in make_steps():
        masks.append(reference.step(arrays["y"], arrays["zw"]).mask)
        priors.append((reference.adapt_dis.copy(), reference.estimated_dis.copy()))
    assert any(0 < mask.mean() < 1 for mask in masks)
    moved = [not np.array_equal(before[0], after[0]) for before, after in zip(priors, priors[1:])]
    assert moved == [step % 3 == 1 for step in range(len(moved))]  # after steps 3 and 6 (of 1..8)
    assert not np.allclose(priors[-1][1], 0.25)


def test_priors_start_at_the_labeled_distribution_and_uniform():
    method = SimPro(C, NUM_UNLABELED, None, LABELED_COUNTS)
    torch.testing.assert_close(method.state["pi"], torch.tensor([0.5, 0.25, 0.125, 0.125]))
    torch.testing.assert_close(method.state["pi_u"], torch.full((C,), 0.25))
    assert set(method.class_state()) == {"pi", "pi_u"}


@pytest.mark.parametrize("step", [0, 4])  # the first epoch, and the second (adjusted by moved priors)
def test_gradients_of_the_total_match_finite_differences_of_the_reference(step):
    o, steps = options_of("fast"), make_steps(seed=2)
    method, reference = float64_method(**FAST), reference_of(o)
    for arrays in steps[:step]:
        run_step(method, arrays)
        reference.step(arrays["y"], arrays["zw"])
    arrays = steps[step]
    out, leaves = run_step(method, arrays)
    out.total.backward()
    frozen = reference.step(arrays["y"], arrays["zw"])
    assert 0 < frozen.mask.sum() < len(frozen.mask)

    def total(zx, labeled_strong, zs, strong2):
        return reference_terms(zx, labeled_strong, arrays["y"], zs, strong2, frozen, o["wu"])["total"]

    names = ("zx", "labeled_strong", "zs", "strong2")
    assert_gradients_match_finite_differences(leaves, total, {name: arrays[name] for name in names}, names,
                                              **GRADIENT_TOLERANCE)
    # The pseudo-labels are taken without gradient.
    np.testing.assert_array_equal(gradient_of(leaves["zw"]), np.zeros(arrays["zw"].shape))


def test_scale_ratio_counts_whole_batches_and_never_divides_by_zero():
    # 5 labeled rows at B = 8: no whole batch, counted as 1; 20 unlabeled rows at 16: 1 batch.
    method = SimPro(2, 20, None, [3, 2])
    assert method.scale_ratio(8, 16, torch.zeros(())).item() == 1.0
    method = SimPro(2, 100, None, [30, 10])
    assert method.scale_ratio(8, 16, torch.zeros(())).item() == pytest.approx(6 / 5)


# --- state ---------------------------------------------------------------------------------------

def test_state_round_trip_mid_epoch_continues_identically():
    steps = make_steps(seed=3)
    original = float64_method(**FAST)
    for arrays in steps[:4]:  # one step into the second epoch: the counts are part way
        run_step(original, arrays)
    assert original.state["count_labeled"].sum().item() == B
    resumed = restored_from_checkpoint(original, float64_method(**FAST))
    assert_continues_identically(original, resumed, steps[4:])


def test_state_of_another_size_is_refused():
    other = SimPro(C + 1, NUM_UNLABELED, None, [*LABELED_COUNTS, 1])
    with pytest.raises(TrainConfigError, match="shape"):
        SimPro(C, NUM_UNLABELED, None, LABELED_COUNTS).load_state_dict(other.state_dict())


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("tau", -0.1), ("ema_u", 1.0), ("ema_u", -0.1), ("confidence", 1.5), ("confidence", math.nan),
    ("epoch_steps", 0), ("epoch_steps", 2.5), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(field, value):
    with pytest.raises(TrainConfigError, match=field):
        SimPro(C, NUM_UNLABELED, None, LABELED_COUNTS, **{field: value})


def test_options_default_to_the_reference_values():
    # train.py's argparse defaults: --tau 1, --ema-u 0.9, --threshold 0.95, --eval-step 500.
    assert SimPro(C, NUM_UNLABELED, None, LABELED_COUNTS).config == dict(
        wu=1.0, tau=1.0, ema_u=0.9, confidence=0.95, epoch_steps=500)


def test_the_labeled_counts_and_the_pool_size_are_required():
    with pytest.raises(TrainConfigError, match="labeled_counts"):
        create_method("simpro", C, NUM_UNLABELED)
    with pytest.raises(TrainConfigError, match="num_unlabeled"):
        create_method("simpro", C, 0, labeled_counts=LABELED_COUNTS)
    with pytest.raises(TrainConfigError, match="labeled_counts"):
        create_method("simpro", C, NUM_UNLABELED, labeled_counts=[1, 2])


def test_losses_need_the_strong_labeled_view_and_the_second_strong_view():
    arrays = make_steps(steps=1)[0]
    method = float64_method()
    with pytest.raises(ValueError, match="labeled_strong, strong2"):
        method.losses(*(torch.tensor(arrays[name]) for name in ("zx", "y", "zw", "zs")))


# --- dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_logits_keep_their_dtype_and_the_state_its_own(dtype):
    low = SimPro(C, NUM_UNLABELED, None, LABELED_COUNTS, **FAST)
    totals = run_keeping_dtype(low, float64_method(**FAST), make_steps(seed=7, steps=4), dtype)
    assert low.state["pi"].dtype == torch.float32 and low.state["count_labeled"].dtype == torch.int64
    if dtype == torch.float32:
        for total, exact in totals:
            assert total == pytest.approx(exact, rel=1e-4, abs=1e-5)


# --- the data-parallel hook --------------------------------------------------------------------------

def test_two_workers_with_half_batches_reproduce_one_process_with_the_whole_batch():
    workers, _ = assert_two_workers_on_halves_reproduce_one_process(
        lambda collective: float64_method(collective, **FAST), make_steps(seed=8, steps=7, B=4, mu=3))
    assert workers[0].state["step"].item() == 7  # two epoch ends passed
