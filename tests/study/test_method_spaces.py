"""Each method's search space comes from its declarations in the registry."""

import pytest
import torch

from search_spaces.spaces import Choice, Uniform
from study.config import StudyConfig
from study.errors import StudyError
from study.method_spaces import method_space, reference_point, training_values
from trainables.methods import METHODS, Method, MethodOutput
from trainables.options import Option


def test_fixmatch_searches_its_threshold_and_the_common_weights_only_cadr_searches_the_corrections():
    assert method_space("fixmatch") == {"lr": Uniform(0.01, 0.1, log=True), "wu": Uniform(0.3, 3.0, log=True),
                                        "confidence": Uniform(0.7, 0.99)}
    cadr = method_space("cadr")
    assert set(cadr) == {"lr", "wu", "confidence", "cai_beta", "cap_momentum", "upper"}
    assert set(method_space("cap")) == {"lr", "wu", "confidence", "cap_momentum", "upper"}  # no cai_beta
    assert set(method_space("cai")) == {"lr", "wu", "confidence", "cai_beta", "cap_momentum"}  # no upper


def test_a_momentum_is_searched_as_one_minus_it_on_a_log_scale():
    assert method_space("freematch")["1-ema_m"] == Uniform(0.001, 0.1, log=True)
    assert reference_point("freematch")["1-ema_m"] == 0.001
    assert training_values({"1-ema_m": 0.1, "lr": 0.03}) == {"ema_m": 0.9, "lr": 0.03}
    assert method_space("softmatch")["n_sigma"] == Choice((1, 2, 3))
    assert set(method_space("debiaspl")) == {"lr", "wu", "tau", "1-qhat_m", "confidence"}


def test_every_registered_method_has_a_space_whose_reference_point_trains():
    study = StudyConfig.from_dict({})
    for name in METHODS:
        space = method_space(name)
        assert {"lr", "wu"} <= set(space), name
        study.train_config({"variant": name, **reference_point(name)})


def test_a_new_method_is_tunable_with_no_edit_elsewhere(monkeypatch):
    class Tempered(Method):
        name, title = "tempered", "Tempered"
        options = {"temperature": Option(1.0, "softmax temperature", low=0, low_open=True,
                                         search={"loguniform": [0.1, 10.0]})}

        def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index):
            zero = logits_x.sum() * 0
            return MethodOutput(zero, zero, zero, torch.zeros(len(logits_weak)))

    monkeypatch.setitem(METHODS, "tempered", Tempered)
    assert method_space("tempered")["temperature"] == Uniform(0.1, 10.0, log=True)
    config = StudyConfig.from_dict({"space": "method:tempered", "train": {"method": "tempered"}})
    assert set(config.resolved_space()) == {"lr", "wu", "temperature"}
    assert config.train_config({"temperature": 2.0}).method.options["temperature"] == 2.0


def test_an_unknown_method_space_is_a_one_line_error():
    with pytest.raises(StudyError, match="unknown method or variant 'nomatch'"):
        StudyConfig.from_dict({"space": "method:nomatch"}).resolved_space()
