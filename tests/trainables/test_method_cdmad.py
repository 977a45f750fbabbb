"""Specification of CDMAD (trainables/methods/cdmad.py, docs/method.md "Frontier methods").

The reference below is written again in float64 numpy from CDMAD's fixmatchcdmad.py, in its own
shape (an epoch counter moved every val_iteration steps): the weak logits less the white image's
logits once epoch > debiasstart, soft targets softmax of those, select_mask = max >= tau, and
SemiLoss: L_x = -mean sum log(softmax(z_l) + 1e-8) onehot(y), L_u = -mean over both strong views
of sum log(softmax(z_s) + 1e-8) targets, times the mask. It uses no helper of the implementation.
The pseudo-labels and the mask are frozen at the input point; the reference gradient is the
central finite difference of the rest.
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
from torch import nn

from trainables.errors import TrainConfigError
from trainables.evaluation import predict
from trainables.methods.cdmad import CDMAD

TOLERANCE = dict(rtol=1e-9, atol=1e-12)
GRADIENT_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


# --- the independent float64 reference ---------------------------------------------------------

def np_semi_loss_rows(z, targets):
    """-sum log(softmax(z) + 1e-8) * targets per row; broadcasts over leading dimensions of z."""
    return -(np.log(np_softmax(z) + 1e-8) * targets).sum(axis=-1)


@dataclass(frozen=True)
class Frozen:
    targets_u: np.ndarray  # (muB, C) soft
    select_mask: np.ndarray
    debiased: bool


class ReferenceCDMAD:
    """fixmatchcdmad.py's epoch loop, one step at a time."""

    def __init__(self, tau, debiasstart, val_iteration):
        self.tau, self.debiasstart, self.val_iteration = tau, debiasstart, val_iteration
        self.epoch, self.batch_idx = 0, 0

    def step(self, zw, white) -> Frozen:
        outputs_u = zw
        debiased = self.epoch > self.debiasstart
        if debiased:
            outputs_u = outputs_u - white
        targets_u2 = np_softmax(outputs_u)
        select_mask = (targets_u2.max(axis=1) >= self.tau).astype(np.float64)
        self.batch_idx += 1
        if self.batch_idx == self.val_iteration:
            self.epoch, self.batch_idx = self.epoch + 1, 0
        return Frozen(targets_u2, select_mask, debiased)


def reference_terms(zx, y, zs, strong2, frozen: Frozen, wu: float) -> dict:
    """The losses as functions of the logits; broadcast over leading dimensions (z: (..., N, C))."""
    labeled = np_semi_loss_rows(zx, np.eye(zx.shape[-1])[y]).mean(axis=-1)
    logits_u = np.concatenate(np.broadcast_arrays(zs, strong2), axis=-2)
    targets = np.concatenate([frozen.targets_u, frozen.targets_u])
    mask = np.concatenate([frozen.select_mask, frozen.select_mask])
    unlabeled = (np_semi_loss_rows(logits_u, targets) * mask).mean(axis=-1)
    return dict(total=labeled + wu * unlabeled, labeled=labeled, unlabeled=unlabeled)


# --- inputs --------------------------------------------------------------------------------------

C, B, MU = 4, 3, 2
# Debiasing from step 4 (epoch 2 > debiasstart 1), a bar that splits the rows.
SHORT = dict(confidence=0.8, debiasstart=1, epoch_steps=2, wu=0.7)
CASES = {"short": SHORT, "every-row-from-the-start": dict(debiasstart=-1)}


def make_steps(seed=0, steps=7, scale=2.0, B=B, mu=MU):
    batches = random_batches(seed, steps, B, mu, C, scale, weak_shift=np.array([1.0, 0.3, 0.0, -0.5]))
    batches = with_extras(batches, CDMAD.extra_logits(), seed + 100, scale)
    for arrays in batches:
        arrays["solid"] = arrays["solid"] + np.array([2.0, 0.5, 0.0, -1.0])  # a classifier biased to class 0
    return batches


def options_of(case):
    return {"confidence": 0.0, "debiasstart": 100, "epoch_steps": 500, "wu": 1.0} | CASES[case]


def float64_method(collective=None, **options) -> CDMAD:
    return CDMAD(C, 0, collective, **options).to(dtype=torch.float64)


def reference_of(o) -> ReferenceCDMAD:
    return ReferenceCDMAD(o["confidence"], o["debiasstart"], o["epoch_steps"])


# --- agreement with the reference, before and after the start ----------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_masks_match_the_reference_before_and_after_debiasing_starts(case):
    o = options_of(case)
    method, reference = float64_method(**CASES[case]), reference_of(o)
    debiased = []
    for step, arrays in enumerate(make_steps()):
        out, _ = run_step(method, arrays)
        frozen = reference.step(arrays["zw"], arrays["solid"])
        debiased.append(frozen.debiased)
        expected = reference_terms(arrays["zx"], arrays["y"], arrays["zs"], arrays["strong2"], frozen, o["wu"])
        for name, value in expected.items():
            np.testing.assert_allclose(getattr(out, name).item(), value, **TOLERANCE, err_msg=f"{name}, step {step}")
        np.testing.assert_array_equal(out.mask.numpy(), frozen.select_mask, err_msg=f"mask, step {step}")
        assert out.stats["cdmad/debiasing"].item() == frozen.debiased
    assert debiased == ([False] * 4 + [True] * 3 if case == "short" else [True] * 7)


def test_the_white_image_changes_the_pseudo_labels_once_debiasing_starts():
    # The same batch at a step before and at a step after the start: other targets, another mask.
    arrays = make_steps(seed=3, steps=1)[0]
    frozen_before = ReferenceCDMAD(0.8, 1, 2).step(arrays["zw"], arrays["solid"])
    frozen_after = ReferenceCDMAD(0.8, -1, 2).step(arrays["zw"], arrays["solid"])
    assert not frozen_before.debiased and frozen_after.debiased
    assert not np.array_equal(frozen_before.select_mask, frozen_after.select_mask)
    assert 0 < frozen_before.select_mask.mean() < 1 and 0 < frozen_after.select_mask.mean() < 1


@pytest.mark.parametrize("step", [1, 5])  # before and after the start
def test_gradients_of_the_total_match_finite_differences_of_the_reference(step):
    o, steps = options_of("short"), make_steps(seed=2)
    method, reference = float64_method(**SHORT), reference_of(o)
    for arrays in steps[:step]:
        run_step(method, arrays)
        reference.step(arrays["zw"], arrays["solid"])
    arrays = steps[step]
    out, leaves = run_step(method, arrays)
    out.total.backward()
    frozen = reference.step(arrays["zw"], arrays["solid"])
    assert 0 < frozen.select_mask.sum() < len(frozen.select_mask)

    def total(zx, zs, strong2):
        return reference_terms(zx, arrays["y"], zs, strong2, frozen, o["wu"])["total"]

    names = ("zx", "zs", "strong2")
    assert_gradients_match_finite_differences(leaves, total, {name: arrays[name] for name in names}, names,
                                              **GRADIENT_TOLERANCE)
    # The pseudo-labels, and the bias measured on the white image, are taken without gradient.
    for name in ("zw", "solid"):
        np.testing.assert_array_equal(gradient_of(leaves[name]), np.zeros(arrays[name].shape))


# --- test time -------------------------------------------------------------------------------------

def test_test_logits_subtract_the_white_images_logits():
    method = CDMAD(3)
    logits = torch.tensor([[2.0, 1.5, 0.0], [0.1, 0.0, 0.2]])
    solid = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(method.test_logits(logits, solid), logits - solid)
    assert method.test_logits(logits, solid).argmax(dim=1).tolist() == [1, 2]  # row 0 was class 0 before


class BiasedNet(nn.Module):
    """Logits W x + b on the flattened image, b favouring class 0, with a batch-norm before them
    whose running statistics make eval mode differ from train mode."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0], [0.0, 0.0, -1.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([4.0, 0.0, 0.0]))
            self.norm.running_mean.fill_(0.5)

    def forward(self, x):
        return self.fc(self.norm(x.flatten(1)))


def test_evaluation_predicts_from_the_logits_less_the_white_images_in_eval_mode():
    model = BiasedNet().train()
    images = torch.tensor([[[[255], [0]], [[0], [0]]], [[[0], [0]], [[0], [255]]]], dtype=torch.uint8)  # NHWC
    with torch.no_grad():
        model.eval()
        inputs = images.permute(0, 3, 1, 2).float() / 255 * 2 - 1
        expected = (model(inputs) - model(torch.ones(1, 1, 2, 2))).argmax(dim=1)
        plain = model(inputs).argmax(dim=1)
        model.train()
    assert plain.tolist() == [0, 0] and expected.tolist() == [1, 2]  # the correction decides here
    got = predict(model, images, "cpu", channels_last=False, method=CDMAD(3))
    assert got.tolist() == expected.tolist()
    assert model.training  # left as it was


def test_the_training_probe_is_a_train_mode_forward_of_ones_that_leaves_the_running_statistics_alone():
    from types import SimpleNamespace

    from trainables.config import TrainConfig
    from trainables.step import _solid_logits

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, momentum=0.5), \
                nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = ConvNet().train()
    model.norm.running_mean.fill_(0.25)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    config = TrainConfig.from_dict({"method": "cdmad", "channels_last": False})
    like = torch.zeros(5, 1, 2, 2)
    got = _solid_logits(SimpleNamespace(raw_model=model), config, like)
    for name, buffer in model.named_buffers():  # the probe is no training step for batch norm
        assert torch.equal(buffer, before[name]), name
    with torch.no_grad():  # the reference's model(white): train mode, the image's own batch statistics
        expected = model(torch.ones(1, 1, 2, 2))
    assert not torch.equal(model.norm.running_mean, before["norm.running_mean"])  # that forward moves them
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- state ---------------------------------------------------------------------------------------

def test_state_round_trip_before_the_start_continues_identically_across_it():
    steps = make_steps(seed=3)
    original = float64_method(**SHORT)
    for arrays in steps[:3]:
        run_step(original, arrays)
    resumed = restored_from_checkpoint(original, float64_method(**SHORT))
    assert resumed.state["step"].item() == 3
    assert_continues_identically(original, resumed, steps[3:])


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("confidence", -0.1), ("confidence", 1.5), ("confidence", math.nan), ("debiasstart", -2),
    ("debiasstart", 1.5), ("epoch_steps", 0), ("wu", -1.0),
])
def test_out_of_range_option_is_a_config_error_naming_the_option(field, value):
    with pytest.raises(TrainConfigError, match=field):
        CDMAD(C, **{field: value})


def test_options_default_to_the_reference_values():
    # fixmatchcdmad.py's argparse defaults: --tau 0, --debiasstart 100, --val-iteration 500.
    assert CDMAD(C).config == dict(wu=1.0, confidence=0.0, debiasstart=100, epoch_steps=500)


def test_losses_need_the_second_strong_view_and_the_white_images_logits():
    arrays = make_steps(steps=1)[0]
    with pytest.raises(ValueError, match="strong2, solid"):
        float64_method().losses(*(torch.tensor(arrays[name]) for name in ("zx", "y", "zw", "zs")))


# --- dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_logits_keep_their_dtype(dtype):
    low = CDMAD(C, **SHORT)
    totals = run_keeping_dtype(low, float64_method(**SHORT), make_steps(seed=7, steps=6), dtype)
    assert low.state["step"].dtype == torch.int64
    if dtype == torch.float32:
        for total, exact in totals:
            assert total == pytest.approx(exact, rel=1e-4, abs=1e-5)


# --- the data-parallel hook --------------------------------------------------------------------------

def test_two_workers_with_half_batches_reproduce_one_process_with_the_whole_batch():
    _, outputs = assert_two_workers_on_halves_reproduce_one_process(
        lambda collective: float64_method(collective, **SHORT), make_steps(seed=8, steps=6, B=4, mu=3),
        state_tolerance=dict(rtol=0, atol=0))
    assert [outs[0].stats["cdmad/debiasing"].item() for outs in outputs] == [0, 0, 0, 0, 1, 1]
