"""Specification of FlexMatch (trainables/methods/flexmatch.py, docs/method.md "Peer methods").

The reference below is written again from FlexMatch's formulas in float64 numpy and plain Python
(a Counter over the memory, a loop writing it) and uses no helper of the implementation. Per step:
P = softmax(z_w); mask_k = max P[k] >= tau * M(sigma[c_k]), M(x) = x / (2 - x), with sigma from
before the step; rows with max P >= tau write c_k into the memory; then, unless one value fills
the whole memory, sigma_c = count(c) / the largest count (the unused -1 entries included with
warm-up, excluded without). What FlexMatch takes without gradient (pseudo-labels, mask) is frozen
at the input point; the reference gradient is the central finite difference of the rest.
"""

import math
from collections import Counter
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
from trainables.methods.base import MethodOutput
from trainables.methods.flexmatch import FlexMatch

TOLERANCE = dict(rtol=1e-9, atol=1e-12)
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


# --- the independent float64 reference ---------------------------------------------------------

@dataclass(frozen=True)
class Frozen:
    """What one step takes without gradient."""

    pseudo_labels: np.ndarray
    mask: np.ndarray


class ReferenceFlexMatch:
    def __init__(self, num_classes, num_unlabeled, confidence, thresh_warmup=True):
        self.C, self.N = num_classes, num_unlabeled
        self.confidence, self.thresh_warmup = confidence, thresh_warmup
        self.selected_label = [-1] * num_unlabeled
        self.classwise_acc = np.zeros(num_classes)

    def step(self, zw, index) -> Frozen:
        P = np_softmax(zw)
        max_probs, pseudo_labels = P.max(axis=1), P.argmax(axis=1)
        sigma = self.classwise_acc[pseudo_labels]
        mask = max_probs >= self.confidence * (sigma / (2.0 - sigma))
        for position, label, p in zip(index, pseudo_labels, max_probs):
            if p >= self.confidence:
                self.selected_label[position] = int(label)
        counter = Counter(self.selected_label)
        if max(counter.values()) < self.N:
            if self.thresh_warmup:
                largest = max(counter.values())
            else:
                largest = max(count for value, count in counter.items() if value != -1)
            self.classwise_acc = np.array([counter[c] / largest for c in range(self.C)])
        return Frozen(pseudo_labels=pseudo_labels, mask=mask.astype(np.float64))


def reference_terms(zx, y, zw, zs, frozen: Frozen, wu: float) -> dict:
    labeled = np_cross_entropy(zx, y).mean(axis=-1)
    unlabeled = np.mean(frozen.mask * np_cross_entropy(zs, frozen.pseudo_labels), axis=-1)
    return dict(total=labeled + wu * unlabeled, labeled=labeled, unlabeled=unlabeled)


# --- inputs --------------------------------------------------------------------------------------

C, N, B, MU, STEPS = 4, 10, 3, 2, 8  # 6 unlabeled rows per step over a pool of 10: positions recur
CONFIDENCE, WU = 0.8, 0.5


def make_steps(seed=0, steps=STEPS, scale=3.0):
    return random_batches(seed, steps, B, MU, C, scale, pool=N)


def float64_method(**options) -> FlexMatch:
    options = dict(confidence=CONFIDENCE, wu=WU) | options
    return FlexMatch(C, N, None, **options).to(dtype=torch.float64)


def assert_matches_reference(out: MethodOutput, method: FlexMatch, reference: ReferenceFlexMatch,
                             frozen: Frozen, arrays, step: int):
    expected = reference_terms(arrays["zx"], arrays["y"], arrays["zw"], arrays["zs"], frozen, WU)
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(out, name).item(), value, **TOLERANCE, err_msg=f"{name}, step {step}")
    np.testing.assert_array_equal(out.mask.numpy(), frozen.mask, err_msg=f"mask, step {step}")
    np.testing.assert_array_equal(method.state["selected_label"].numpy(), reference.selected_label,
                                  err_msg=f"selected_label, step {step}")
    np.testing.assert_allclose(method.state["classwise_acc"].numpy(), reference.classwise_acc, **TOLERANCE,
                               err_msg=f"classwise_acc, step {step}")


# --- agreement with the reference over several steps ---------------------------------------------

@pytest.mark.parametrize("thresh_warmup", [True, False])
def test_losses_masks_memory_and_learning_effects_match_the_reference_step_after_step(thresh_warmup):
    method = float64_method(thresh_warmup=thresh_warmup)
    reference = ReferenceFlexMatch(C, N, CONFIDENCE, thresh_warmup)
    for step, arrays in enumerate(make_steps()):
        out, _ = run_step(method, arrays)
        frozen = reference.step(arrays["zw"], arrays["index"])
        assert_matches_reference(out, method, reference, frozen, arrays, step)


def test_reference_steps_exercise_both_sides_of_the_mask_and_of_the_selection():
    reference = ReferenceFlexMatch(C, N, CONFIDENCE)
    partial_masks, partial_selections, sigmas, overwrites = 0, 0, [], 0
    for arrays in make_steps():
        before = list(reference.selected_label)
        frozen = reference.step(arrays["zw"], arrays["index"])
        partial_masks += 0 < frozen.mask.mean() < 1
        partial_selections += 0 < (np_softmax(arrays["zw"]).max(axis=1) >= CONFIDENCE).mean() < 1
        sigmas.append(reference.classwise_acc.copy())
        overwrites += sum(b != -1 and b != a for b, a in zip(before, reference.selected_label))
    assert partial_masks >= 2 and partial_selections >= STEPS // 2
    assert any(((s > 0) & (s < 1)).any() for s in sigmas)  # learning effects strictly between 0 and 1
    assert overwrites > 0  # a row's memory entry changes class
    assert -1 in reference.selected_label  # the warm-up bucket is still in play at the end


def test_first_step_masks_every_row_since_all_learning_effects_start_at_zero():
    method = float64_method()
    arrays = make_steps()[0]
    out, _ = run_step(method, arrays)
    assert out.mask.tolist() == [1.0] * (MU * B)


@pytest.mark.parametrize("step", [0, 3])
def test_gradients_of_the_total_match_the_reference_with_pseudo_labels_and_mask_frozen(step):
    method, reference = float64_method(), ReferenceFlexMatch(C, N, CONFIDENCE)
    steps = make_steps()
    for arrays in steps[:step]:
        run_step(method, arrays)
        reference.step(arrays["zw"], arrays["index"])
    arrays = steps[step]
    out, leaves = run_step(method, arrays)
    frozen = reference.step(arrays["zw"], arrays["index"])
    out.total.backward()
    assert_gradients_match_finite_differences(
        leaves, lambda **inputs: reference_terms(**inputs, frozen=frozen, wu=WU)["total"],
        {name: arrays[name] for name in ("zx", "y", "zw", "zs")}, ("zx", "zw", "zs"), **GRADIENT_TOLERANCE)
    assert leaves["zw"].grad is None  # pseudo-labels, mask and memory carry no gradient


# --- state -----------------------------------------------------------------------------------------

def test_initial_state_is_an_unused_memory_and_zero_learning_effects():
    method = FlexMatch(C, N, None)
    assert method.state["selected_label"].dtype == torch.long
    assert method.state["selected_label"].tolist() == [-1] * N
    assert method.state["classwise_acc"].tolist() == [0.0] * C
    assert set(method.class_state()) == {"classwise_acc"}  # the per-row memory is not a per-class curve


def test_state_round_trip_half_way_continues_identically():
    steps = make_steps(seed=1)
    original = float64_method()
    for arrays in steps[:3]:
        run_step(original, arrays)
    assert_continues_identically(original, restored_from_checkpoint(original, float64_method()), steps[3:])


def test_state_of_another_pool_size_does_not_load():
    method = FlexMatch(C, N, None)
    with pytest.raises(TrainConfigError, match="selected_label"):
        method.load_state_dict(FlexMatch(C, N + 1, None).state_dict())


# --- hand-worked cases and edges -------------------------------------------------------------------

def confident_logits(labels, num_classes=C, margin=20.0):
    return torch.tensor(margin * np.eye(num_classes)[labels], dtype=torch.float64)


def step_with(method, weak, index, strong=None):
    n = len(weak)
    strong = torch.zeros(n, C, dtype=torch.float64) if strong is None else strong
    return method.losses(torch.zeros(1, C, dtype=torch.float64), torch.tensor([0]), weak, strong,
                         torch.tensor(index))


@pytest.mark.parametrize("thresh_warmup, expected", [(True, [2 / 3, 1 / 3, 0, 0]), (False, [1, 1 / 2, 0, 0])])
def test_learning_effects_normalise_by_the_largest_count_with_or_without_the_unused_rows(thresh_warmup, expected):
    method = FlexMatch(C, 6, None, confidence=0.9, thresh_warmup=thresh_warmup).to(dtype=torch.float64)
    step_with(method, confident_logits([0, 0, 1]), [3, 4, 5])  # memory [-1, -1, -1, 0, 0, 1]
    assert method.state["selected_label"].tolist() == [-1, -1, -1, 0, 0, 1]
    np.testing.assert_allclose(method.state["classwise_acc"].numpy(), expected, rtol=1e-15)


def test_threshold_is_confidence_times_the_convex_mapping_of_the_learning_effect():
    method = FlexMatch(C, 6, None, confidence=0.9).to(dtype=torch.float64)
    step_with(method, confident_logits([0, 0, 1]), [3, 4, 5])  # sigma = [2/3, 1/3, 0, 0]
    # Class 0: 0.9 * (2/3) / (4/3) = 0.45; class 1: 0.9 * (1/3) / (5/3) = 0.18.
    probs = torch.tensor([[0.46, 0.18, 0.18, 0.18],     # class 0, above 0.45
                          [0.44, 0.186, 0.187, 0.187],  # class 0, below 0.45
                          [0.27, 0.46, 0.135, 0.135],   # class 1, above 0.18
                          [0.3, 0.175, 0.35, 0.175]],   # class 2, never selected: threshold 0
                         dtype=torch.float64)
    out = step_with(method, probs.log(), [0, 1, 2, 3])
    assert out.mask.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_mask_uses_the_learning_effects_from_before_this_steps_memory_update():
    method = FlexMatch(C, 4, None, confidence=0.9).to(dtype=torch.float64)
    step_with(method, confident_logits([0, 1]), [0, 1])  # sigma = [1/2, 1/2, 0, 0] (two unused rows)
    # Class 2 has never been selected: its threshold is 0 during this step, although the same step
    # selects two class-2 rows and so raises sigma[2] to 1 for the next one.
    weak = confident_logits([2, 2], margin=3.0)  # confidence about 0.87 < 0.9: not selected...
    weak = torch.cat([weak, confident_logits([2, 2])])  # ...these two are
    out = step_with(method, weak, [0, 1, 2, 3])
    assert out.mask.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert method.state["selected_label"].tolist() == [0, 1, 2, 2]
    np.testing.assert_allclose(method.state["classwise_acc"].numpy(), [1 / 2, 1 / 2, 1, 0])


def test_a_class_never_predicted_keeps_learning_effect_zero_and_threshold_zero():
    method = FlexMatch(C, 4, None, confidence=0.9).to(dtype=torch.float64)
    step_with(method, confident_logits([0, 1]), [0, 1])
    weak = torch.tensor([[0.0, 0.0, 0.1, 0.0]], dtype=torch.float64)  # class 2 with confidence ~0.26
    out = step_with(method, weak, [2])
    assert out.mask.tolist() == [1.0]
    assert method.state["classwise_acc"][2].item() == 0.0 and method.state["classwise_acc"][3].item() == 0.0


def test_empty_mask_gives_zero_unlabeled_loss_no_strong_gradient_and_leaves_the_memory():
    method = FlexMatch(C, 8, None, confidence=0.9).to(dtype=torch.float64)
    step_with(method, confident_logits([0, 1, 2, 3, 0, 1, 2, 3]), list(range(8)))  # sigma all 1
    memory, sigma = method.state["selected_label"].clone(), method.state["classwise_acc"].clone()
    np.testing.assert_array_equal(sigma.numpy(), [1, 1, 1, 1])
    weak = torch.zeros(3, C, dtype=torch.float64)  # uniform: confidence 1/4 < every threshold 0.9
    strong = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    logits_x = torch.randn(2, C, dtype=torch.float64, requires_grad=True)
    out = method.losses(logits_x, torch.tensor([0, 1]), weak, strong, torch.tensor([1, 4, 7]))
    assert out.mask.tolist() == [0.0, 0.0, 0.0]
    assert out.unlabeled.item() == 0.0
    assert out.total.item() == pytest.approx(out.labeled.item(), rel=1e-15)
    out.total.backward()
    assert strong.grad.abs().max().item() == 0.0
    assert torch.equal(method.state["selected_label"], memory) and torch.equal(method.state["classwise_acc"], sigma)


def test_all_rows_confident_fill_the_memory_but_one_value_everywhere_leaves_the_learning_effects():
    method = FlexMatch(C, 4, None, confidence=0.9).to(dtype=torch.float64)
    out = step_with(method, confident_logits([0, 0, 0, 0]), [0, 1, 2, 3])
    assert out.mask.tolist() == [1.0] * 4
    assert method.state["selected_label"].tolist() == [0, 0, 0, 0]
    assert method.state["classwise_acc"].tolist() == [0.0] * C  # one value fills the memory: no update
    step_with(method, confident_logits([1, 0, 0, 0]), [0, 1, 2, 3])  # now two values: updated
    np.testing.assert_allclose(method.state["classwise_acc"].numpy(), [1, 1 / 3, 0, 0])


def test_a_confidence_exactly_at_the_threshold_counts_for_the_mask_and_the_memory():
    weak = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    confidence = torch.softmax(weak, dim=1)[0, 0].item()
    method = FlexMatch(C, 2, None, confidence=confidence).to(dtype=torch.float64)
    step_with(method, weak, [1])
    assert method.state["selected_label"].tolist() == [-1, 0]
    np.testing.assert_allclose(method.state["classwise_acc"].numpy(), [1, 0, 0, 0])  # sigma 1: threshold tau
    assert step_with(method, weak, [0]).mask.tolist() == [1.0]


def test_a_position_twice_in_one_batch_keeps_its_last_selected_pseudo_label():
    method = FlexMatch(C, 3, None, confidence=0.9).to(dtype=torch.float64)
    weak = torch.cat([confident_logits([1]), confident_logits([2]), torch.zeros(1, C, dtype=torch.float64)])
    step_with(method, weak, [0, 0, 0])  # class 1, then class 2, then an unconfident row
    assert method.state["selected_label"].tolist() == [2, -1, -1]


def test_unlabeled_loss_averages_over_all_rows_masked_or_not_and_total_adds_wu_times_it():
    method = FlexMatch(C, 4, None, confidence=0.9, wu=0.25).to(dtype=torch.float64)
    step_with(method, confident_logits([0, 1, 2, 3]), [0, 1, 2, 3])  # sigma all 1: threshold 0.9
    weak = torch.cat([confident_logits([0]), torch.zeros(1, C, dtype=torch.float64)])
    strong = torch.tensor([[0.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    logits_x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = method.losses(logits_x, torch.tensor([0]), weak, strong, torch.tensor([0, 1]))
    assert out.mask.tolist() == [1.0, 0.0]
    row_0 = math.log(3 + math.e)  # CE([0, 1, 0, 0], class 0)
    assert out.unlabeled.item() == pytest.approx(row_0 / 2, rel=1e-12)
    labeled = math.log(math.e + 3) - 1.0
    assert out.labeled.item() == pytest.approx(labeled, rel=1e-12)
    assert out.total.item() == pytest.approx(labeled + 0.25 * row_0 / 2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_keep_the_logits_dtype_and_state_keeps_its_own(dtype):
    method = FlexMatch(C, N, None, confidence=CONFIDENCE, wu=WU)
    totals = run_keeping_dtype(method, float64_method(), make_steps()[:3], dtype)
    if dtype == torch.float32:
        for total, exact in totals:
            assert total == pytest.approx(exact, rel=1e-5)
    assert method.state["selected_label"].dtype == torch.long
    assert method.state["classwise_acc"].dtype == torch.float32


def test_stats_report_the_share_of_the_memory_still_unused():
    method = FlexMatch(C, 4, None, confidence=0.9).to(dtype=torch.float64)
    out = step_with(method, confident_logits([0]), [2])
    assert out.stats["flexmatch/unused"].item() == pytest.approx(0.75)
    assert out.stats["flexmatch/unused"].dim() == 0 and not out.stats["flexmatch/unused"].requires_grad


# --- configuration errors ------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("confidence", 0.0), ("confidence", 1.5), ("confidence", math.nan), ("confidence", "high"),
    ("thresh_warmup", 1), ("thresh_warmup", "yes"), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(option, value):
    with pytest.raises(TrainConfigError, match=option):
        FlexMatch(C, N, None, **{option: value})


def test_defaults_are_the_references():
    method = FlexMatch(C, N, None)
    assert method.config == dict(wu=1.0, confidence=0.95, thresh_warmup=True)


def test_unknown_option_is_a_config_error_listing_the_options():
    with pytest.raises(TrainConfigError, match="thresh_warmup"):
        FlexMatch(C, N, None, p_cutoff=0.9)


@pytest.mark.parametrize("num_unlabeled", [0, -3])
def test_flexmatch_without_unlabeled_rows_is_refused(num_unlabeled):
    with pytest.raises(TrainConfigError, match="num_unlabeled"):
        FlexMatch(C, num_unlabeled, None)


def test_losses_without_the_rows_positions_is_an_error():
    method = FlexMatch(C, N, None)
    arrays = make_steps()[0]
    with pytest.raises(ValueError, match="unlabeled_index"):
        method.losses(torch.tensor(arrays["zx"]), torch.tensor(arrays["y"]), torch.tensor(arrays["zw"]),
                      torch.tensor(arrays["zs"]))


# --- data parallelism through the collective -----------------------------------------------------

def test_two_workers_keep_the_single_process_memory_losses_and_gradients():
    workers = [FlexMatch(C, N, collective, confidence=CONFIDENCE, wu=WU).to(dtype=torch.float64)
               for collective in threaded_collectives()]
    assert_workers_reproduce_one_process(
        float64_method(), workers, make_steps(seed=2),
        labeled_rows=[slice(0, 1), slice(1, 3)], unlabeled_rows=[slice(0, 2), slice(2, 6)],  # uneven on purpose
        tolerance=dict(rtol=1e-12, atol=1e-14), state_tolerance=dict(rtol=0, atol=0))
