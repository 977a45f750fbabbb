"""Batched image augmentation for FixMatch: weak, RandAugment (FixMatch's variant) and CTAugment,
chosen per branch (labeled, weak unlabeled, strong unlabeled) by an `augment` string "L.W.S".

Shape contract: every function takes a floating-point NCHW batch with values in [0, 1], one or
three channels, on any device, and returns a batch of the same shape, dtype and device, still
in [0, 1]. Nothing loops over images: each sample gets its own random parameters, applied with
batched tensor ops (``affine_grid``/``grid_sample`` for the geometric ops, per-sample blend
factors for the PIL-style enhancers). For RandAugment and CTAugment each sample picks its ops,
and each op runs once per slot on the sub-batch that picked it, so the work is about ``depth``
ops per image however many ops the list holds.

Randomness: pass a **CPU** ``torch.Generator``. Parameters are drawn on the CPU from it and
then moved to the images' device, so a seed gives the same augmentation on CPU and CUDA.

Reference: google-research/fixmatch (``libml/augment.py``, ``libml/ctaugment.py``) and the
FixMatch paper's Table 12. The geometric ops follow PIL's conventions (nearest-neighbour
sampling, black outside the image, shear about the top-left corner) as the reference does.

The parts of an `augment` string (`PARTS` says what each does, for help texts): x (identity), d
(the default weak augmentation: flip where allowed, and translation), ra (RandAugment), rac
(RandAugment + Cutout), cta (CTAugment, with its learned bin weights). As in the original
project, `d` on the strong branch means CTAugment. `Augmenter.__call__` applies a part to a
batch; it holds the three branches and, when any of them is `cta`, the one CTAugment whose state
they share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from trainables.errors import TrainConfigError

WEAK_TRANSLATION = 0.125  # of the side; 4 pixels on 32x32, as the reference's shift
CUTOUT_GRAY = 0.5
RANDAUGMENT_MAX_CUTOUT = 0.5  # of the side

# PIL's ImageFilter kernels, normalised; the border pixels they cannot reach are kept as-is.
_SMOOTH_KERNEL = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13
_BLUR_KERNEL = torch.tensor([[1., 1., 1., 1., 1.],
                             [1., 0., 0., 0., 1.],
                             [1., 0., 0., 0., 1.],
                             [1., 0., 0., 0., 1.],
                             [1., 1., 1., 1., 1.]]) / 16
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
_NEAREST_TIE_NUDGE = 1e-3  # pixels


class Policy(NamedTuple):
    """The ops each sample got: ``ops`` (N, depth) indexes the augmenter's ``op_names``;
    ``levels`` (N, depth, P) holds each op's parameters in [0, 1) (unused ones are 0). CPU."""

    ops: Tensor
    levels: Tensor


# An op maps (images (n, C, H, W), levels (n, P) on the images' device, generator) -> images.
Op = Callable[[Tensor, Tensor, torch.Generator], Tensor]


# ----------------------------------------------------------------------------- checks, helpers

def _check_inputs(images: Tensor, generator: torch.Generator) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"expected a float NCHW batch with 1 or 3 channels, got "
                         f"{tuple(images.shape)} {images.dtype}")
    if generator.device.type != "cpu":
        raise ValueError(f"the generator must be a CPU torch.Generator, got one on "
                         f"{generator.device}")


def _uniform(low: float, high: float, levels: Tensor) -> Tensor:
    """Maps levels in [0, 1) linearly onto [low, high)."""
    return low + (high - low) * levels


def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    """(n,) -> (n, 1, 1, 1) on the images' device and dtype, to broadcast over C, H, W."""
    return values.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- geometric ops

def _affine(images: Tensor, matrix: Tensor, mode: str = "nearest") -> Tensor:
    """PIL's ``Image.transform(size, AFFINE, ...)`` with one matrix per sample.

    ``matrix`` (n, 2, 3) maps output pixel coordinates (x, y, 1) to input ones, in pixels from
    the image's top-left corner (pixel centres at +0.5). Points outside the input are black.
    """
    _, _, height, width = images.shape
    half = torch.tensor([width / 2, height / 2], dtype=matrix.dtype, device=matrix.device)
    linear, shift = matrix[:, :, :2], matrix[:, :, 2]
    if mode == "nearest":
        # PIL takes floor(v) of the source coordinate, grid_sample rounds v - 1/2 half-to-even;
        # a small nudge makes exact ties (common with shears) fall PIL's way.
        shift = shift + _NEAREST_TIE_NUDGE
    # In normalised coordinates u = half * (v + 1): theta = [D^-1 A D | D^-1 (A half + t - half)].
    theta_linear = linear * half.view(1, 1, 2) / half.view(1, 2, 1)
    theta_shift = (linear @ half + shift - half) / half
    theta = torch.cat([theta_linear, theta_shift.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta.to(device=images.device, dtype=images.dtype), list(images.shape),
                         align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _linear_matrix(a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                   tx: Tensor | float = 0.0, ty: Tensor | float = 0.0) -> Tensor:
    """PIL's affine data (a, b, tx, c, d, ty) as an (n, 2, 3) matrix."""
    tx = torch.as_tensor(tx, dtype=a.dtype, device=a.device).expand_as(a)
    ty = torch.as_tensor(ty, dtype=a.dtype, device=a.device).expand_as(a)
    return torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1)


def _rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """PIL's ``rotate(degrees)``: counter-clockwise about the centre, black corners."""
    _, _, height, width = images.shape
    angle = -torch.deg2rad(degrees.float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    centre_x, centre_y = width / 2, height / 2
    tx = centre_x - (cos * centre_x + sin * centre_y)
    ty = centre_y - (-sin * centre_x + cos * centre_y)
    return _affine(images, _linear_matrix(cos, sin, -sin, cos, tx, ty))


def _shear_x(images: Tensor, shear: Tensor) -> Tensor:
    """PIL's ``transform(AFFINE, (1, shear, 0, 0, 1, 0))``: x_in = x + shear * y."""
    shear = shear.float()
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    return _affine(images, _linear_matrix(one, shear, zero, one))


def _shear_y(images: Tensor, shear: Tensor) -> Tensor:
    """PIL's ``transform(AFFINE, (1, 0, 0, shear, 1, 0))``: y_in = shear * x + y."""
    shear = shear.float()
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    return _affine(images, _linear_matrix(one, zero, shear, one))


def _translate(images: Tensor, fraction: Tensor, axis: str) -> Tensor:
    """Shifts by ``fraction`` of the side along ``axis`` ("x" or "y"); black fills the gap."""
    _, _, height, width = images.shape
    fraction = fraction.float()
    one, zero = torch.ones_like(fraction), torch.zeros_like(fraction)
    if axis == "x":
        matrix = _linear_matrix(one, zero, zero, one, tx=fraction * width)
    else:
        matrix = _linear_matrix(one, zero, zero, one, ty=fraction * height)
    return _affine(images, matrix)


# CTAugment's rescale picks one of PIL's six resize filters. When enlarging a crop (as here) the
# antialiasing filters reduce to their base kernels, so each maps onto a grid_sample mode:
# ANTIALIAS (Lanczos), BICUBIC, BILINEAR, BOX, HAMMING, NEAREST.
_RESCALE_MODES = ("bicubic", "bicubic", "bilinear", "nearest", "bilinear", "nearest")


def _rescale(images: Tensor, border: Tensor, method: Tensor) -> Tensor:
    """Crops ``border`` (a fraction of the side) off every edge and resizes back up."""
    _, _, height, width = images.shape
    border = border.float()
    zoom, zero = 1 - 2 * border, torch.zeros_like(border)
    matrix = _linear_matrix(zoom, zero, zero, zoom, tx=border * width, ty=border * height)
    out = images.clone()
    for mode in sorted(set(_RESCALE_MODES)):
        methods = [index for index, name in enumerate(_RESCALE_MODES) if name == mode]
        methods = torch.tensor(methods, device=method.device)
        chosen = torch.isin(method, methods).nonzero().squeeze(1)
        if chosen.numel():
            resized = _affine(images.index_select(0, chosen), matrix[chosen], mode=mode)
            out.index_copy_(0, chosen, resized.clamp_(0, 1))
    return out


# ----------------------------------------------------------------------------- colour ops

def _blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, images, factor)``, clipped: enhancers use factor as-is."""
    factor = _per_sample(factor, images)
    return (degenerate + factor * (images - degenerate)).clamp_(0, 1)


def _grayscale(images: Tensor) -> Tensor:
    """(n, C, H, W) -> (n, 1, H, W) luma; a one-channel batch is already gray."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(_GRAY_WEIGHTS, device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _filter(images: Tensor, kernel: Tensor) -> Tensor:
    """PIL's ``Image.filter(kernel)``: convolve the interior, keep the border pixels."""
    channels, height, width = images.shape[1:]
    size = kernel.shape[0]
    out = images.clone()
    if height < size or width < size:
        return out
    weight = kernel.to(device=images.device, dtype=images.dtype).expand(channels, 1, size, size)
    margin = size // 2
    interior = F.conv2d(images, weight, groups=channels)
    out[:, :, margin:height - margin, margin:width - margin] = interior
    return out


def _brightness(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(torch.zeros_like(images), images, factor)


def _color(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(_grayscale(images).expand_as(images), images, factor)


def _contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(images), images, factor)


def _sharpness(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(_filter(images, _SMOOTH_KERNEL), images, factor)


def _posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keeps the top ``bits`` (1..8, per sample) bits of each 8-bit value."""
    levels = _per_sample(2 ** bits.float(), images)
    return torch.minimum((images * levels).floor(), levels - 1) / levels


def _solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """Inverts the values at or above ``threshold`` (per sample)."""
    return torch.where(images >= _per_sample(threshold, images), 1 - images, images)


def _cutout(images: Tensor, side: Tensor, generator: torch.Generator) -> Tensor:
    """Fills a ``side`` x ``side`` square (per sample, clipped at the border) with gray.

    The centre is uniform over the pixels and the square spans [centre - side // 2,
    centre - side // 2 + side) on each axis, as the reference's cutout.
    """
    count, _, height, width = images.shape
    device = images.device
    side = side.long().to(device)
    top = torch.randint(height, (count,), generator=generator).to(device) - side // 2
    left = torch.randint(width, (count,), generator=generator).to(device) - side // 2
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + side)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + side)[:, None])
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill(square, CUTOUT_GRAY)


# ----------------------------------------------------------------------------- policies

def _apply_policy(images: Tensor, policy: Policy, ops: tuple[Op, ...],
                  generator: torch.Generator) -> Tensor:
    """Runs each slot's ops in turn; each op sees only the sub-batch that picked it."""
    out = images.clone()
    for slot in range(policy.ops.shape[1]):
        for index, op in enumerate(ops):
            chosen = (policy.ops[:, slot] == index).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            on_device = chosen.to(images.device)
            levels = policy.levels[chosen, slot].to(images.device)
            out.index_copy_(0, on_device, op(out.index_select(0, on_device), levels, generator))
    return out


def weak_augment(images: Tensor, *, flip: bool, generator: torch.Generator) -> Tensor:
    """FixMatch's weak augmentation: mirror each sample with probability 1/2 (if ``flip``),
    then shift it by an integer in [-p, p] pixels per axis, p = ceil(0.125 * side), filling
    from reflect padding (the reference's pad-and-random-crop)."""
    _check_inputs(images, generator)
    count, _, height, width = images.shape
    device = images.device
    if flip:
        mirrored = torch.rand(count, generator=generator) < 0.5
    else:
        mirrored = torch.zeros(count, dtype=torch.bool)
    pad_y, pad_x = math.ceil(WEAK_TRANSLATION * height), math.ceil(WEAK_TRANSLATION * width)
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    # A random crop of the padded image at offset (top, left) is a shift by (pad - offset).
    top = torch.randint(2 * pad_y + 1, (count,), generator=generator).to(device)
    left = torch.randint(2 * pad_x + 1, (count,), generator=generator).to(device)
    rows = top[:, None] + torch.arange(height, device=device)  # (N, H)
    cols = left[:, None] + torch.arange(width, device=device)  # (N, W)
    # Padding is symmetric, so mirroring then padding is padding then reading columns backwards.
    padded_width = padded.shape[3]
    cols = torch.where(mirrored.to(device)[:, None], padded_width - 1 - cols, cols)
    flat_index = rows[:, :, None] * padded_width + cols[:, None, :]  # (N, H, W) into H'W'
    flat_index = flat_index.view(count, 1, -1).expand(-1, images.shape[1], -1)
    return torch.gather(padded.flatten(2), 2, flat_index).view_as(images)


def cutout(images: Tensor, *, generator: torch.Generator,
           max_fraction: float = RANDAUGMENT_MAX_CUTOUT) -> Tensor:
    """Cutout as in FixMatch's RandAugment: one gray square per image, side
    floor(U(0, max_fraction) * min(H, W)) pixels, centre uniform (clipped at the border)."""
    _check_inputs(images, generator)
    fraction = max_fraction * torch.rand(images.shape[0], generator=generator)
    return _cutout(images, (fraction * min(images.shape[2:])).floor(), generator)


# FixMatch's RandAugment variant (paper, Table 12): each op's magnitude is drawn uniformly from
# its range, per op and per sample; there is no global magnitude. The level m is in [0, 1).
RANDAUGMENT_OPS: dict[str, Op] = {
    "identity": lambda x, m, g: x,
    "autocontrast": lambda x, m, g: TF.autocontrast_image(x),
    "equalize": lambda x, m, g: TF.equalize_image(x),
    "rotate": lambda x, m, g: _rotate(x, _uniform(-30, 30, m[:, 0])),
    "solarize": lambda x, m, g: _solarize(x, m[:, 0]),
    "color": lambda x, m, g: _color(x, _uniform(0.05, 0.95, m[:, 0])),
    "contrast": lambda x, m, g: _contrast(x, _uniform(0.05, 0.95, m[:, 0])),
    "brightness": lambda x, m, g: _brightness(x, _uniform(0.05, 0.95, m[:, 0])),
    "sharpness": lambda x, m, g: _sharpness(x, _uniform(0.05, 0.95, m[:, 0])),
    "shear_x": lambda x, m, g: _shear_x(x, _uniform(-0.3, 0.3, m[:, 0])),
    "shear_y": lambda x, m, g: _shear_y(x, _uniform(-0.3, 0.3, m[:, 0])),
    "translate_x": lambda x, m, g: _translate(x, _uniform(-0.3, 0.3, m[:, 0]), "x"),
    "translate_y": lambda x, m, g: _translate(x, _uniform(-0.3, 0.3, m[:, 0]), "y"),
    "posterize": lambda x, m, g: _posterize(x, _uniform(4, 8, m[:, 0]).floor()),  # 4..7 bits
}


def _randaugment(images: Tensor, *, flip: bool, generator: torch.Generator,
                 num_ops: int, with_cutout: bool = True) -> tuple[Tensor, Policy]:
    images = weak_augment(images, flip=flip, generator=generator)
    count = images.shape[0]
    policy = Policy(ops=torch.randint(len(RANDAUGMENT_OPS), (count, num_ops), generator=generator),
                    levels=torch.rand(count, num_ops, 1, generator=generator))
    images = _apply_policy(images, policy, tuple(RANDAUGMENT_OPS.values()), generator)
    return (cutout(images, generator=generator) if with_cutout else images), policy


def strong_augment(images: Tensor, *, flip: bool, generator: torch.Generator,
                   num_ops: int = 2) -> Tensor:
    """FixMatch's strong augmentation: ``weak_augment``, then ``num_ops`` RandAugment ops drawn
    with replacement from ``RANDAUGMENT_OPS`` per sample, each with its own magnitude, then
    ``cutout`` (side up to half the image's)."""
    return _randaugment(images, flip=flip, generator=generator, num_ops=num_ops)[0]


# ----------------------------------------------------------------------------- CTAugment

def _enhance_factor(level: Tensor) -> Tensor:
    return 0.1 + 1.9 * level


def _signed(level: Tensor, bound: float) -> Tensor:
    return (2 * level - 1) * bound


def _cta_cutout(images: Tensor, level: Tensor, generator: torch.Generator) -> Tensor:
    # The reference: size = 1 + int(level * side * 0.499), square [c - size//2, c + size//2).
    size = 1 + (level * min(images.shape[2:]) * 0.499).long()
    return _cutout(images, 2 * (size // 2), generator)


# Each entry: (bins per parameter, op). ``None`` bins means ``num_bins`` (17 in the reference);
# integers are fixed by the parameter's discrete range. Levels l are in [0, 1).
CTAUGMENT_OPS: dict[str, tuple[tuple[int | None, ...], Op]] = {
    "autocontrast": ((None,), lambda x, l, g: _blend(x, TF.autocontrast_image(x), l[:, 0])),
    "blur": ((None,), lambda x, l, g: _blend(x, _filter(x, _BLUR_KERNEL), l[:, 0])),
    "brightness": ((None,), lambda x, l, g: _brightness(x, _enhance_factor(l[:, 0]))),
    "color": ((None,), lambda x, l, g: _color(x, _enhance_factor(l[:, 0]))),
    "contrast": ((None,), lambda x, l, g: _contrast(x, _enhance_factor(l[:, 0]))),
    "cutout": ((None,), lambda x, l, g: _cta_cutout(x, l[:, 0], g)),
    "equalize": ((None,), lambda x, l, g: _blend(x, TF.equalize_image(x), l[:, 0])),
    "invert": ((None,), lambda x, l, g: _blend(x, 1 - x, l[:, 0])),
    "identity": ((), lambda x, l, g: x),
    "posterize": ((8,), lambda x, l, g: _posterize(x, 1 + (l[:, 0] * 7.999).floor())),
    "rescale": ((None, 6), lambda x, l, g: _rescale(x, 0.25 * l[:, 0], (l[:, 1] * 5.99).long())),
    "rotate": ((None,), lambda x, l, g: _rotate(x, _signed(l[:, 0], 45).round())),
    "sharpness": ((None,), lambda x, l, g: _sharpness(x, _enhance_factor(l[:, 0]))),
    "shear_x": ((None,), lambda x, l, g: _shear_x(x, _signed(l[:, 0], 0.3))),
    "shear_y": ((None,), lambda x, l, g: _shear_y(x, _signed(l[:, 0], 0.3))),
    "smooth": ((None,), lambda x, l, g: _blend(x, _filter(x, _SMOOTH_KERNEL), l[:, 0])),
    "solarize": ((None,), lambda x, l, g: _solarize(x, (l[:, 0] * 255.999).floor() / 255)),
    # The reference shifts by (2l - 1) * 0.3 *pixels*; the paper means a fraction of the side.
    "translate_x": ((None,), lambda x, l, g: _translate(x, _signed(l[:, 0], 0.3), "x")),
    "translate_y": ((None,), lambda x, l, g: _translate(x, _signed(l[:, 0], 0.3), "y")),
}
_CTA_MAX_PARAMETERS = max(len(bins) for bins, _ in CTAUGMENT_OPS.values())


class CTAugment:
    """Control-theory augmentation (FixMatch's reference strong augmentation).

    Every op parameter has bins with a weight ``rate`` (initially 1). A policy picks ``depth``
    ops uniformly; each parameter's bin is drawn with probability proportional to
    ``p = (rate + 1 - decay) / max(...)``, zeroed where ``p < threshold``, and its level is
    uniform inside the bin. Labeled probes, augmented with uniformly drawn bins, feed back:
    ``rate <- decay * rate + (1 - decay) * (1 - 0.5 * |onehot(y) - probs|_1)`` for every bin
    they used, one probe after another as in the reference.
    """

    uses_probes = True
    op_names = tuple(CTAUGMENT_OPS)

    def __init__(self, num_bins: int = 17, decay: float = 0.99, threshold: float = 0.8,
                 depth: int = 2):
        if num_bins < 2:
            raise TrainConfigError(f"ctaugment num_bins must be >= 2, got {num_bins}")
        if not 0 < decay < 1:
            raise TrainConfigError(f"ctaugment decay must be in (0, 1), got {decay}")
        if not 0 < threshold <= 1:
            raise TrainConfigError(f"ctaugment threshold must be in (0, 1], got {threshold}")
        if depth < 1:
            raise TrainConfigError(f"ctaugment depth must be >= 1, got {depth}")
        self.decay, self.threshold, self.depth = decay, threshold, depth
        self._ops = tuple(op for _, op in CTAUGMENT_OPS.values())
        # bin_counts[op, parameter]: 0 where the op has no such parameter.
        self.bin_counts = torch.zeros(len(CTAUGMENT_OPS), _CTA_MAX_PARAMETERS, dtype=torch.long)
        for index, (bins, _) in enumerate(CTAUGMENT_OPS.values()):
            for parameter, count in enumerate(bins):
                self.bin_counts[index, parameter] = num_bins if count is None else count
        max_bins = int(self.bin_counts.max())
        self._valid_bins = torch.arange(max_bins) < self.bin_counts.unsqueeze(2)  # (ops, P, bins)
        self.rates = self._valid_bins.float()

    def bin_probabilities(self) -> Tensor:
        """(ops, P, bins): the sampling distribution of each parameter's bins (FixMatch's
        ``rate_to_p``, normalised); parameters an op lacks get all mass on bin 0."""
        p = (self.rates + (1 - self.decay)) * self._valid_bins
        p = p / p.amax(dim=2, keepdim=True).clamp_min(1e-12)
        p = torch.where(p < self.threshold, torch.zeros_like(p), p)
        p[..., 0] += (self.bin_counts == 0).float()
        return p / p.sum(dim=2, keepdim=True)

    def _policy(self, count: int, generator: torch.Generator, probe: bool) -> Policy:
        ops = torch.randint(len(self._ops), (count, self.depth), generator=generator)
        inside_bin = torch.rand(count, self.depth, _CTA_MAX_PARAMETERS, generator=generator)
        bin_counts = self.bin_counts[ops]  # (N, depth, P)
        if probe:
            levels = inside_bin
        else:
            probabilities = self.bin_probabilities()[ops]  # (N, depth, P, bins)
            bins = torch.multinomial(probabilities.flatten(0, 2), 1, generator=generator)
            levels = (bins.view_as(bin_counts) + inside_bin) / bin_counts.clamp_min(1)
        return Policy(ops=ops, levels=levels * (bin_counts > 0))

    def __call__(self, images: Tensor, *, flip: bool,
                 generator: torch.Generator) -> tuple[Tensor, Policy]:
        """Strong branch: ``weak_augment``, a sampled policy per sample, then the reference's
        cutout at level 1 (a square of about half the side)."""
        images = weak_augment(images, flip=flip, generator=generator)
        policy = self._policy(images.shape[0], generator, probe=False)
        images = _apply_policy(images, policy, self._ops, generator)
        return _cta_cutout(images, torch.ones(images.shape[0]), generator), policy

    def probe(self, images: Tensor, *, generator: torch.Generator) -> tuple[Tensor, Policy]:
        """Probe images: a policy with uniformly drawn bins, no cutout. Pass the weakly augmented
        labeled batch, as the reference does."""
        _check_inputs(images, generator)
        policy = self._policy(images.shape[0], generator, probe=True)
        return _apply_policy(images, policy, self._ops, generator), policy

    def update(self, policy: Policy, probe_probs: Tensor, labels: Tensor) -> None:
        """Moves the weight of every bin a probe used toward that probe's accuracy proximity
        ``1 - 0.5 * |onehot(label) - probs|_1``; ``probe_probs`` is (N, C) softmax output."""
        probs = probe_probs.detach().double().cpu()
        onehot = F.one_hot(labels.cpu().long(), probs.shape[1]).double()
        proximity = 1 - 0.5 * (onehot - probs).abs().sum(dim=1)  # (N,)
        bin_counts = self.bin_counts[policy.ops]  # (N, depth, P)
        used = bin_counts > 0
        bins = (policy.levels.double() * bin_counts * 0.999).long()
        parameter = torch.arange(_CTA_MAX_PARAMETERS)
        max_bins = self.rates.shape[2]
        flat_bins = (policy.ops.unsqueeze(2) * _CTA_MAX_PARAMETERS + parameter) * max_bins + bins
        # Events in the reference's order (probe, slot, parameter); k updates of one bin with
        # targets t_1..t_k give decay^k * rate + (1 - decay) * sum_j decay^(k - j) * t_j.
        events = flat_bins[used]
        targets = proximity.view(-1, 1, 1).expand_as(flat_bins)[used]
        events, order = torch.sort(events, stable=True)
        targets = targets[order]
        bins_hit, hits = torch.unique_consecutive(events, return_counts=True)
        group = torch.repeat_interleave(torch.arange(bins_hit.numel()), hits)
        rank = torch.arange(events.numel()) - (hits.cumsum(0) - hits)[group]
        weights = (1 - self.decay) * self.decay ** (hits[group] - 1 - rank).double()
        pulled = torch.zeros(bins_hit.numel(), dtype=torch.float64)
        pulled.index_add_(0, group, weights * targets)
        rates = self.rates.view(-1)
        rates[bins_hit] = (rates[bins_hit].double() * self.decay ** hits.double() + pulled).float()

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {"rates": self.rates.clone(), "bin_counts": self.bin_counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        bin_counts = state.get("bin_counts", self.bin_counts)
        if bin_counts.shape != self.bin_counts.shape or not torch.equal(bin_counts.cpu(),
                                                                         self.bin_counts):
            raise TrainConfigError("ctaugment state was saved with other bins per op "
                                   "(num_bins differs) than this augmenter has")
        rates = state["rates"]
        if rates.shape != self.rates.shape:
            raise TrainConfigError(f"ctaugment state has rates of shape {tuple(rates.shape)}, "
                                   f"this augmenter needs {tuple(self.rates.shape)} "
                                   f"(num_bins differs)")
        self.rates = rates.detach().float().cpu() * self._valid_bins


# ------------------------------------------------------------------ augmentation per branch

# What each part of an augment string does to a batch (Augmenter.__call__ applies it).
PARTS = {
    "x": "identity",
    "d": "the default weak augmentation: flip where the dataset allows it, and translation",
    "ra": "RandAugment (2 ops per image, FixMatch's variant)",
    "rac": "RandAugment + Cutout",
    "cta": "CTAugment (its bin weights learned from labeled probes) + its Cutout",
}
BRANCHES = ("labeled", "weak", "strong")


def describe_parts() -> str:
    return ", ".join(f"{part} ({what})" for part, what in PARTS.items())


DEFAULT_AUGMENT = "d.d.rac"  # FixMatch's: weak labeled, weak unlabeled, RandAugment + Cutout


def parse_augment(text: str) -> tuple[str, str, str]:
    """"L.W.S" -> the parts of the labeled, weak-unlabeled and strong-unlabeled branches. As in
    the original project, `d` on the strong branch means CTAugment."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 3 or not all(part in PARTS or part == "d" for part in parts):
        raise TrainConfigError(f"augment must be L.W.S, three parts each one of {', '.join(PARTS)} "
                               f"(a strong d means cta), e.g. {DEFAULT_AUGMENT}; got {text!r}")
    labeled, weak, strong = parts
    return labeled, weak, "cta" if strong == "d" else strong


class Augmenter:
    """The three branches of a step's augmentation, from an augment string "L.W.S". Every part
    runs batched on the images' device; randomness comes from the step's CPU generator, drawn in
    the order labeled, weak, strong. When a branch uses CTAugment, `probe`/`update` let it learn,
    and its state is the one `state_dict` holds."""

    def __init__(self, augment: str = DEFAULT_AUGMENT):
        self.parts = dict(zip(BRANCHES, parse_augment(augment)))
        self.ctaugment = CTAugment() if "cta" in self.parts.values() else None

    @property
    def uses_probes(self) -> bool:
        return self.ctaugment is not None

    def __call__(self, branch: str, images: Tensor, *, flip: bool, generator: torch.Generator) -> Tensor:
        """The `branch` ("labeled", "weak" or "strong") of an NCHW batch in [0, 1]."""
        part = self.parts[branch]
        if part == "x":
            return images
        if part == "d":
            return weak_augment(images, flip=flip, generator=generator)
        if part == "cta":
            return self.ctaugment(images, flip=flip, generator=generator)[0]
        return _randaugment(images, flip=flip, generator=generator, num_ops=2, with_cutout=part == "rac")[0]

    def probe(self, images: Tensor, *, generator: torch.Generator) -> tuple[Tensor, Policy]:
        return self.ctaugment.probe(images, generator=generator)

    def update(self, policy: Policy, probe_probs: Tensor, labels: Tensor) -> None:
        self.ctaugment.update(policy, probe_probs, labels)

    def state_dict(self) -> dict[str, Tensor]:
        return self.ctaugment.state_dict() if self.ctaugment is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if (self.ctaugment is None) != (not state):
            raise TrainConfigError("the checkpoint's augmentation state does not match augment="
                                   f"{'.'.join(self.parts.values())} (CTAugment state saved without a cta branch, "
                                   "or missing with one)")
        if self.ctaugment is not None:
            self.ctaugment.load_state_dict(state)
