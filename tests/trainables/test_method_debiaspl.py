"""Specification of DebiasPL (trainables/methods/debiaspl.py, docs/method.md "Peer methods").

The reference below is written again from DebiasPL's formulas in float64 numpy and uses no helper
of the implementation. Per step: pseudo-labels c_k and confidences from
softmax(z_w - tau log qhat) with the qhat of before the step, mask_k = confidence_k >= threshold;
then qhat <- m qhat + (1 - m) mean_k softmax(z_w)[k]; then
L_u = mean_k mask_k CE(z_s[k] + tau log qhat, c_k) with the updated qhat, L_x = mean_i CE(z_l[i], y_i),
total = L_x + wu L_u. What DebiasPL takes without gradient (pseudo-labels, mask, qhat) is frozen
at the input point; the reference gradient is the central finite difference of the rest.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from method_checks import (
    assert_continues_identically,
    assert_gradients_match_finite_differences,
    assert_workers_reproduce_one_process,
    np_cross_entropy,
    np_softmax,
    one_intra_op_thread,  # noqa: F401 (an autouse fixture: importing it applies it)
    random_batches,
    restored_from_checkpoint,
    run_keeping_dtype,
    run_step,
    threaded_collectives,
)

from trainables.errors import TrainConfigError
from trainables.methods.debiaspl import DebiasPL
from trainables.methods.fixmatch import FixMatch

TOLERANCE = dict(rtol=1e-9, atol=1e-12)
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


# --- the independent float64 reference ---------------------------------------------------------

@dataclass(frozen=True)
class Frozen:
    """What one step takes without gradient."""

    pseudo_labels: np.ndarray
    mask: np.ndarray
    qhat: np.ndarray  # after this step's update: the strong branch's adjustment


class ReferenceDebiasPL:
    def __init__(self, num_classes, tau, qhat_m, confidence):
        self.tau, self.qhat_m, self.confidence = tau, qhat_m, confidence
        self.qhat = np.full(num_classes, 1.0 / num_classes)

    def step(self, zw) -> Frozen:
        debiased = np_softmax(zw - self.tau * np.log(self.qhat))
        mask = debiased.max(axis=1) >= self.confidence
        self.qhat = self.qhat_m * self.qhat + (1 - self.qhat_m) * np_softmax(zw).mean(axis=0)
        return Frozen(pseudo_labels=debiased.argmax(axis=1), mask=mask.astype(np.float64), qhat=self.qhat.copy())


def reference_terms(zx, y, zw, zs, frozen: Frozen, tau: float, wu: float) -> dict:
    labeled = np_cross_entropy(zx, y).mean(axis=-1)
    adjusted = zs + tau * np.log(frozen.qhat)
    unlabeled = np.mean(frozen.mask * np_cross_entropy(adjusted, frozen.pseudo_labels), axis=-1)
    return dict(total=labeled + wu * unlabeled, labeled=labeled, unlabeled=unlabeled)


# --- inputs --------------------------------------------------------------------------------------

C, B, MU, STEPS = 4, 3, 2, 8
# A fast-moving qhat and a strong tau, so that debiasing changes pseudo-labels within a few steps.
TAU, QHAT_M, CONFIDENCE, WU = 1.0, 0.7, 0.8, 0.5


def make_steps(seed=0, steps=STEPS, scale=3.0):
    bias = np.array([1.5, 0.5, 0.0, -0.5])  # the model favours class 0: qhat drifts away from uniform
    return random_batches(seed, steps, B, MU, C, scale, weak_shift=bias)


def float64_method(**options) -> DebiasPL:
    options = dict(tau=TAU, qhat_m=QHAT_M, confidence=CONFIDENCE, wu=WU) | options
    return DebiasPL(C, 0, None, **options).to(dtype=torch.float64)


# --- agreement with the reference over several steps ---------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(tau=0.4, qhat_m=0.999, confidence=0.7)], ids=["fast", "paper"])
def test_losses_masks_and_qhat_match_the_reference_step_after_step(options):
    method = float64_method(**options)
    o = dict(tau=TAU, qhat_m=QHAT_M, confidence=CONFIDENCE) | options
    reference = ReferenceDebiasPL(C, **o)
    for step, arrays in enumerate(make_steps()):
        out, _ = run_step(method, arrays)
        frozen = reference.step(arrays["zw"])
        expected = reference_terms(arrays["zx"], arrays["y"], arrays["zw"], arrays["zs"], frozen, o["tau"], WU)
        for name, value in expected.items():
            np.testing.assert_allclose(getattr(out, name).item(), value, **TOLERANCE, err_msg=f"{name}, step {step}")
        np.testing.assert_array_equal(out.mask.numpy(), frozen.mask, err_msg=f"mask, step {step}")
        np.testing.assert_allclose(method.state["qhat"].numpy(), frozen.qhat, **TOLERANCE, err_msg=f"qhat, {step}")


def test_reference_steps_exercise_both_sides_of_the_mask_and_debiasing_that_changes_labels():
    reference = ReferenceDebiasPL(C, TAU, QHAT_M, CONFIDENCE)
    partial_masks, changed_labels = 0, 0
    for arrays in make_steps():
        plain_labels = arrays["zw"].argmax(axis=1)
        frozen = reference.step(arrays["zw"])
        partial_masks += 0 < frozen.mask.mean() < 1
        changed_labels += (frozen.pseudo_labels != plain_labels).sum()
    assert partial_masks >= STEPS // 2
    assert changed_labels > 0
    assert reference.qhat.max() / reference.qhat.min() > 1.5  # away from uniform by the end


@pytest.mark.parametrize("step", [0, 5])
def test_gradients_of_the_total_match_the_reference_with_pseudo_labels_mask_and_qhat_frozen(step):
    method, reference = float64_method(), ReferenceDebiasPL(C, TAU, QHAT_M, CONFIDENCE)
    steps = make_steps()
    for arrays in steps[:step]:
        run_step(method, arrays)
        reference.step(arrays["zw"])
    arrays = steps[step]
    out, leaves = run_step(method, arrays)
    frozen = reference.step(arrays["zw"])
    out.total.backward()
    assert_gradients_match_finite_differences(
        leaves, lambda **inputs: reference_terms(**inputs, frozen=frozen, tau=TAU, wu=WU)["total"],
        arrays, ("zx", "zw", "zs"), **GRADIENT_TOLERANCE)
    assert leaves["zw"].grad is None  # pseudo-labels, mask and qhat carry no gradient


# --- hand-worked cases ---------------------------------------------------------------------------

def test_qhat_is_a_moving_average_of_the_plain_weak_probabilities():
    method = DebiasPL(2, 0, None, qhat_m=0.9, tau=2.0).to(dtype=torch.float64)
    probs_weak = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    method.losses(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), probs_weak.log(),
                  torch.zeros(2, 2, dtype=torch.float64))
    # The batch mean [0.7, 0.3] of the plain (not debiased) probabilities: 0.9 * [0.5, 0.5] + 0.1 * [0.7, 0.3].
    np.testing.assert_allclose(method.state["qhat"].numpy(), [0.52, 0.48], rtol=1e-14)
    assert not method.state["qhat"].requires_grad


def test_pseudo_labels_use_qhat_from_before_the_step_and_the_strong_logits_the_updated_one():
    method = DebiasPL(2, 0, None, tau=1.0, qhat_m=0.0, confidence=0.85).to(dtype=torch.float64)
    weak = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    strong = torch.tensor([[0.3, -0.2], [1.0, 1.0], [-0.5, 0.7]], dtype=torch.float64)
    out = method.losses(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), weak, strong)
    # qhat was uniform, so the pseudo-labels are the plain ones: [0, 0, 1] at confidences
    # [0.88, 0.88, 0.62]. With the updated qhat = mean softmax(weak) = [0.71, 0.29] instead, rows
    # 0 and 1 would fall to 0.75 and none would pass 0.85.
    assert out.mask.tolist() == [1.0, 1.0, 0.0]
    q = torch.softmax(weak, dim=1).mean(dim=0)
    np.testing.assert_allclose(method.state["qhat"].numpy(), q.numpy(), rtol=1e-15)
    adjusted = strong + q.log()
    row_losses = [torch.logsumexp(adjusted[k], 0) - adjusted[k, 0] for k in (0, 1)]
    assert out.unlabeled.item() == pytest.approx(sum(row_losses).item() / 3, rel=1e-12)


def test_with_uniform_qhat_the_pseudo_labels_are_fixmatchs():
    arrays = make_steps(seed=3)[0]
    debiaspl = float64_method(confidence=0.7)
    fixmatch = FixMatch(C, 0, None, confidence=0.7, wu=WU).to(dtype=torch.float64)
    out, _ = run_step(debiaspl, arrays)
    expected, _ = run_step(fixmatch, arrays)
    assert torch.equal(out.mask, expected.mask)
    assert out.labeled.item() == pytest.approx(expected.labeled.item(), rel=1e-14)


def test_tau_zero_is_fixmatch_with_qhat_as_its_class_prior():
    debiaspl = float64_method(tau=0.0)
    fixmatch = FixMatch(C, 0, None, confidence=CONFIDENCE, cap_momentum=QHAT_M, wu=WU).to(dtype=torch.float64)
    for arrays in make_steps(seed=4, steps=4):
        out, _ = run_step(debiaspl, arrays)
        expected, _ = run_step(fixmatch, arrays)
        for name in ("total", "labeled", "unlabeled", "mask"):
            torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(debiaspl.state["qhat"], fixmatch.state["p_ema"], rtol=1e-13, atol=1e-15)


def test_total_is_labeled_plus_wu_times_unlabeled():
    method = float64_method(wu=0.25)
    out, _ = run_step(method, make_steps()[0])
    assert out.total.item() == pytest.approx(out.labeled.item() + 0.25 * out.unlabeled.item(), rel=1e-12)


# --- state -----------------------------------------------------------------------------------------

def test_initial_qhat_is_uniform_and_is_the_only_state():
    method = DebiasPL(5, 0, None)
    assert set(method.state) == {"qhat"} and set(method.class_state()) == {"qhat"}
    np.testing.assert_allclose(method.state["qhat"].numpy(), [0.2] * 5)
    assert method.state["qhat"].dtype == torch.float32
    assert not DebiasPL.needs_index


def test_state_round_trip_half_way_continues_identically():
    steps = make_steps(seed=1)
    original = float64_method()
    for arrays in steps[:4]:
        run_step(original, arrays)
    assert_continues_identically(original, restored_from_checkpoint(original, float64_method()), steps[4:])


def test_state_of_another_class_count_does_not_load():
    with pytest.raises(TrainConfigError, match="qhat"):
        DebiasPL(C, 0, None).load_state_dict(DebiasPL(C + 1, 0, None).state_dict())


# --- edges -----------------------------------------------------------------------------------------

def test_empty_mask_gives_zero_unlabeled_loss_and_no_strong_gradient_but_qhat_still_moves():
    method = float64_method(confidence=1.0)
    arrays = make_steps()[0]
    out, leaves = run_step(method, arrays)
    assert out.mask.tolist() == [0.0] * (MU * B)
    assert out.unlabeled.item() == 0.0
    assert out.total.item() == pytest.approx(out.labeled.item(), rel=1e-15)
    out.total.backward()
    assert leaves["zs"].grad.abs().max().item() == 0.0
    expected = QHAT_M * 0.25 + (1 - QHAT_M) * np_softmax(arrays["zw"]).mean(axis=0)
    np.testing.assert_allclose(method.state["qhat"].numpy(), expected, rtol=1e-14)


def test_all_rows_confident_use_every_row():
    method = float64_method(confidence=1e-6)
    reference = ReferenceDebiasPL(C, TAU, QHAT_M, 1e-6)
    arrays = make_steps()[0]
    out, _ = run_step(method, arrays)
    frozen = reference.step(arrays["zw"])
    assert out.mask.tolist() == [1.0] * (MU * B)
    expected = reference_terms(arrays["zx"], arrays["y"], arrays["zw"], arrays["zs"], frozen, TAU, WU)
    assert out.unlabeled.item() == pytest.approx(expected["unlabeled"], rel=1e-12)


def test_a_class_never_predicted_shrinks_in_qhat_and_is_favoured_by_the_debiased_labels():
    method = DebiasPL(4, 0, None, tau=1.0, qhat_m=0.5, confidence=0.5).to(dtype=torch.float64)
    weak = torch.tensor([[3.0, 3.0, 3.0, -30.0]], dtype=torch.float64).repeat(2, 1)  # class 3 never predicted
    for _ in range(4):
        method.losses(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([0]), weak,
                      torch.zeros(2, 4, dtype=torch.float64))
    qhat = method.state["qhat"]
    p3 = torch.softmax(weak[0], dim=0)[3].item()
    # qhat[3] = 0.5^4 / 4 + (1 - 0.5^4) p3, while the three predicted classes share the rest.
    assert qhat[3].item() == pytest.approx(0.5 ** 4 / 4 + (1 - 0.5 ** 4) * p3, rel=1e-12)
    assert qhat.sum().item() == pytest.approx(1.0, rel=1e-14)
    debiased = torch.softmax(weak[0] - qhat.log(), dim=0)
    assert debiased[3] > torch.softmax(weak[0], dim=0)[3] * 10  # the rare class gains


def test_a_class_whose_probability_underflows_keeps_qhat_and_losses_finite():
    method = DebiasPL(3, 0, None, tau=1.0, qhat_m=0.0, confidence=0.5).to(dtype=torch.float64)
    weak = torch.tensor([[0.0, 0.0, -1e4]], dtype=torch.float64)  # softmax exactly 0 for class 2
    strong = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # qhat[2] is exactly 0 after the first step
        out = method.losses(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0]), weak, strong)
    assert method.state["qhat"][2].item() == 0.0
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(strong.grad).all()


def test_a_debiased_confidence_exactly_at_the_threshold_counts():
    weak = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    confidence = torch.softmax(weak, dim=1)[0, 0].item()  # qhat is uniform at first: no shift
    method = DebiasPL(C, 0, None, confidence=confidence).to(dtype=torch.float64)
    out = method.losses(torch.zeros(1, C, dtype=torch.float64), torch.tensor([0]), weak,
                        torch.zeros(1, C, dtype=torch.float64))
    assert out.mask.tolist() == [1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_keep_the_logits_dtype_and_qhat_keeps_its_own(dtype):
    method = DebiasPL(C, 0, None, tau=TAU, qhat_m=QHAT_M, confidence=CONFIDENCE, wu=WU)
    totals = run_keeping_dtype(method, float64_method(), make_steps()[:3], dtype)
    if dtype == torch.float32:
        for total, exact in totals:
            assert total == pytest.approx(exact, rel=1e-5)
    assert method.state["qhat"].dtype == torch.float32


# --- configuration errors ------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("tau", -0.1), ("tau", math.inf), ("qhat_m", 1.0), ("qhat_m", -0.1), ("confidence", 0.0),
    ("confidence", 1.5), ("confidence", math.nan), ("tau", True), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(option, value):
    with pytest.raises(TrainConfigError, match=option):
        DebiasPL(C, 0, None, **{option: value})


def test_defaults_are_the_references():
    assert DebiasPL(C, 0, None).config == dict(wu=1.0, tau=0.4, qhat_m=0.999, confidence=0.95)


def test_unknown_option_is_a_config_error_listing_the_options():
    with pytest.raises(TrainConfigError, match="qhat_m"):
        DebiasPL(C, 0, None, masked_qhat=True)


# --- data parallelism through the collective -----------------------------------------------------

def test_two_workers_keep_the_single_process_qhat_losses_and_gradients():
    workers = [DebiasPL(C, 0, collective, tau=TAU, qhat_m=QHAT_M, confidence=CONFIDENCE, wu=WU)
               .to(dtype=torch.float64) for collective in threaded_collectives()]
    assert_workers_reproduce_one_process(
        float64_method(), workers, make_steps(seed=2, steps=4),
        labeled_rows=[slice(0, 1), slice(1, 3)], unlabeled_rows=[slice(0, 2), slice(2, 6)],  # uneven on purpose
        tolerance=dict(rtol=1e-12, atol=1e-14), state_tolerance=dict(rtol=1e-14, atol=1e-16))
