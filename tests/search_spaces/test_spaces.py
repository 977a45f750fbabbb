"""Search spaces: the distributions themselves (bounds, empty choices, variant names), joining
named spaces, and the mapping to Optuna and Tune. Which parameters exist and which values training
accepts is the study layer's check (tests/study/test_launch.py)."""

import re

import optuna.distributions as od
import pytest

from search_spaces import SPACES, SpaceError, get_space, validate_space
from search_spaces.spaces import VARIANTS, Choice, Grid, Uniform, space_from_dict, to_optuna


@pytest.mark.parametrize("name", list(SPACES))
def test_every_named_space_is_a_valid_space(name):
    validate_space(get_space(name))


def test_spaces_written_in_yaml_map_to_the_distributions_and_to_optuna():
    space = space_from_dict({"cap_form": {"choice": ["reference", "ipw"]}, "cap_ema": {"grid": [True, False]},
                             "wu": {"loguniform": [0.1, 10]}})
    validate_space(space)
    assert space == {"cap_form": Choice(("reference", "ipw")), "cap_ema": Grid((True, False)),
                     "wu": Uniform(0.1, 10.0, log=True)}
    assert to_optuna(space) == {"cap_form": od.CategoricalDistribution(["reference", "ipw"]),
                                "cap_ema": od.CategoricalDistribution([True, False]),
                                "wu": od.FloatDistribution(0.1, 10.0, log=True)}


@pytest.mark.parametrize("space, message", [
    ({"confidence": Uniform(0.9, 0.7)}, "confidence: lower bound 0.9 is not below upper bound 0.7"),
    ({"wu": Uniform(0.0, 10.0, log=True)}, "wu: a log-uniform range needs a positive lower bound, got 0"),
    ({"lr": Uniform("a", 1.0)}, "lr: a range needs numeric bounds"),
    ({"seed": Grid(())}, "seed: no values to choose from"),
    ({"variant": Grid(("fixmatch", "cadr_only"))}, "variant 'cadr_only' is unknown"),
    ({"wu": 3}, "wu: 3 is not a distribution"),
])
def test_bad_distributions_are_refused_with_the_reason(space, message):
    with pytest.raises(SpaceError, match=re.escape(message)):
        validate_space(space)


def test_variants_name_a_method_and_its_options():
    assert VARIANTS["cadr"] == {"method": "fixmatch", "cap": True, "cai": True, "cadr": True}
    assert VARIANTS["flexmatch"] == {"method": "flexmatch"}
    assert get_space("ablation")["variant"].values == ("fixmatch", "cap", "cai", "cap_cai", "cadr")
    assert get_space("baselines")["variant"].values == (
        "fixmatch", "cadr", "flexmatch", "freematch", "softmatch", "debiaspl", "simpro", "cdmad", "acr")


def test_combined_spaces_hold_every_parameter_of_each():
    combined = get_space("thresholds+loss_weights")
    assert set(combined) == set(get_space("thresholds")) | set(get_space("loss_weights"))


def test_a_parameter_in_two_joined_spaces_is_refused():
    with pytest.raises(SpaceError, match="both set gamma_l"):
        get_space("imbalance+imbalance_unlabeled")
