"""Specification of the augmentation per branch (`augment: "L.W.S"`, trainables/augment.py): the
labeled, weak-unlabeled and strong-unlabeled branches each take one part, x (identity), d (weak),
ra (RandAugment), rac (RandAugment + Cutout) or cta (CTAugment); the original project's strings
keep their meaning (a strong d is CTAugment); the default is FixMatch's, bit for bit."""

import pytest
import torch

from trainables.augment import DEFAULT_AUGMENT, PARTS, Augmenter, CTAugment, parse_augment, strong_augment, weak_augment
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError

BRANCHES = ("labeled", "weak", "strong")


def _images(count=6, channels=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, channels, size, size, generator=g)


def _generator(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("text, parts", [
    ("d.d.rac", ("d", "d", "rac")),  # the default: FixMatch with RandAugment
    ("d.d.d", ("d", "d", "cta")),  # the original's FixMatch: a strong d is CTAugment
    ("x.d.ra", ("x", "d", "ra")),
    ("rac.x.cta", ("rac", "x", "cta")),
    ("d.x.d", ("d", "x", "cta")),
])
def test_augment_strings_parse_to_one_part_per_branch(text, parts):
    assert parse_augment(text) == parts
    assert Augmenter(text).parts == dict(zip(BRANCHES, parts))


@pytest.mark.parametrize("text", ["d.d.bogus", "d.d", "d..rac", "", "d.d.rac.x", "D.d.rac"])
def test_a_bad_augment_string_is_a_config_error_naming_the_allowed_parts(text):
    with pytest.raises(TrainConfigError, match="augment must be L.W.S, three parts each one of x, d, ra, rac, cta"):
        TrainConfig(augment=text)


def test_the_default_is_fixmatchs_augmentation():
    assert TrainConfig().augment == DEFAULT_AUGMENT == "d.d.rac"


def test_the_default_string_draws_exactly_what_the_step_did_before_branches_existed():
    # Before `augment`, a step ran weak_augment on the labeled batch, weak_augment on the
    # unlabeled batch and strong_augment (RandAugment + Cutout) on it, from one generator.
    labeled, unlabeled = _images(seed=0), _images(seed=1)
    augmenter, new = Augmenter(), _generator(7)
    got = [augmenter("labeled", labeled, flip=True, generator=new),
           augmenter("weak", unlabeled, flip=True, generator=new),
           augmenter("strong", unlabeled, flip=True, generator=new)]
    old = _generator(7)
    want = [weak_augment(labeled, flip=True, generator=old), weak_augment(unlabeled, flip=True, generator=old),
            strong_augment(unlabeled, flip=True, generator=old)]
    for have, expected in zip(got, want, strict=True):
        assert torch.equal(have, expected)
    assert torch.equal(new.get_state(), old.get_state())  # the same random numbers, no more


@pytest.mark.parametrize("branch", BRANCHES)
def test_identity_leaves_a_branchs_images_unchanged_and_draws_nothing(branch):
    parts = dict(zip(BRANCHES, ("d", "d", "rac")), **{branch: "x"})
    augmenter, images, generator = Augmenter(".".join(parts.values())), _images(), _generator()
    before = generator.get_state()
    assert augmenter(branch, images, flip=True, generator=generator) is images
    assert torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("part", ["d", "ra", "rac", "cta"])
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_part_on_each_branch_keeps_shape_dtype_and_range_is_seeded_and_changes_the_images(
        part, branch, channels):
    parts = dict(zip(BRANCHES, ("x", "x", "x")), **{branch: part})
    text = ".".join(parts.values())
    images = _images(channels=channels)
    first = Augmenter(text)(branch, images, flip=channels == 3, generator=_generator(3))
    again = Augmenter(text)(branch, images, flip=channels == 3, generator=_generator(3))
    other = Augmenter(text)(branch, images, flip=channels == 3, generator=_generator(4))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    assert torch.equal(first, again)  # determinism under a seed
    assert not torch.equal(first, other)
    assert not torch.equal(first, images)  # it differs from identity


def test_each_part_is_the_augmentation_it_names():
    images = _images()
    d = Augmenter("d.x.x")("labeled", images, flip=True, generator=_generator(5))
    assert torch.equal(d, weak_augment(images, flip=True, generator=_generator(5)))
    rac = Augmenter("x.rac.x")("weak", images, flip=True, generator=_generator(5))
    assert torch.equal(rac, strong_augment(images, flip=True, generator=_generator(5)))
    # ra is rac without its cutout square: the same draws up to the cutout.
    ra = Augmenter("x.x.ra")("strong", images, flip=True, generator=_generator(5))
    cut = (ra != rac).any(dim=1, keepdim=True).expand_as(ra)  # the pixels the cutout changed
    assert cut.any() and torch.equal(ra[~cut], rac[~cut])
    assert torch.all(rac[cut] == 0.5)  # its gray square
    cta = Augmenter("x.x.cta")("strong", images, flip=True, generator=_generator(5))
    assert torch.equal(cta, CTAugment()(images, flip=True, generator=_generator(5))[0])


def test_branches_that_use_ctaugment_share_one_learned_state_that_checkpoints():
    augmenter = Augmenter("cta.d.cta")
    assert augmenter.uses_probes and Augmenter("d.d.rac").uses_probes is False
    probe, policy = augmenter.probe(_images(), generator=_generator())
    probs = torch.softmax(torch.randn(6, 10, generator=_generator(2)), dim=1)
    augmenter.update(policy, probs, torch.arange(6))
    state = augmenter.state_dict()
    assert not torch.equal(state["rates"], CTAugment().rates)
    restored = Augmenter("cta.d.cta")
    restored.load_state_dict(state)
    images = _images()
    for branch in ("labeled", "strong"):
        assert torch.equal(restored(branch, images, flip=True, generator=_generator(9)),
                           augmenter(branch, images, flip=True, generator=_generator(9)))
    assert Augmenter("d.d.rac").state_dict() == {}
    with pytest.raises(TrainConfigError, match="augmentation state does not match"):
        Augmenter("d.d.rac").load_state_dict(state)


def test_every_part_is_documented():
    assert set(PARTS) == {"x", "d", "ra", "rac", "cta"}
