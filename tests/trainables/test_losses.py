"""Specification of the FixMatch + CAP / CAI / CADR losses (trainables/losses.py, docs/method.md).

The reference below is written again from the formulas of docs/method.md in float64 numpy and uses no
helper from losses.py. What they compute "without gradient" (W, p_new, thresholds,
pseudo-labels, both masks) is frozen at the input point; the reference gradient is then the
central finite difference of the rest, which autograd matches only if the stop-gradients sit
where docs/method.md puts them (W constant, gradient through P in q = W @ P).
"""

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
from method_checks import threaded_collectives

from trainables.errors import TrainConfigError
from trainables.losses import (
    LocalCollective,
    LossOutput,
    class_thresholds,
    compute_losses,
    normalized_inverse_weights,
    safe_log,
)
from trainables.methods import create_method

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The tensors here are tiny: extra CPU threads only add contention (10x slower on a busy box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- the independent float64 reference ---------------------------------------------------------

@dataclass(frozen=True)
class Options:
    cap: bool
    cai: bool
    cadr: bool
    cap_ema: bool = True
    cap_form: str = "reference"
    confidence: float = 0.95
    cai_beta: float = 0.5
    cap_momentum: float = 0.99
    upper: float = 5.0
    wu: float = 1.0


@dataclass(frozen=True)
class Frozen:
    """The reference's quantities taken without gradient."""

    W: np.ndarray  # (1, muB)
    p_new: np.ndarray  # (C,)
    thresholds: np.ndarray  # (C,)
    pseudo_labels: np.ndarray  # (muB,)
    mask: np.ndarray  # (muB,)
    cadr_predictions: np.ndarray  # (B,)
    cadr_mask: np.ndarray  # (B,)


# The functions below broadcast over leading dimensions, so the finite differences of every
# coordinate are evaluated in one call: z is (..., N, C).

def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_cross_entropy(z, y):
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -(log_probs * np.eye(z.shape[-1])[y]).sum(axis=-1)


def np_inverse_weights(pi):
    return pi.shape[-1] * (1 / pi) / np.sum(1 / pi, axis=-1, keepdims=True)


def reference_frozen(zx, zw, p_ema, o: Options) -> Frozen:
    P = np_softmax(zw)
    p_new = o.cap_momentum * p_ema + (1 - o.cap_momentum) * P.mean(axis=0)
    thresholds = o.confidence * (p_new / p_new.max()) ** o.cai_beta
    conf, pseudo_labels = P.max(axis=1), P.argmax(axis=1)
    mask = conf > thresholds[pseudo_labels] if o.cai else conf >= o.confidence
    P_l = np_softmax(zx)
    predictions = P_l.argmax(axis=1)
    return Frozen(
        W=np.clip(p_ema[None, :] @ np.linalg.pinv(P), 0, o.upper),
        p_new=p_new, thresholds=thresholds, pseudo_labels=pseudo_labels,
        mask=mask.astype(np.float64), cadr_predictions=predictions,
        cadr_mask=(P_l.max(axis=1) > thresholds[predictions]).astype(np.float64))


def reference_terms(zx, y, zw, zs, frozen: Frozen, o: Options) -> dict:
    ce_x = np_cross_entropy(zx, y)
    cadr = 0.0
    if not o.cap:
        labeled = ce_x.mean(axis=-1)
    else:
        P = np_softmax(zw)
        q = (frozen.W @ P)[..., 0, :] if o.cap_ema else P.mean(axis=-2)
        w = np_inverse_weights(q[..., y])
        labeled = np.mean(ce_x - np.log(w) if o.cap_form == "reference" else w * ce_x, axis=-1)
        if o.cadr:
            w_pred = np_inverse_weights(q[..., frozen.cadr_predictions])
            cadr = np.mean(frozen.cadr_mask * np.log(w_pred), axis=-1)
            labeled = labeled + cadr
    unlabeled = np.mean(frozen.mask * np_cross_entropy(zs, frozen.pseudo_labels), axis=-1)
    return dict(total=labeled + o.wu * unlabeled, labeled=labeled, unlabeled=unlabeled, cadr=cadr)


def finite_difference_gradient(f, x, h=1e-6):
    """Central differences of f at x along every coordinate, all in one broadcast call of f."""
    steps = h * np.eye(x.size).reshape(x.size, *x.shape)
    differences = (f(x + steps) - f(x - steps)) / (2 * h)  # 0-d when f does not depend on x
    return np.broadcast_to(differences, (x.size,)).reshape(x.shape)


# --- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    B: int
    mu: int
    C: int
    scale: float  # logits scale: larger means more confident rows
    confidence: float
    upper: float
    wu: float
    seed: int


BATCHES = [
    Batch(B=4, mu=2, C=3, scale=2.0, confidence=0.8, upper=0.3, wu=1.0, seed=0),
    Batch(B=8, mu=7, C=10, scale=5.0, confidence=0.8, upper=5.0, wu=0.5, seed=1),
    Batch(B=3, mu=1, C=5, scale=3.0, confidence=0.9, upper=0.4, wu=2.0, seed=3),  # fewer rows than classes
]


def batch_id(batch: Batch) -> str:
    return f"B{batch.B}-mu{batch.mu}-C{batch.C}"

FLAG_COMBINATIONS = (
    [dict(cap=False, cai=cai, cadr=False) for cai in (False, True)]
    + [dict(cap=True, cai=cai, cadr=cadr, cap_ema=cap_ema, cap_form=cap_form)
       for cai in (False, True) for cadr in (False, True)
       for cap_ema in (True, False) for cap_form in ("reference", "ipw")])


def flags_id(flags):
    names = [name for name in ("cap", "cai", "cadr") if flags[name]]
    if flags["cap"]:
        names += ["ema" if flags.get("cap_ema", True) else "batchmean", flags.get("cap_form", "reference")]
    return "-".join(names) or "fixmatch"


def make_arrays(batch: Batch):
    rng = np.random.default_rng(batch.seed)
    n_unlabeled = batch.mu * batch.B
    prior = rng.uniform(0.2, 1.0, batch.C)
    return dict(
        zx=batch.scale * rng.standard_normal((batch.B, batch.C)),
        y=rng.integers(batch.C, size=batch.B),
        zw=batch.scale * rng.standard_normal((n_unlabeled, batch.C)),
        zs=batch.scale * rng.standard_normal((n_unlabeled, batch.C)),
        p_ema=prior / prior.sum())


def run_losses(arrays, options: Options, dtype=torch.float64) -> tuple[LossOutput, dict]:
    """compute_losses on the arrays; returns the output and the logits leaves it saw."""
    leaves = {name: torch.tensor(arrays[name], dtype=dtype, requires_grad=True)
              for name in ("zx", "zw", "zs")}
    out = compute_losses(leaves["zx"], torch.tensor(arrays["y"]), leaves["zw"], leaves["zs"],
                         torch.tensor(arrays["p_ema"], dtype=dtype), **asdict(options))
    return out, leaves


def gradient_of(leaf: torch.Tensor) -> np.ndarray:
    """The leaf's gradient; zeros where the loss does not depend on it at all."""
    return np.zeros(leaf.shape) if leaf.grad is None else leaf.grad.numpy()


def batch_options(flags, batch: Batch) -> Options:
    return Options(**flags, confidence=batch.confidence, upper=batch.upper, wu=batch.wu)


# --- agreement with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("batch", BATCHES, ids=batch_id)
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=flags_id)
def test_losses_masks_and_prior_match_the_float64_reference(flags, batch):
    arrays, options = make_arrays(batch), batch_options(flags, batch)
    out, _ = run_losses(arrays, options)
    frozen = reference_frozen(arrays["zx"], arrays["zw"], arrays["p_ema"], options)
    expected = reference_terms(arrays["zx"], arrays["y"], arrays["zw"], arrays["zs"], frozen, options)

    for name, value in expected.items():
        np.testing.assert_allclose(getattr(out, name).item(), value, **TOLERANCE, err_msg=name)
    np.testing.assert_array_equal(out.mask.numpy(), frozen.mask)
    np.testing.assert_allclose(out.p_new.numpy(), frozen.p_new, **TOLERANCE)
    np.testing.assert_allclose(out.thresholds.numpy(), frozen.thresholds, **TOLERANCE)


@pytest.mark.parametrize("batch", BATCHES, ids=batch_id)
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=flags_id)
def test_gradients_of_the_total_match_the_float64_reference(flags, batch):
    arrays, options = make_arrays(batch), batch_options(flags, batch)
    out, leaves = run_losses(arrays, options)
    out.total.backward()
    frozen = reference_frozen(arrays["zx"], arrays["zw"], arrays["p_ema"], options)

    inputs = {name: arrays[name] for name in ("zx", "y", "zw", "zs")}

    for name in ("zx", "zw", "zs"):
        def total(x, name=name):
            return reference_terms(**{**inputs, name: x}, frozen=frozen, o=options)["total"]
        expected = finite_difference_gradient(total, arrays[name])
        np.testing.assert_allclose(gradient_of(leaves[name]), expected, **TOLERANCE, err_msg=name)


def test_reference_batches_exercise_both_sides_of_every_mask_and_of_the_clip():
    cadr_masks, raw_row_weights = [], []
    for batch in BATCHES:
        arrays = make_arrays(batch)
        for cai in (False, True):
            options = Options(cap=True, cai=cai, cadr=True, confidence=batch.confidence)
            frozen = reference_frozen(arrays["zx"], arrays["zw"], arrays["p_ema"], options)
            assert 0 < frozen.mask.mean() < 1, (batch, cai)
            cadr_masks.append(frozen.cadr_mask)
        raw_row_weights.append(arrays["p_ema"] @ np.linalg.pinv(np_softmax(arrays["zw"])) / batch.upper)
    assert any(0 < mask.mean() < 1 for mask in cadr_masks)
    assert any(w.min() < 0 for w in raw_row_weights) and any(w.max() > 1 for w in raw_row_weights)


# --- hand-worked cases ---------------------------------------------------------------------------

def test_class_thresholds_scale_tau_by_the_relative_prior_to_the_power_beta():
    prior = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    root_half = math.sqrt(0.5)
    np.testing.assert_allclose(class_thresholds(prior, 0.8, 0.5).numpy(), [0.8, 0.8 * root_half, 0.8 * root_half])
    np.testing.assert_allclose(class_thresholds(prior, 0.8, 1.0).numpy(), [0.8, 0.4, 0.4])
    np.testing.assert_allclose(class_thresholds(prior, 0.8, 0.0).numpy(), [0.8, 0.8, 0.8])


def test_normalized_inverse_weights_are_proportional_to_one_over_pi_and_average_to_one():
    weights = normalized_inverse_weights(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), LocalCollective())
    # 1/pi = [2, 4, 4], sum 10, B = 3: w = 3 * [2, 4, 4] / 10.
    np.testing.assert_allclose(weights.numpy(), [0.6, 1.2, 1.2])
    assert weights.mean().item() == pytest.approx(1.0)


def test_prior_update_is_a_moving_average_of_the_batch_predictions_with_or_without_cap():
    probs_weak = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    for flags in (dict(cap=False, cai=False, cadr=False), dict(cap=True, cai=True, cadr=True)):
        out = compute_losses(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([0, 1]),
                             probs_weak.log(), torch.zeros(2, 2, dtype=torch.float64),
                             torch.tensor([0.5, 0.5], dtype=torch.float64),
                             **asdict(Options(**flags, cap_momentum=0.9)))
        # p_batch = [0.7, 0.3]; p_new = 0.9 * [0.5, 0.5] + 0.1 * [0.7, 0.3].
        np.testing.assert_allclose(out.p_new.numpy(), [0.52, 0.48])
        assert not out.p_new.requires_grad


# Class 0 is the frequent one (p_ema), so its CAI threshold is exactly tau; class 1 is rare.
EDGE_WEAK_LOGITS = torch.tensor([[1.0, 0.0],   # class 0, confidence exactly tau
                                 [3.0, 0.0],   # class 0, above tau
                                 [0.5, 0.0],   # class 0, below tau
                                 [0.0, 0.8]],  # class 1, below tau but above t[1]
                                dtype=torch.float64)
EDGE_TAU = torch.softmax(EDGE_WEAK_LOGITS, dim=1)[0, 0].item()


def edge_mask(cai: bool) -> list:
    out = compute_losses(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([0, 1]), EDGE_WEAK_LOGITS,
                         torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64),
                         **asdict(Options(cap=False, cai=cai, cadr=False, confidence=EDGE_TAU)))
    assert out.thresholds[0].item() == EDGE_TAU
    return out.mask.tolist()


def test_fixmatch_mask_keeps_a_row_whose_confidence_equals_tau():
    assert edge_mask(cai=False) == [1.0, 1.0, 0.0, 0.0]


def test_cai_mask_drops_a_row_at_its_class_threshold_and_keeps_a_confident_enough_rare_row():
    assert edge_mask(cai=True) == [0.0, 1.0, 0.0, 1.0]


def test_cadr_term_uses_the_class_thresholds_strictly_even_without_cai():
    weak = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labeled = torch.tensor([[1.0, 0.0],   # predicts class 0 with confidence exactly tau: left out
                            [0.0, 5.0]],  # predicts class 1 confidently: kept
                           dtype=torch.float64)
    tau = torch.softmax(labeled, dim=1)[0, 0].item()
    out = compute_losses(labeled, torch.tensor([0, 1]), weak, torch.zeros(2, 2, dtype=torch.float64),
                         torch.tensor([0.9, 0.1], dtype=torch.float64),
                         **asdict(Options(cap=True, cai=False, cadr=True, cap_ema=False, confidence=tau)))
    # q = mean of P; w'_1 = 2 * (1/q1) / (1/q0 + 1/q1) = 2 q0 / (q0 + q1); term = (0 + log w'_1) / 2.
    q0, q1 = torch.softmax(weak, dim=1).mean(dim=0).tolist()
    assert out.cadr.item() == pytest.approx(0.5 * math.log(2 * q0 / (q0 + q1)), rel=1e-12)


@pytest.mark.parametrize("cap_form", ["reference", "ipw"])
def test_cap_with_a_uniform_propensity_leaves_the_labeled_loss_plain_cross_entropy(cap_form):
    logits_x = torch.tensor([[2.0, -1.0], [0.3, 0.1], [-1.0, 1.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    weak = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # mean of P is [1/2, 1/2]
    out = compute_losses(logits_x, labels, weak, torch.zeros(2, 2, dtype=torch.float64),
                         torch.tensor([0.5, 0.5], dtype=torch.float64),
                         **asdict(Options(cap=True, cai=False, cadr=False, cap_ema=False, cap_form=cap_form)))
    plain = torch.nn.functional.cross_entropy(logits_x, labels).item()
    assert out.labeled.item() == pytest.approx(plain, rel=1e-12)


def test_unlabeled_loss_averages_over_all_rows_masked_or_not():
    strong = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    weak = torch.tensor([[9.0, 0.0], [0.0, 0.1]], dtype=torch.float64)  # row 0 confident in class 0, row 1 not
    out = compute_losses(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), weak, strong,
                         torch.tensor([0.5, 0.5], dtype=torch.float64),
                         **asdict(Options(cap=False, cai=False, cadr=False)))
    assert out.mask.tolist() == [1.0, 0.0]
    row_0_loss = math.log(1 + math.e)  # CE([0, 1], class 0)
    assert out.unlabeled.item() == pytest.approx(row_0_loss / 2, rel=1e-12)


def test_total_is_labeled_plus_wu_times_unlabeled():
    arrays = make_arrays(BATCHES[1])
    out, _ = run_losses(arrays, Options(cap=True, cai=True, cadr=True, confidence=0.8, wu=0.25))
    assert out.total.item() == pytest.approx(out.labeled.item() + 0.25 * out.unlabeled.item(), rel=1e-12)


def test_cap_sends_the_labeled_loss_gradient_into_the_weak_logits():
    arrays = make_arrays(BATCHES[0])
    without_cap, leaves_without_cap = run_losses(arrays, Options(cap=False, cai=False, cadr=False))
    with_cap, leaves_with_cap = run_losses(arrays, Options(cap=True, cai=False, cadr=False))
    without_cap.labeled.backward()
    with_cap.labeled.backward()
    assert leaves_without_cap["zw"].grad is None
    assert leaves_with_cap["zw"].grad.abs().sum() > 0


# --- configuration errors ------------------------------------------------------------------------

def test_cadr_without_cap_is_a_config_error_naming_both_flags():
    with pytest.raises(TrainConfigError, match=r"cadr.*cap"):
        create_method("fixmatch", 3, **asdict(Options(cap=False, cai=True, cadr=True)))


@pytest.mark.parametrize("field, value", [
    ("cap_form", "multiplicative"), ("confidence", 0.0), ("confidence", 1.5), ("confidence", math.nan),
    ("cap_momentum", 1.0), ("cap_momentum", -0.1), ("upper", 0.0), ("cai_beta", -0.5), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_field(field, value):
    options = Options(cap=True, cai=True, cadr=True)
    with pytest.raises(TrainConfigError, match=field):
        create_method("fixmatch", 3, **{**asdict(options), field: value})


# --- degenerate batches, dtypes ------------------------------------------------------------------

def degenerate_arrays(case: str) -> dict:
    arrays = make_arrays(BATCHES[1])
    C = BATCHES[1].C
    if case == "zero prior, so W is all zero":
        arrays["p_ema"] = np.zeros(C)
    elif case == "one-hot P missing labeled classes":
        pseudo = np.arange(len(arrays["zw"])) % 3  # only classes 0..2 appear unlabeled
        arrays["zw"] = 1000.0 * np.eye(C)[pseudo]
        arrays["y"] = np.arange(len(arrays["y"])) % C
    elif case == "identical rows, P of rank one":
        arrays["zw"] = np.repeat(arrays["zw"][:1], len(arrays["zw"]), axis=0)
    return arrays


@pytest.mark.parametrize("case", ["zero prior, so W is all zero", "one-hot P missing labeled classes",
                                  "identical rows, P of rank one"])
@pytest.mark.parametrize("cap_ema", [True, False])
@pytest.mark.parametrize("cap_form", ["reference", "ipw"])
def test_degenerate_batches_give_finite_losses_and_gradients(case, cap_ema, cap_form):
    options = Options(cap=True, cai=True, cadr=True, cap_ema=cap_ema, cap_form=cap_form, confidence=0.8)
    out, leaves = run_losses(degenerate_arrays(case), options)
    out.total.backward()
    for name in ("total", "labeled", "unlabeled", "cadr", "mask", "p_new", "thresholds"):
        assert torch.isfinite(getattr(out, name)).all(), name
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), name


def test_safe_log_of_zero_is_finite():
    for dtype in (torch.float32, torch.float64):
        assert torch.isfinite(safe_log(torch.zeros(1, dtype=dtype))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_outputs_keep_the_input_dtype_and_agree_with_float64(dtype):
    arrays = make_arrays(BATCHES[1])
    options = Options(cap=True, cai=True, cadr=True, confidence=0.8)
    out, leaves = run_losses(arrays, options, dtype=dtype)
    exact, _ = run_losses(arrays, options, dtype=torch.float64)
    out.total.backward()
    for name in ("total", "labeled", "unlabeled", "cadr", "mask", "p_new", "thresholds"):
        assert getattr(out, name).dtype == dtype, name
    assert all(leaf.grad.dtype == dtype for leaf in leaves.values())
    if dtype == torch.float32:
        for name in ("total", "labeled", "unlabeled", "cadr"):
            assert getattr(out, name).item() == pytest.approx(getattr(exact, name).item(), rel=1e-4, abs=1e-5)


# --- the data-parallel hook ----------------------------------------------------------------------

@pytest.mark.parametrize("flags", [dict(cap=True, cai=True, cadr=True),
                                   dict(cap=True, cai=False, cadr=False, cap_ema=False, cap_form="ipw"),
                                   dict(cap=False, cai=True, cadr=False)], ids=flags_id)
def test_two_workers_with_a_collective_reproduce_the_single_process_losses_and_gradients(flags):
    arrays, options = make_arrays(BATCHES[1]), Options(**flags, confidence=0.8)
    single, leaves = run_losses(arrays, options)
    labels, p_ema = torch.tensor(arrays["y"]), torch.tensor(arrays["p_ema"])
    labeled_rows, unlabeled_rows = [slice(0, 3), slice(3, 8)], [slice(0, 20), slice(20, 56)]  # uneven on purpose
    collectives = threaded_collectives(2)

    def worker(rank):
        own, own_unlabeled = labeled_rows[rank], unlabeled_rows[rank]
        return compute_losses(leaves["zx"][own], labels[own], leaves["zw"][own_unlabeled],
                              leaves["zs"][own_unlabeled], p_ema, collective=collectives[rank], **asdict(options))

    with ThreadPoolExecutor(max_workers=2) as pool:
        workers = list(pool.map(worker, [0, 1]))

    for out in workers:
        for name in ("total", "labeled", "unlabeled", "cadr", "p_new", "thresholds"):
            torch.testing.assert_close(getattr(out, name), getattr(single, name), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([out.mask for out in workers]), single.mask)
    inputs = list(leaves.values())
    distributed_grads = torch.autograd.grad(workers[0].total, inputs, allow_unused=True, materialize_grads=True)
    single_grads = torch.autograd.grad(single.total, inputs, allow_unused=True, materialize_grads=True)
    for distributed, local in zip(distributed_grads, single_grads):
        torch.testing.assert_close(distributed, local, rtol=1e-10, atol=1e-12)
