"""Specification of SoftMatch (trainables/methods/softmatch.py, docs/method.md "Peer methods").

The reference below is written again from SoftMatch's formulas in float64 numpy and uses no
helper of the implementation. One reference step: the model's class distribution p_model (the
batch mean on the first step, a moving average after), uniform alignment of the weak
probabilities with the updated p_model, the moving mean and unbiased variance of the aligned
max probability, then the truncated Gaussian weight with the updated statistics; pseudo-labels
come from the unaligned weak probabilities. The weights and pseudo-labels are without gradient,
so they are frozen for the finite differences of the losses.
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
    confident_balanced_batch,
    gradient_of,
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
from trainables.methods.softmatch import SoftMatch

TOLERANCE = dict(rtol=1e-9, atol=1e-12)  # float64 implementation against float64 reference
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-7)  # against central finite differences


# --- the independent float64 reference ---------------------------------------------------------

@dataclass
class RefState:
    p_model: np.ndarray | None  # None until the first step
    mu: float
    var: float

    @staticmethod
    def initial(C):
        # mu = 1/C rounded to float32, as the method creates its state (test_initial_state_... checks it).
        return RefState(None, float(np.float32(1.0 / C)), 1.0)


@dataclass(frozen=True)
class Frozen:
    state: RefState
    aligned_confidences: np.ndarray
    pseudo_labels: np.ndarray
    mask: np.ndarray


def reference_frozen(state: RefState, zw, o: dict) -> Frozen:
    m, C = o["ema_m"], zw.shape[1]
    P = np_softmax(zw)
    p_model = P.mean(axis=0) if state.p_model is None else state.p_model * m + P.mean(axis=0) * (1 - m)
    aligned = P * (1.0 / C + 1e-6) / (p_model + 1e-6)
    aligned = aligned / aligned.sum(axis=1, keepdims=True)
    conf = aligned.max(axis=1)
    mu = m * state.mu + (1 - m) * conf.mean()
    var = m * state.var + (1 - m) * conf.var(ddof=1)
    mask = np.exp(-(np.minimum(conf - mu, 0.0) ** 2) / (2 * var / o["n_sigma"] ** 2))
    return Frozen(RefState(p_model, mu, var), conf, P.argmax(axis=1), mask)


def reference_terms(zx, y, zs, frozen: Frozen, o: dict) -> dict:
    """The losses as functions of the logits; broadcast over leading dimensions (z: (..., N, C))."""
    labeled = np_cross_entropy(zx, y).mean(axis=-1)
    unlabeled = np.mean(frozen.mask * np_cross_entropy(zs, frozen.pseudo_labels), axis=-1)
    return dict(total=labeled + o["wu"] * unlabeled, labeled=labeled, unlabeled=unlabeled)


# --- inputs --------------------------------------------------------------------------------------

DEFAULTS = dict(wu=1.0, ema_m=0.999, n_sigma=2)

CASES = {
    "ema": dict(ema_m=0.7),
    "narrow": dict(ema_m=0.5, n_sigma=4, wu=0.5),
    "no-memory": dict(ema_m=0.0, n_sigma=1, wu=2.0),
    "defaults": dict(),
}


def make_steps(seed, steps=4, B=4, mu=3, C=5, scale=2.5):
    """Batches of one run; the weak logits lean on the first classes, so p_model is far from uniform."""
    return random_batches(seed, steps, B, mu, C, scale, weak_shift=np.linspace(1.5, -1.5, C))


def options_of(case):
    return {**DEFAULTS, **CASES[case]}


def new_method(C, **options):
    return SoftMatch(C, 0, None, **options).to(dtype=torch.float64)


def check_state(method, state: RefState):
    assert method.state["p_model_set"].item() is True
    np.testing.assert_allclose(method.state["p_model"].numpy(), state.p_model, **TOLERANCE)
    np.testing.assert_allclose(method.state["prob_max_mu"].item(), state.mu, **TOLERANCE)
    np.testing.assert_allclose(method.state["prob_max_var"].item(), state.var, **TOLERANCE)


# --- agreement with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_several_steps_with_carried_state_match_the_float64_reference(case):
    o, steps = options_of(case), make_steps(seed=1)
    C = steps[0]["zx"].shape[1]
    method, state = new_method(C, **CASES[case]), RefState.initial(C)
    for number, batch in enumerate(steps):
        out, _ = run_step(method, batch)
        frozen = reference_frozen(state, batch["zw"], o)
        expected = reference_terms(batch["zx"], batch["y"], batch["zs"], frozen, o)
        for name in ("total", "labeled", "unlabeled"):
            np.testing.assert_allclose(getattr(out, name).item(), expected[name], **TOLERANCE,
                                       err_msg=f"{name} at step {number}")
        np.testing.assert_allclose(out.mask.numpy(), frozen.mask, **TOLERANCE, err_msg=f"mask at step {number}")
        state = frozen.state
        check_state(method, state)
        assert out.stats["softmatch/mu"].item() == pytest.approx(state.mu, rel=1e-12)
        assert out.stats["softmatch/var"].item() == pytest.approx(state.var, rel=1e-12)


@pytest.mark.parametrize("case", [case for case in CASES if case != "defaults"])  # ema_m = 0.999: mu ~ 1/C
def test_reference_runs_exercise_both_sides_of_the_truncation_and_alignment_changes_a_label(case):
    o, steps = options_of(case), make_steps(seed=1)
    state, masks, relabeled = RefState.initial(steps[0]["zx"].shape[1]), [], []
    for batch in steps:
        frozen = reference_frozen(state, batch["zw"], o)
        P = np_softmax(batch["zw"])
        aligned_labels = (P / (frozen.state.p_model + 1e-6)).argmax(axis=1)
        relabeled.append((aligned_labels != frozen.pseudo_labels).any())
        masks.append(frozen.mask)
        state = frozen.state
    assert any((mask < 1).any() and (mask == 1).any() for mask in masks)
    assert any(relabeled)  # so the test would see pseudo-labels taken from the aligned probabilities


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("step", [0, 2])
def test_gradients_of_the_total_match_finite_differences_of_the_reference(case, step):
    o, steps = options_of(case), make_steps(seed=2)
    C = steps[0]["zx"].shape[1]
    method, state = new_method(C, **CASES[case]), RefState.initial(C)
    for batch in steps[:step]:  # carry the state to the step under test
        run_step(method, batch)
        state = reference_frozen(state, batch["zw"], o).state
    batch = steps[step]
    out, leaves = run_step(method, batch)
    out.total.backward()
    frozen = reference_frozen(state, batch["zw"], o)

    assert_gradients_match_finite_differences(
        leaves, lambda **inputs: reference_terms(**inputs, frozen=frozen, o=o)["total"],
        dict(zx=batch["zx"], y=batch["y"], zs=batch["zs"]), ("zx", "zs"), **GRADIENT_TOLERANCE)
    # The weights and pseudo-labels come from the weak view without gradient.
    np.testing.assert_array_equal(gradient_of(leaves["zw"]), np.zeros(batch["zw"].shape))


# --- hand-worked cases -----------------------------------------------------------------------------

def test_initial_state_has_mean_one_over_c_variance_one_and_no_class_model_yet():
    method = SoftMatch(4, 0, None)
    assert method.state["prob_max_mu"].item() == pytest.approx(0.25)
    assert method.state["prob_max_var"].item() == 1.0
    assert method.state["p_model_set"].item() is False
    assert set(method.class_state()) == {"p_model"}


def test_class_model_is_the_batch_mean_on_the_first_step_and_a_moving_average_after():
    zw1 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    zw2 = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    method = new_method(3, ema_m=0.9)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    method.losses(zeros, torch.tensor([0, 1]), zw1, zeros)
    first = torch.softmax(zw1, dim=1).mean(dim=0)
    torch.testing.assert_close(method.state["p_model"], first, rtol=1e-15, atol=0)
    method.losses(zeros, torch.tensor([0, 1]), zw2, zeros)
    torch.testing.assert_close(method.state["p_model"], 0.9 * first + 0.1 * torch.softmax(zw2, dim=1).mean(dim=0),
                               rtol=1e-15, atol=1e-17)


def test_pseudo_labels_come_from_the_unaligned_weak_probabilities():
    # Step 1 sets p_model from a batch dominated by class 0. Step 2's first row prefers class 0
    # slightly; aligned, it prefers class 1. Its loss must still be CE(z_s, class 0).
    method = new_method(2, ema_m=0.0)
    dominated = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    zeros = torch.zeros(4, 2, dtype=torch.float64)
    method.losses(zeros[:1], torch.tensor([0]), dominated, zeros)
    p_model = method.state["p_model"].clone()
    weak = torch.tensor([[0.3, 0.0], [0.3, 0.0]], dtype=torch.float64)
    probs = torch.softmax(weak, dim=1)
    assert (probs * (0.5 + 1e-6) / (p_model + 1e-6)).argmax(dim=1).tolist() == [1, 1]
    strong = torch.tensor([[0.0, 2.0], [0.0, 2.0]], dtype=torch.float64)
    out = method.losses(zeros[:1], torch.tensor([0]), weak, strong)
    ce_class_0 = math.log(1 + math.exp(2.0))
    # Identical rows: the variance is 0 with ema_m = 0 and both rows sit at the mean: weight 1.
    assert out.mask.tolist() == [1.0, 1.0]
    assert out.unlabeled.item() == pytest.approx(ce_class_0, rel=1e-12)


def test_weight_uses_the_mean_and_variance_updated_by_this_batch():
    # ema_m = 0: mu and var are this batch's; the weight is a Gaussian below the mean, 1 above it.
    zw = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.5, 0.0], [0.0, 0.2]], dtype=torch.float64)
    method = new_method(2, ema_m=0.0, n_sigma=3)
    out = method.losses(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), zw,
                        torch.zeros(4, 2, dtype=torch.float64))
    probs = torch.softmax(zw, dim=1)
    p_model = probs.mean(dim=0)
    aligned = probs * (0.5 + 1e-6) / (p_model + 1e-6)
    conf = (aligned / aligned.sum(dim=1, keepdim=True)).max(dim=1).values
    mu, var = conf.mean(), conf.var(unbiased=True)
    expected = torch.where(conf >= mu, torch.ones_like(conf), torch.exp(-(conf - mu) ** 2 * 9 / (2 * var)))
    torch.testing.assert_close(out.mask, expected, rtol=1e-12, atol=0)
    assert (expected < 1).any() and (expected == 1).any()
    assert method.state["prob_max_var"].item() == pytest.approx(var.item(), rel=1e-12)


def test_all_rows_confident_get_weight_one():
    C = 4
    batch = confident_balanced_batch(C)
    method = new_method(C, ema_m=0.5)
    out, _ = run_step(method, batch)
    assert out.mask.tolist() == [1.0] * 8
    np.testing.assert_allclose(out.unlabeled.item(), np_cross_entropy(batch["zs"], np.arange(8) % C).mean(),
                               **TOLERANCE)


def test_a_single_unlabeled_row_leaves_the_variance_unchanged():
    # The unbiased variance of one row is undefined; var keeps its value, mu moves.
    method = new_method(3, ema_m=0.5)
    zw = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    out = method.losses(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0]), zw,
                        torch.zeros(1, 3, dtype=torch.float64))
    assert method.state["prob_max_var"].item() == 1.0
    # p_model is this row, so the aligned row is uniform up to the 1e-6 of the ratio: conf ~ 1/3 ~ mu.
    assert method.state["prob_max_mu"].item() == pytest.approx(1 / 3, rel=1e-5)
    assert torch.isfinite(out.total) and torch.isfinite(out.mask).all()


def test_zero_variance_without_memory_gives_finite_weights():
    method = new_method(3, ema_m=0.0)
    zw = torch.tensor([[1.0, 0.0, -1.0]] * 4, dtype=torch.float64)
    out = method.losses(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0]), zw,
                        torch.zeros(4, 3, dtype=torch.float64))
    assert method.state["prob_max_var"].item() == 0.0
    assert out.mask.tolist() == [1.0] * 4
    assert torch.isfinite(out.total)


# --- state ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [0, 2])
def test_state_round_trip_continues_identically(split):
    steps = make_steps(seed=3, steps=4)
    original = new_method(5, **CASES["ema"])
    for batch in steps[:split]:
        run_step(original, batch)
    resumed = restored_from_checkpoint(original, new_method(5, **CASES["ema"]))
    assert resumed.state["p_model_set"].item() is (split > 0)
    assert_continues_identically(original, resumed, steps[split:])


# --- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("ema_m", 1.0), ("ema_m", -0.1), ("ema_m", math.inf), ("n_sigma", 0), ("n_sigma", -1), ("n_sigma", 1.5),
    ("n_sigma", "2"), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(field, value):
    with pytest.raises(TrainConfigError, match=field):
        SoftMatch(10, 0, None, **{field: value})


def test_unknown_option_is_a_config_error_naming_it():
    with pytest.raises(TrainConfigError, match="dist_uniform"):
        SoftMatch(10, 0, None, dist_uniform=False)


def test_options_default_to_the_reference_values():
    assert SoftMatch(10).config == dict(wu=1.0, ema_m=0.999, n_sigma=2)


# --- dtypes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_logits_keep_their_dtype_and_the_state_its_own(dtype):
    low = SoftMatch(5, 0, None, **CASES["ema"])
    totals = run_keeping_dtype(low, new_method(5, **CASES["ema"]), make_steps(seed=7, steps=2), dtype)
    assert {key: value.dtype for key, value in low.state.items()} == dict(
        p_model=torch.float32, p_model_set=torch.bool, prob_max_mu=torch.float32, prob_max_var=torch.float32)
    if dtype == torch.float32:
        total, exact = totals[-1]
        assert total == pytest.approx(exact, rel=1e-4, abs=1e-5)


# --- the data-parallel hook --------------------------------------------------------------------------

def test_two_workers_with_half_batches_reproduce_one_process_with_the_whole_batch():
    workers = [SoftMatch(5, 0, collective, **CASES["narrow"]).to(dtype=torch.float64)
               for collective in threaded_collectives()]
    assert_workers_reproduce_one_process(
        new_method(5, **CASES["narrow"]), workers, make_steps(seed=8, steps=3, B=4, mu=3),
        labeled_rows=[slice(0, 2), slice(2, 4)], unlabeled_rows=[slice(0, 6), slice(6, 12)],
        tolerance=dict(rtol=1e-10, atol=1e-12), state_tolerance=dict(rtol=1e-12, atol=1e-14))
