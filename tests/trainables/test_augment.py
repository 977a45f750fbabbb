"""Specification of the batched augmentations (trainables/augment.py)."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from trainables.augment import (
    CTAUGMENT_OPS,
    RANDAUGMENT_OPS,
    CTAugment,
    cutout,
    strong_augment,
    weak_augment,
)
from trainables.errors import TrainConfigError

SIZES = (8, 28, 32)
CHANNELS = (1, 3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The batches here are tiny: intra-op threads only add contention on a busy CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(count: int = 6, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    # Values in [0.05, 0.95], so autocontrast, solarize and posterize all have work to do.
    return 0.05 + 0.9 * torch.rand(count, channels, size, size, generator=_generator(seed))


def _ctaugment_call(images, generator, flip=True):
    return CTAugment()(images, flip=flip, generator=generator)[0]


def _ctaugment_probe(images, generator, flip=True):
    return CTAugment().probe(images, generator=generator)[0]


AUGMENTATIONS = {
    "weak": lambda images, generator, flip=True: weak_augment(images, flip=flip,
                                                              generator=generator),
    "strong": lambda images, generator, flip=True: strong_augment(images, flip=flip,
                                                                  generator=generator),
    "ctaugment": _ctaugment_call,
    "ctaugment_probe": _ctaugment_probe,
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_augmentation_keeps_shape_dtype_and_unit_range(name, channels, size):
    images = _images(count=16, channels=channels, size=size)
    out = AUGMENTATIONS[name](images, _generator())
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_same_seed_gives_identical_outputs_and_another_seed_differs(name):
    images = _images(count=16)
    first = AUGMENTATIONS[name](images, _generator(7))
    again = AUGMENTATIONS[name](images, _generator(7))
    other = AUGMENTATIONS[name](images, _generator(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_input_batch_is_left_unchanged(name):
    images = _images()
    before = images.clone()
    AUGMENTATIONS[name](images, _generator())
    assert torch.equal(images, before)


def test_weak_and_strong_outputs_differ():
    images = _images(count=16)
    weak = weak_augment(images, flip=True, generator=_generator(3))
    strong = strong_augment(images, flip=True, generator=_generator(3))
    assert not torch.equal(weak, strong)
    # Strong starts from the same weak draw, then changes every image further (cutout at least).
    changed = (weak - strong).flatten(1).abs().amax(dim=1) > 0
    assert changed.float().mean() > 0.9


def _one_bright_pixel(count: int, size: int, row: int, col: int) -> torch.Tensor:
    images = torch.zeros(count, 1, size, size)
    images[:, :, row, col] = 1.0
    return images


def _bright_positions(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = images[:, 0].flatten(1).argmax(dim=1)
    return flat // images.shape[-1], flat % images.shape[-1]


@pytest.mark.parametrize("size", SIZES)
def test_weak_translation_moves_a_pixel_at_most_an_eighth_of_the_side(size):
    centre = size // 2
    images = _one_bright_pixel(256, size, centre, centre)
    out = weak_augment(images, flip=False, generator=_generator())
    rows, cols = _bright_positions(out)
    bound = math.ceil(0.125 * size)
    assert (out.flatten(1).amax(dim=1) == 1).all()
    assert (rows - centre).abs().max() == bound
    assert (cols - centre).abs().max() == bound


def test_weak_without_flip_never_mirrors_and_with_flip_mirrors_about_half():
    size = 32
    # Column 5 stays in view under a 4-pixel shift; a mirror puts it at column 26.
    images = _one_bright_pixel(512, size, 16, 5)
    out = weak_augment(images, flip=False, generator=_generator())
    _, cols = _bright_positions(out)
    assert (out.flatten(1).amax(dim=1) == 1).all()
    assert (cols < size // 2).all()
    _, cols = _bright_positions(weak_augment(images, flip=True, generator=_generator()))
    mirrored = (cols >= size // 2).float().mean()
    assert 0.4 < mirrored < 0.6


def _assert_gray_squares(out: torch.Tensor, max_side: int) -> int:
    """Every image is 0 except one gray rectangle (a square clipped by the border); returns how
    many images hold a full, unclipped square."""
    gray = out == 0.5
    assert ((out == 0) | gray).all()
    assert (gray == gray[:, :1]).all(), "the square covers every channel"
    full_squares = 0
    for mask in gray[:, 0]:
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        assert torch.equal(mask, rows[:, None] & cols[None, :]), "gray region is a rectangle"
        height, width = int(rows.sum()), int(cols.sum())
        assert height <= max_side and width <= max_side
        for present, length in ((rows, height), (cols, width)):
            if length:
                start = int(present.nonzero()[0])
                assert present[start:start + length].all(), "rows and columns are contiguous"
        touches_border = bool(rows[0] or rows[-1] or cols[0] or cols[-1])
        if height and not touches_border:
            assert height == width
            full_squares += 1
    return full_squares


@pytest.mark.parametrize("size", SIZES)
def test_cutout_leaves_one_gray_square_up_to_half_the_side(size):
    out = cutout(torch.zeros(64, 3, size, size), generator=_generator())
    assert _assert_gray_squares(out, max_side=size // 2) > 5


def test_strong_augment_ends_with_a_gray_cutout_square():
    # A black image stays black under every RandAugment op, so only the cutout square is left.
    out = strong_augment(torch.zeros(64, 3, 32, 32), flip=True, generator=_generator())
    assert _assert_gray_squares(out, max_side=16) > 5


# Two magnitudes per op, alternating over the batch, both well away from the identity point.
LEVELS = torch.tensor([0.1, 0.6, 0.1, 0.6, 0.1, 0.6])


@pytest.mark.parametrize("name", sorted(RANDAUGMENT_OPS))
@pytest.mark.parametrize("channels", CHANNELS)
def test_each_randaugment_op_keeps_range_and_changes_every_image_except_identity(name, channels):
    images = _images(channels=channels)
    out = RANDAUGMENT_OPS[name](images, LEVELS[:, None], _generator())
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    change = (out - images).flatten(1).abs().amax(dim=1)
    if name == "identity" or (name == "color" and channels == 1):  # gray has no colour to drop
        assert torch.equal(out, images)
    else:
        assert (change > 1e-3).all(), change


@pytest.mark.parametrize("name", sorted(CTAUGMENT_OPS))
def test_each_ctaugment_op_keeps_range_and_changes_every_image_except_identity(name):
    images = _images()
    levels = torch.tensor([0.2, 0.8, 0.2, 0.8, 0.2, 0.8])[:, None].expand(-1, 2)
    out = CTAUGMENT_OPS[name][1](images, levels, _generator())
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    change = (out - images).flatten(1).abs().amax(dim=1)
    if name == "identity":
        assert torch.equal(out, images)
    else:
        assert (change > 1e-3).all(), change


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_geometric_randaugment_ops_at_mid_level_are_exact_identities(name):
    # Their ranges are symmetric, so level 0.5 means angle, shear or shift 0.
    images = _images()
    out = RANDAUGMENT_OPS[name](images, torch.full((6, 1), 0.5), _generator())
    assert torch.equal(out, images)


def _affine(data):
    return lambda image: image.transform(image.size, Image.AFFINE, data)


# (level, what FixMatch's PIL-based RandAugment does at that level) for a 32x32 image.
PIL_EQUIVALENTS = {
    "identity": (0.5, lambda image: image),
    "autocontrast": (0.5, ImageOps.autocontrast),
    "equalize": (0.5, ImageOps.equalize),
    "rotate": (0.75, lambda image: image.rotate(15)),
    "solarize": (0.5, lambda image: ImageOps.solarize(image, 128)),
    "color": (0.5, lambda image: ImageEnhance.Color(image).enhance(0.5)),
    "contrast": (0.5, lambda image: ImageEnhance.Contrast(image).enhance(0.5)),
    "brightness": (0.5, lambda image: ImageEnhance.Brightness(image).enhance(0.5)),
    "sharpness": (0.5, lambda image: ImageEnhance.Sharpness(image).enhance(0.5)),
    "shear_x": (0.75, _affine((1, 0.15, 0, 0, 1, 0))),
    "shear_y": (0.25, _affine((1, 0, 0, -0.15, 1, 0))),
    "translate_x": (0.75, _affine((1, 0, 0.15 * 32, 0, 1, 0))),
    "translate_y": (0.25, _affine((1, 0, 0, 0, 1, -0.15 * 32))),
    "posterize": (0.5, lambda image: ImageOps.posterize(image, 6)),
}


def test_every_randaugment_op_has_a_pil_equivalent_under_test():
    assert sorted(PIL_EQUIVALENTS) == sorted(RANDAUGMENT_OPS)


@pytest.mark.parametrize("name", sorted(PIL_EQUIVALENTS))
def test_randaugment_op_matches_pil_on_8_bit_images(name):
    level, pil_op = PIL_EQUIVALENTS[name]
    # Darker than mid-gray on average, so a wrong contrast pivot shows.
    pixels = np.random.default_rng(0).integers(0, 200, (32, 32, 3), dtype=np.uint8)
    expected = torch.from_numpy(np.array(pil_op(Image.fromarray(pixels)))).permute(2, 0, 1) / 255
    images = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    out = RANDAUGMENT_OPS[name](images, torch.tensor([[level]]), _generator())[0]
    # PIL rounds to 8 bits after every op; allow that, and a rare nearest-neighbour tie.
    assert ((out - expected).abs() > 2 / 255).float().mean() < 0.01


def test_translate_x_by_an_eighth_shifts_whole_pixels_and_fills_black():
    images = _images()
    level = (0.125 + 0.3) / 0.6  # maps to a shift of 0.125 * 32 = 4 pixels
    out = RANDAUGMENT_OPS["translate_x"](images, torch.full((6, 1), level), _generator())
    assert torch.equal(out[..., :-4], images[..., 4:])
    assert (out[..., -4:] == 0).all()


def _reference_update(rates, bin_counts, policy, proximity, decay):
    """libml/ctaugment.py ``update_rates``, one probe and one bin at a time."""
    rates = rates.clone().double()
    for sample in range(policy.ops.shape[0]):
        for slot in range(policy.ops.shape[1]):
            op = int(policy.ops[sample, slot])
            for parameter in range(int((bin_counts[op] > 0).sum())):
                count = int(bin_counts[op, parameter])
                index = int(float(policy.levels[sample, slot, parameter]) * count * 0.999)
                rates[op, parameter, index] = (rates[op, parameter, index] * decay
                                               + float(proximity[sample]) * (1 - decay))
    return rates.float()


def _probe_batch(augmenter, count=64, num_classes=4, seed=0):
    _, policy = augmenter.probe(_images(count=count, size=8), generator=_generator(seed))
    labels = torch.randint(num_classes, (count,), generator=_generator(seed + 1))
    probs = torch.softmax(3 * torch.randn(count, num_classes, generator=_generator(seed + 2)), 1)
    return policy, probs, labels


def test_ctaugment_update_matches_the_reference_sequential_update():
    augmenter = CTAugment()
    augmenter.rates = augmenter.rates * 0.7  # away from 1, so decay alone moves a bin
    before = augmenter.rates.clone()
    policy, probs, labels = _probe_batch(augmenter, count=200)  # repeats bins: order matters
    proximity = 1 - 0.5 * (torch.nn.functional.one_hot(labels, 4) - probs).abs().sum(1)
    expected = _reference_update(before, augmenter.bin_counts, policy, proximity, augmenter.decay)
    augmenter.update(policy, probs, labels)
    torch.testing.assert_close(augmenter.rates, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("correct", [True, False])
def test_ctaugment_update_moves_only_the_used_bins_toward_the_probe_accuracy(correct):
    augmenter = CTAugment()
    augmenter.load_state_dict({"rates": torch.full_like(augmenter.rates, 0.5)})
    policy, _, labels = _probe_batch(augmenter, count=8)
    wrong_labels = (labels + 1) % 4
    probs = torch.nn.functional.one_hot(labels if correct else wrong_labels, 4).float()
    augmenter.update(policy, probs, labels)  # proximity 1 if correct else 0
    used = torch.zeros_like(augmenter.rates, dtype=torch.bool)
    for op, levels in zip(policy.ops.flatten(), policy.levels.flatten(0, 1)):
        for parameter, count in enumerate(augmenter.bin_counts[op]):
            if count:
                used[op, parameter, int(levels[parameter] * count * 0.999)] = True
    valid = augmenter.rates > 0
    assert used.any()
    if correct:
        assert (augmenter.rates[used] > 0.5).all()
    else:
        assert (augmenter.rates[used] < 0.5).all()
    assert (augmenter.rates[valid & ~used] == 0.5).all()


def test_ctaugment_samples_only_bins_whose_weight_passes_the_threshold():
    augmenter = CTAugment(depth=1)
    rates = torch.zeros_like(augmenter.rates)
    rates[..., 3] = 1.0  # every parameter: only bin 3 is within threshold of the best
    augmenter.load_state_dict({"rates": rates})
    _, policy = augmenter(_images(count=256, size=8), flip=False, generator=_generator())
    counts = augmenter.bin_counts[policy.ops[:, 0]].float()  # (N, P)
    levels = policy.levels[:, 0]
    has = counts > 0
    assert has.any()
    assert ((levels[has] >= 3 / counts[has]) & (levels[has] < 4 / counts[has])).all()


def test_ctaugment_probe_levels_are_uniform_over_all_bins():
    _, policy = CTAugment(depth=1).probe(_images(count=512, size=8), generator=_generator())
    levels = policy.levels[:, 0, 0][policy.ops[:, 0] != CTAugment.op_names.index("identity")]
    assert levels.min() < 0.05 and levels.max() > 0.95
    assert abs(float(levels.mean()) - 0.5) < 0.05


def test_ctaugment_state_dict_round_trips_through_torch_load_weights_only():
    augmenter = CTAugment()
    augmenter.update(*_probe_batch(augmenter))
    buffer = io.BytesIO()
    torch.save(augmenter.state_dict(), buffer)
    buffer.seek(0)
    restored = CTAugment()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.rates, augmenter.rates)
    assert not torch.equal(restored.rates, CTAugment().rates)
    images = _images()
    first = augmenter(images, flip=True, generator=_generator(5))
    second = restored(images, flip=True, generator=_generator(5))
    assert torch.equal(first[0], second[0])


@pytest.mark.parametrize("saved_bins,loading_bins", [(17, 9), (5, 6)])
def test_ctaugment_state_with_other_num_bins_is_a_config_error(saved_bins, loading_bins):
    with pytest.raises(TrainConfigError, match="num_bins"):
        CTAugment(num_bins=loading_bins).load_state_dict(CTAugment(num_bins=saved_bins).state_dict())


@pytest.mark.parametrize("field,value", [("num_bins", 1), ("decay", 1.0), ("threshold", 0.0),
                                         ("depth", 0)])
def test_ctaugment_rejects_out_of_range_settings_naming_the_field(field, value):
    with pytest.raises(TrainConfigError, match=field):
        CTAugment(**{field: value})


def test_integer_images_are_rejected():
    with pytest.raises(ValueError, match="float"):
        weak_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), flip=True, generator=_generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_cuda_batch_gives_the_cpu_result_for_the_same_seed(name):
    images = _images(count=16)
    on_cpu = AUGMENTATIONS[name](images, _generator(11))
    on_cuda = AUGMENTATIONS[name](images.cuda(), _generator(11))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-5, rtol=0)
