"""Search spaces: validation of parameters, bounds and conflicts; mapping to Optuna and Tune."""

import re

import optuna.distributions as od
import pytest

from search_spaces import SpaceError, get_space, validate_space
from search_spaces.spaces import CAP_FORMS, Choice, Grid, Uniform, space_from_dict, to_optuna
from trainables import losses

ALL_ON = {"cap": True, "cai": True, "cadr": True}


def test_cap_form_names_match_the_losses():
    assert CAP_FORMS == tuple(losses.CAP_FORMS)


def test_cap_form_and_cap_ema_are_searchable():
    space = space_from_dict({"cap_form": {"choice": ["reference", "ipw"]}, "cap_ema": {"grid": [True, False]}})
    validate_space(space, ALL_ON)
    assert space == {"cap_form": Choice(("reference", "ipw")), "cap_ema": Grid((True, False))}
    assert to_optuna({"cap_form": space["cap_form"]}) == {
        "cap_form": od.CategoricalDistribution(["reference", "ipw"])}


@pytest.mark.parametrize("space, message", [
    ({"cap_form": Choice(("reference", "softmax"))}, "cap_form 'softmax' is unknown (known: reference, ipw)"),
    ({"cap_ema": Grid((True, 1))}, "cap_ema=1 is out of range: must be bool"),
    ({"confidence": Uniform(0.5, 1.5)}, "confidence=1.5 is out of range: must be a float in [0, 1]"),
    ({"wu": Uniform(0.0, 10.0, log=True)}, "wu: a log-uniform range needs a positive lower bound, got 0"),
    ({"colour": Choice(("red",))}, "unknown parameter 'colour'"),
    ({"variant": Grid(("fixmatch", "cadr_only"))}, "variant 'cadr_only' is unknown"),
])
def test_bad_spaces_are_refused_with_the_reason(space, message):
    with pytest.raises(SpaceError, match=re.escape(message)):
        validate_space(space, ALL_ON)


def test_cadr_without_cap_is_refused_whether_it_comes_from_the_base_or_a_variant():
    with pytest.raises(SpaceError, match="CADR without CAP"):
        validate_space(get_space("thresholds"), {"cap": False, "cai": True, "cadr": True})
    validate_space(get_space("ablation"), {"cap": False, "cai": False, "cadr": False})  # variants set both


def test_combined_spaces_hold_every_parameter_of_each():
    combined = get_space("thresholds+loss_weights")
    assert set(combined) == set(get_space("thresholds")) | set(get_space("loss_weights"))
