"""Specification of FreeMatch (trainables/methods/freematch.py, docs/method.md "Peer methods").

The reference below is written again from FreeMatch's formulas in float64 numpy and uses no
helper of the implementation. One reference step updates the state first (tau, p_model,
label_hist from the weak view), then takes the mask with the updated state, then the losses.
What the method computes without gradient (the state, pseudo-labels, mask, the strong-view
argmax histogram) is frozen at the input point; the reference gradient is the central finite
difference of the rest, which autograd matches only if the stop-gradients sit where FreeMatch
puts them.
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
    finite_difference_gradient,
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
from trainables.methods.freematch import FreeMatch

TOLERANCE = dict(rtol=1e-9, atol=1e-12)  # float64 implementation against float64 reference
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-7)  # against central finite differences


# --- the independent float64 reference ---------------------------------------------------------

def np_inverse_or_zero(x):
    with np.errstate(divide="ignore"):
        inverse = 1 / x
    inverse[inverse == np.inf] = 0.0
    return inverse


@dataclass
class RefState:
    time_p: float
    p_model: np.ndarray
    label_hist: np.ndarray

    @staticmethod
    def initial(C):
        """1/C everywhere, rounded to float32 as the method creates its state (the test's float64
        runs convert that state; test_initial_state_... checks the values themselves)."""
        uniform = np.full(C, np.float32(1.0 / C), dtype=np.float64)
        return RefState(float(np.float32(1.0 / C)), uniform, uniform.copy())


@dataclass(frozen=True)
class Frozen:
    """One step's quantities without gradient, after the state update."""

    state: RefState
    pseudo_labels: np.ndarray
    mask: np.ndarray
    strong_hist_scaler: np.ndarray | None  # 1/hist_s (inf -> 0); None when the mask is empty


def reference_update(state: RefState, zw, o: dict) -> RefState:
    """tau, p_model and the label histogram from the weak view, in float64."""
    m = o["ema_m"]
    P = np_softmax(zw)
    max_probs, max_idx = P.max(axis=1), P.argmax(axis=1)
    batch_tau = np.quantile(max_probs, 0.8) if o["use_quantile"] else max_probs.mean()
    time_p = state.time_p * m + (1 - m) * batch_tau
    if o["clip_thresh"]:
        time_p = float(np.clip(time_p, 0.0, 0.95))
    p_model = state.p_model * m + (1 - m) * P.mean(axis=0)
    hist = np.bincount(max_idx, minlength=len(p_model)).astype(np.float64)
    label_hist = state.label_hist * m + (1 - m) * hist / hist.sum()
    return RefState(time_p, p_model, label_hist)


def reference_frozen(state: RefState, zw, zs, o: dict) -> Frozen:
    new_state = reference_update(state, zw, o)
    P = np_softmax(zw)
    max_probs, max_idx = P.max(axis=1), P.argmax(axis=1)
    mod = new_state.p_model / new_state.p_model.max()
    mask = (max_probs >= new_state.time_p * mod[max_idx]).astype(np.float64)
    scaler = None
    if mask.sum() > 0:
        predictions = np_softmax(zs[mask.astype(bool)]).argmax(axis=1)
        hist_s = np.bincount(predictions, minlength=zs.shape[1]).astype(np.float64)
        scaler = np_inverse_or_zero(hist_s / hist_s.sum())
    return Frozen(new_state, max_idx, mask, scaler)


def reference_terms(zx, y, zs, frozen: Frozen, o: dict) -> dict:
    """The losses as functions of the logits; broadcast over leading dimensions (z: (..., N, C))."""
    labeled = np_cross_entropy(zx, y).mean(axis=-1)
    unlabeled = np.mean(frozen.mask * np_cross_entropy(zs, frozen.pseudo_labels), axis=-1)
    fairness = np.zeros(np.shape(unlabeled))
    if frozen.strong_hist_scaler is not None:
        s = frozen.state
        mod_p_model = s.p_model * np_inverse_or_zero(s.label_hist)
        mod_p_model = mod_p_model / mod_p_model.sum()
        mean_prob_s = np_softmax(zs[..., frozen.mask.astype(bool), :]).mean(axis=-2)
        mod_mean = mean_prob_s * frozen.strong_hist_scaler
        mod_mean = mod_mean / mod_mean.sum(axis=-1, keepdims=True)
        fairness = (mod_p_model * np.log(mod_mean + 1e-12)).sum(axis=-1)
    total = labeled + o["wu"] * unlabeled + o["ent_loss_ratio"] * fairness
    return dict(total=total, labeled=labeled, unlabeled=unlabeled, fairness=fairness)


# --- inputs --------------------------------------------------------------------------------------

DEFAULTS = dict(wu=1.0, ema_m=0.999, ent_loss_ratio=0.01, use_quantile=False, clip_thresh=False)

CASES = {
    # ema_m low enough that tau and p_model move within a few steps, so the mask changes.
    "mean": dict(ema_m=0.6, ent_loss_ratio=0.5, wu=0.7),
    "quantile": dict(ema_m=0.5, use_quantile=True, ent_loss_ratio=0.3),
    "quantile-clip": dict(ema_m=0.2, use_quantile=True, clip_thresh=True, ent_loss_ratio=0.2, wu=2.0),
    "defaults": dict(),
}
CASE_SCALES = {"mean": 2.5, "quantile": 2.5, "quantile-clip": 6.0, "defaults": 2.5}


def make_steps(seed, steps=4, B=4, mu=3, C=5, scale=2.5):
    """Batches of one run; the weak logits lean on the first classes, so the class model skews."""
    return random_batches(seed, steps, B, mu, C, scale, weak_shift=np.linspace(1.0, -1.0, C))


def options_of(case):
    return {**DEFAULTS, **CASES[case]}


def new_method(C, **options):
    return FreeMatch(C, 0, None, **options).to(dtype=torch.float64)


def check_state(method, state: RefState):
    np.testing.assert_allclose(method.state["time_p"].item(), state.time_p, **TOLERANCE)
    np.testing.assert_allclose(method.state["p_model"].numpy(), state.p_model, **TOLERANCE)
    np.testing.assert_allclose(method.state["label_hist"].numpy(), state.label_hist, **TOLERANCE)


# --- agreement with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_several_steps_with_carried_state_match_the_float64_reference(case):
    o, steps = options_of(case), make_steps(seed=1, scale=CASE_SCALES[case])
    C = steps[0]["zx"].shape[1]
    method, state = new_method(C, **CASES[case]), RefState.initial(C)
    for number, batch in enumerate(steps):
        out, _ = run_step(method, batch)
        frozen = reference_frozen(state, batch["zw"], batch["zs"], o)
        expected = reference_terms(batch["zx"], batch["y"], batch["zs"], frozen, o)
        for name in ("total", "labeled", "unlabeled"):
            np.testing.assert_allclose(getattr(out, name).item(), expected[name], **TOLERANCE,
                                       err_msg=f"{name} at step {number}")
        np.testing.assert_allclose(out.stats["loss/entropy"].item(), expected["fairness"], **TOLERANCE)
        np.testing.assert_array_equal(out.mask.numpy(), frozen.mask, err_msg=f"mask at step {number}")
        state = frozen.state
        check_state(method, state)
        assert out.stats["freematch/tau"].item() == pytest.approx(state.time_p, rel=1e-12)


@pytest.mark.parametrize("case", [case for case in CASES if case != "defaults"])  # ema_m = 0.999: tau ~ 1/C
def test_reference_runs_exercise_both_sides_of_the_mask_and_clip_the_threshold(case):
    o, steps = options_of(case), make_steps(seed=1, scale=CASE_SCALES[case])
    state, masks, unclipped = RefState.initial(steps[0]["zx"].shape[1]), [], []
    for batch in steps:
        unclipped.append(reference_update(state, batch["zw"], {**o, "clip_thresh": False}).time_p)
        frozen = reference_frozen(state, batch["zw"], batch["zs"], o)
        masks.append(frozen.mask)
        state = frozen.state
    assert any(0 < mask.mean() < 1 for mask in masks)
    if o["clip_thresh"]:
        assert max(unclipped) > 0.95


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("step", [0, 2])
def test_gradients_of_the_total_match_finite_differences_of_the_reference(case, step):
    o, steps = options_of(case), make_steps(seed=2, scale=CASE_SCALES[case])
    C = steps[0]["zx"].shape[1]
    method, state = new_method(C, **CASES[case]), RefState.initial(C)
    for batch in steps[:step]:  # carry the state to the step under test
        run_step(method, batch)
        state = reference_update(state, batch["zw"], o)
    batch = steps[step]
    out, leaves = run_step(method, batch)
    out.total.backward()
    frozen = reference_frozen(state, batch["zw"], batch["zs"], o)
    assert frozen.mask.sum() > 0  # the fairness term takes part

    assert_gradients_match_finite_differences(
        leaves, lambda **inputs: reference_terms(**inputs, frozen=frozen, o=o)["total"],
        dict(zx=batch["zx"], y=batch["y"], zs=batch["zs"]), ("zx", "zs"), **GRADIENT_TOLERANCE)
    # Everything taken from the weak view is without gradient.
    np.testing.assert_array_equal(gradient_of(leaves["zw"]), np.zeros(batch["zw"].shape))


# --- state ---------------------------------------------------------------------------------------

def test_initial_state_is_uniform_with_threshold_one_over_c():
    method = FreeMatch(4, 0, None)
    assert method.state["time_p"].item() == pytest.approx(0.25)
    torch.testing.assert_close(method.state["p_model"], torch.full((4,), 0.25))
    torch.testing.assert_close(method.state["label_hist"], torch.full((4,), 0.25))
    assert set(method.class_state()) == {"p_model", "label_hist"}


def test_state_round_trip_half_way_continues_identically():
    steps = make_steps(seed=3, steps=4)
    original = new_method(5, **CASES["mean"])
    for batch in steps[:2]:
        run_step(original, batch)
    resumed = restored_from_checkpoint(original, new_method(5, **CASES["mean"]))
    assert_continues_identically(original, resumed, steps[2:])


# --- edge cases ----------------------------------------------------------------------------------

def test_empty_mask_gives_no_fairness_term_and_no_strong_gradient():
    batch = make_steps(seed=4, steps=1, scale=0.5)[0]  # unconfident rows: max p well under 0.9
    method = new_method(5, ema_m=0.9, ent_loss_ratio=1.0)
    method.state["time_p"] = torch.tensor(1.0, dtype=torch.float64)  # tau_t = 0.9 + 0.1 * mean max p
    out, leaves = run_step(method, batch)
    out.total.backward()
    assert out.mask.sum().item() == 0
    assert out.stats["loss/entropy"].item() == 0
    assert out.unlabeled.item() == 0
    expected_labeled = np_cross_entropy(batch["zx"], batch["y"]).mean()
    assert out.total.item() == pytest.approx(expected_labeled, rel=1e-12)
    assert torch.isfinite(leaves["zx"].grad).all()
    assert leaves["zs"].grad is None or (leaves["zs"].grad == 0).all()


def test_a_class_never_predicted_drops_out_of_the_fairness_term():
    # ema_m = 0: label_hist is the batch histogram. The weak view predicts classes 0 and 1 only
    # (h~ has zeros: 1/h~ = inf, set to 0), the masked strong rows predict 0, 1, 2 (classes 3
    # and 4 absent from hist_s as well).
    C = 5
    rng = np.random.default_rng(5)
    zw = np.full((6, C), -4.0)
    zw[np.arange(6), [0, 1, 0, 1, 0, 0]] = 4.0
    zs = rng.standard_normal((6, C))
    zs[np.arange(6), [0, 1, 2, 2, 0, 1]] += 6.0
    batch = dict(zx=rng.standard_normal((3, C)), y=np.array([0, 3, 4]), zw=zw, zs=zs)
    o = {**DEFAULTS, "ema_m": 0.0, "ent_loss_ratio": 1.0}
    method = new_method(C, ema_m=0.0, ent_loss_ratio=1.0)
    out, leaves = run_step(method, batch)
    out.total.backward()

    frozen = reference_frozen(RefState.initial(C), zw, zs, o)
    assert (frozen.state.label_hist[2:] == 0).all() and (frozen.strong_hist_scaler[3:] == 0).all()
    assert frozen.mask.sum() > 0
    expected = reference_terms(batch["zx"], batch["y"], zs, frozen, o)
    for name in ("total", "unlabeled"):
        np.testing.assert_allclose(getattr(out, name).item(), expected[name], **TOLERANCE)
    np.testing.assert_allclose(out.stats["loss/entropy"].item(), expected["fairness"], **TOLERANCE)
    assert math.isfinite(out.total.item())
    for leaf in leaves.values():
        assert leaf.grad is None or torch.isfinite(leaf.grad).all()
    expected_grad = finite_difference_gradient(
        lambda x: reference_terms(batch["zx"], batch["y"], x, frozen, o)["total"], zs)
    np.testing.assert_allclose(leaves["zs"].grad.numpy(), expected_grad, **GRADIENT_TOLERANCE)


def test_all_rows_confident_are_all_kept():
    C = 4
    batch = confident_balanced_batch(C)
    method = new_method(C, ema_m=0.5)
    out, _ = run_step(method, batch)
    assert out.mask.tolist() == [1.0] * 8
    o = {**DEFAULTS, "ema_m": 0.5}
    frozen = reference_frozen(RefState.initial(C), batch["zw"], batch["zs"], o)
    expected = reference_terms(batch["zx"], batch["y"], batch["zs"], frozen, o)
    np.testing.assert_allclose(out.total.item(), expected["total"], **TOLERANCE)
    # L_u is then the plain mean cross-entropy against the pseudo-labels.
    np.testing.assert_allclose(out.unlabeled.item(), np_cross_entropy(batch["zs"], np.arange(8) % C).mean(),
                               **TOLERANCE)


def test_mask_compares_with_the_threshold_scaled_by_the_relative_class_model():
    # ema_m = 0: tau = mean max p, p~ = the batch mean; rows of a rarer class face a lower bar.
    zw = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.6]], dtype=torch.float64)
    probs = torch.softmax(zw, dim=1)
    tau = probs.max(dim=1).values.mean().item()
    p_model = probs.mean(dim=0)
    bars = [tau * (p_model[c] / p_model.max()).item() for c in (0, 0, 0, 1)]
    method = new_method(2, ema_m=0.0)
    out = method.losses(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), zw,
                        torch.zeros(4, 2, dtype=torch.float64))
    confidences = probs.max(dim=1).values.tolist()
    assert confidences[2] > confidences[3]
    assert confidences[3] < tau  # under the global threshold, yet kept: its class is the rarer one
    assert out.mask.tolist() == [float(c >= bar) for c, bar in zip(confidences, bars)] == [1.0, 1.0, 0.0, 1.0]


# --- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("ema_m", 1.0), ("ema_m", -0.1), ("ema_m", math.nan), ("ent_loss_ratio", -0.01),
    ("use_quantile", 1), ("clip_thresh", "yes"), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(field, value):
    with pytest.raises(TrainConfigError, match=field):
        FreeMatch(10, 0, None, **{field: value})


def test_unknown_option_is_a_config_error_naming_it():
    with pytest.raises(TrainConfigError, match="p_cutoff"):
        FreeMatch(10, 0, None, p_cutoff=0.95)


def test_options_default_to_the_reference_values():
    assert FreeMatch(10).config == dict(wu=1.0, ema_m=0.999, ent_loss_ratio=0.01, use_quantile=False,
                                        clip_thresh=False)


# --- dtypes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_logits_keep_their_dtype_and_the_state_its_own(dtype):
    low = FreeMatch(5, 0, None, **CASES["mean"])
    totals = run_keeping_dtype(low, new_method(5, **CASES["mean"]), make_steps(seed=7, steps=2), dtype)
    assert all(value.dtype == torch.float32 for value in low.state.values())
    if dtype == torch.float32:
        total, exact = totals[-1]
        assert total == pytest.approx(exact, rel=1e-4, abs=1e-5)


# --- the data-parallel hook --------------------------------------------------------------------------

def lopsided(steps):
    """Worker 0's unlabeled rows unconfident (none masked), worker 1's confident."""
    for batch in steps:
        batch["zw"][:6] *= 0.05
        batch["zw"][6:] *= 4.0
    return steps


@pytest.mark.parametrize("case, shape", [("mean", make_steps), ("quantile", make_steps), ("mean", lopsided)],
                         ids=["mean", "quantile", "one-worker-masks-nothing"])
def test_two_workers_with_half_batches_reproduce_one_process_with_the_whole_batch(case, shape):
    steps = make_steps(seed=8, steps=3, B=4, mu=3)
    if shape is lopsided:
        steps = lopsided(steps)
    workers = [FreeMatch(5, 0, collective, **CASES[case]).to(dtype=torch.float64)
               for collective in threaded_collectives()]
    outputs = assert_workers_reproduce_one_process(
        new_method(5, **CASES[case]), workers, steps,
        labeled_rows=[slice(0, 2), slice(2, 4)], unlabeled_rows=[slice(0, 6), slice(6, 12)],
        tolerance=dict(rtol=1e-10, atol=1e-12), state_tolerance=dict(rtol=1e-12, atol=1e-14))
    if shape is lopsided:
        for outs in outputs:
            assert outs[0].mask.sum() == 0 and outs[1].mask.sum() > 0
