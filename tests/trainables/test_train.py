"""The training step (trainables.step), its state, the schedule, the EMA, the loop's sampler, and a
real short training on digits through the single-process runner (trainables.loop.train)."""

import copy
import math

import pytest
import torch

from data_prep.convert import prepare
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.loop import EpochSampler, train
from trainables.step import build_state, cosine_lr_factor, ema_decay_at, ema_update, train_step


def _batch(n_labeled=8, mu=2, shape=(8, 8, 1), num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labeled = torch.randint(0, 256, (n_labeled, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n_labeled,), generator=g)
    unlabeled = torch.randint(0, 256, (n_labeled * mu, *shape), generator=g, dtype=torch.uint8)
    return labeled, labels, unlabeled


def _state(**overrides):
    config = TrainConfig.from_dict({"batch_size": 8, "mu": 2, "steps": 100, **overrides})
    return config, build_state(config, 10, (8, 8, 1), torch.device("cpu"))


def test_cosine_schedule_values_at_start_middle_and_end():
    assert cosine_lr_factor(0, 1000) == 1.0
    assert cosine_lr_factor(500, 1000) == pytest.approx(math.cos(7 * math.pi / 32), abs=1e-12)
    assert cosine_lr_factor(1000, 1000) == pytest.approx(math.cos(7 * math.pi / 16), abs=1e-12)


def test_optimizer_follows_the_schedule_and_decays_only_conv_and_linear_weights():
    config, state = _state(lr=0.1, wd=0.01)
    decay_group, no_decay_group = state.optimizer.param_groups
    assert decay_group["weight_decay"] == 0.01 and no_decay_group["weight_decay"] == 0.0
    assert decay_group["nesterov"] and decay_group["momentum"] == 0.9
    decayed = {id(p) for p in decay_group["params"]}
    for module in state.model.modules():
        for name, p in module.named_parameters(recurse=False):
            expected = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name == "weight"
            assert (id(p) in decayed) == expected, (type(module).__name__, name)
    for _ in range(3):
        train_step(state, config, *_batch(), flip=False)
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * cosine_lr_factor(3, 100))


def test_ema_equals_the_model_at_decay_zero_and_lags_it_otherwise():
    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema_update(ema, model, decay=0.0)
    assert torch.equal(ema.weight, model.weight)
    before = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema_update(ema, model, decay=0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * model.weight)


def test_ema_decay_warms_up_like_tensorflow():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_step_updates_weights_ema_prior_and_counter():
    config, state = _state(cap=True, cai=True, cadr=True, confidence=0.5)
    weights = copy.deepcopy(state.model.state_dict())
    stats = train_step(state, config, *_batch(), flip=False)
    assert state.step == 1
    assert not torch.equal(weights["fc.weight"], state.model.state_dict()["fc.weight"])
    assert not torch.equal(state.ema_model.fc.weight, state.model.fc.weight)  # the EMA lags
    p_ema = state.method.state["p_ema"]
    assert p_ema.shape == (10,) and float(p_ema.sum()) == pytest.approx(1.0)
    assert not torch.allclose(p_ema, torch.full((10,), 0.1))
    assert set(stats) == {"loss/total", "loss/labeled", "loss/unlabeled", "loss/cadr", "mask_rate", "lr", "finite"}
    assert bool(stats["finite"])


def test_a_forward_without_a_truth_value_is_used_as_given():
    # torch.compile's OptimizedModule raises on bool() for models without __len__.
    class NoTruthValue(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def __len__(self):
            raise TypeError("no len()")

        def forward(self, x):
            self.calls += 1
            return self.model(x)

    config, state = _state()
    forward = NoTruthValue(state.model)
    train_step(state, config, *_batch(), flip=False, forward=forward)
    assert forward.calls == 1 and state.step == 1


def _assert_same_next_step(state, restored, config):
    batch = _batch(seed=3)
    train_step(state, config, *batch, flip=False)
    train_step(restored, config, *batch, flip=False)
    for a, b in zip(restored.model.parameters(), state.model.parameters()):
        torch.testing.assert_close(a, b)


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    config, state = _state(augment="d.d.cta", cap=True)
    for _ in range(2):
        train_step(state, config, *_batch(), flip=False)
    torch.save(state.state_dict(), tmp_path / "ckpt.pt")
    _, restored = _state(augment="d.d.cta", cap=True)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert restored.step == 2
    assert torch.equal(restored.method.state["p_ema"], state.method.state["p_ema"])
    for a, b in zip(restored.model.parameters(), state.model.parameters()):
        assert torch.equal(a, b)
    # Both continue identically: same RNG, same optimiser momentum, same CTAugment weights.
    _assert_same_next_step(state, restored, config)


def test_the_replaced_strong_augment_option_says_what_replaces_it():
    with pytest.raises(TrainConfigError, match="replaced by augment .*ctaugment is augment: d.d.cta"):
        _state(strong_augment="ctaugment")


def test_config_from_dict_routes_method_options_and_rejects_unknown_keys():
    config = TrainConfig.from_dict({"model": "wrn28_2", "cadr": True, "cap": True, "confidence": 0.8})
    assert config.method.name == "fixmatch" and config.method.label == "FixMatch+CAP+CADR"
    assert config.method.options["cadr"] and config.method.options["confidence"] == 0.8
    assert config.model == "wrn28_2"
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TrainConfigError, match="unknown training option.*colour"):
        TrainConfig.from_dict({"colour": 1})
    with pytest.raises(TrainConfigError, match="cadr=True requires cap=True"):
        TrainConfig.from_dict({"cadr": True})
    with pytest.raises(TrainConfigError, match="confidence must be in \\(0, 1\\], got 1.5"):
        TrainConfig.from_dict({"confidence": 1.5})


def test_epoch_sampler_visits_every_row_once_per_epoch():
    sampler = EpochSampler(10, 4, torch.Generator().manual_seed(0))
    rows = torch.cat([sampler.next() for _ in range(5)])  # 20 rows = two epochs
    assert sorted(rows[:10].tolist()) == list(range(10))
    assert sorted(rows[10:].tolist()) == list(range(10))
    small = EpochSampler(3, 7, torch.Generator().manual_seed(0))
    assert len(small.next()) == 7


def test_an_epoch_sampler_continues_its_epoch_from_its_state_but_not_one_over_other_rows():
    sampler = EpochSampler(10, 4, torch.Generator().manual_seed(0))
    first = sampler.next()
    copy = EpochSampler(10, 4, torch.Generator().manual_seed(1))
    copy.load_state_dict(sampler.state_dict())
    second = sampler.next()
    assert torch.equal(copy.next(), second)  # the same epoch's next rows, whatever the generator
    assert not set(first.tolist()) & set(second.tolist())
    fewer = EpochSampler(5, 4, torch.Generator().manual_seed(0))
    fewer.load_state_dict(sampler.state_dict())  # rows beyond its 5: a new epoch instead
    assert fewer.state_dict()["order"].numel() == 0


def test_short_training_on_digits_is_far_above_chance(tmp_path):
    prepare("digits", tmp_path)
    result = train(TrainConfig.from_dict(dict(dataset="digits", split="digits_LT_10.1@50", data_root=str(tmp_path),
                                              model="cnn_small", steps=300, eval_every=100, batch_size=32, mu=3,
                                              cap=True, cai=True, cadr=True)), progress=False)
    metrics = result["metrics"]
    assert metrics["step"] == 300
    assert sorted(k for k in metrics if "class_accuracy/" in k) == [f"test_class_accuracy/{c}" for c in range(10)]
    assert not any(k.startswith("valid_") for k in metrics)  # the split has no validation set
    assert sum(metrics[f"p_ema/{c}"] for c in range(10)) == pytest.approx(1.0)
    assert metrics["test_accuracy"] > 0.5  # chance is 0.1; evaluated on the full test split
    assert metrics["test_gm"] > 0.3
    assert len(result["history"]) == 3


def _digits_config(root, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({"dataset": "digits", "split": "digits_LT_10.1@50-100", "data_root": str(root),
                                  "model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2,
                                  "device": "cpu", **overrides})


def test_the_loop_compiles_the_model_when_asked(tmp_path, monkeypatch):
    # Every runner trains through run_loop, so `compile` takes effect on every path.
    prepare("digits", tmp_path)
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    state = train(_digits_config(tmp_path, compile=True), progress=False)["state"]
    assert compiled == [state.model]
    train(_digits_config(tmp_path), progress=False)
    assert len(compiled) == 1


def test_the_single_process_runner_resumes_from_its_checkpoint_directory(tmp_path):
    prepare("digits", tmp_path / "data")
    checkpoints = tmp_path / "run"
    first = train(_digits_config(tmp_path / "data"), progress=False, checkpoint_dir=checkpoints)
    assert [m["step"] for m in first["history"]] == [10, 20]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["state.pt"]  # nothing half-written beside it
    resumed = train(_digits_config(tmp_path / "data", steps=40), progress=False, checkpoint_dir=checkpoints)
    assert [m["step"] for m in resumed["history"]] == [30, 40]
    history = resumed["state"].tracker.state_dict()["history"]["test_accuracy"]
    assert history[:2] == [m["test_accuracy"] for m in first["history"]]
    saved = torch.load(checkpoints / "state.pt", weights_only=True)
    assert saved["step"] == 40 and saved["method"] == "fixmatch"


class Stop(Exception):
    """A run stopped after a checkpoint, as a crash or a killed process would stop it."""


def test_a_run_stopped_and_resumed_from_its_checkpoint_trains_exactly_as_one_never_stopped(tmp_path):
    # digits_LT_10.1@50-100 has 163 labeled rows: with B = 8, step 20 is inside the labeled epoch
    # (and the unlabeled one), so the samplers' place in their epochs must come back too.
    prepare("digits", tmp_path / "data")
    config = _digits_config(tmp_path / "data", steps=40, augment="d.d.rac")
    whole = train(config, progress=False)

    def stop_at_20(metrics):
        if metrics["step"] == 20:
            raise Stop

    with pytest.raises(Stop):
        train(config, progress=False, on_eval=stop_at_20, checkpoint_dir=tmp_path / "run")
    resumed = train(config, progress=False, checkpoint_dir=tmp_path / "run")
    assert [m["step"] for m in resumed["history"]] == [30, 40]
    assert [m["test_accuracy"] for m in resumed["history"]] == [m["test_accuracy"] for m in whole["history"][2:]]
    for name, tensor in whole["state"].model.state_dict().items():
        assert torch.equal(tensor, resumed["state"].model.state_dict()[name]), name
    assert torch.equal(whole["state"].generator.get_state(), resumed["state"].generator.get_state())


def _floating_tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in _floating_tensors(item)]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_runs_the_model_in_half_and_keeps_everything_else_fp32(precision, dtype):
    config, state = _state(precision=precision, cap=True, cadr=True)
    outputs = []
    state.model.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    metrics = train_step(state, config, *_batch(), flip=False)
    assert outputs == [dtype]  # the autocast reached the model
    assert math.isfinite(float(metrics["loss/total"]))
    assert state.method.state["p_ema"].dtype == torch.float32  # the class prior
    checkpoint = state.state_dict()
    for part in ("model", "ema_model", "optimizer", "method_state"):
        tensors = _floating_tensors(checkpoint[part])
        assert tensors and all(t.dtype == torch.float32 for t in tensors), part
    assert (state.scaler is not None) == (precision == "fp16")


def test_the_fp16_gradient_scale_round_trips_through_the_checkpoint(tmp_path):
    config, state = _state(precision="fp16")
    train_step(state, config, *_batch(), flip=False)
    state.scaler.update(new_scale=1024.0)  # as after a run of overflowing steps
    torch.save(state.state_dict(), tmp_path / "ckpt.pt")
    _, restored = _state(precision="fp16")
    assert restored.scaler.get_scale() == 65536.0
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert restored.scaler.get_scale() == 1024.0
    _assert_same_next_step(state, restored, config)


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(TrainConfigError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        TrainConfig.from_dict({"precision": "fp8"})


def test_bf16_training_on_digits_tracks_fp32(tmp_path):
    # The tolerance: bf16 keeps 8 bits of mantissa, so the curves part a little; measured on this
    # run, the losses differ by under 1.5% and the final accuracies by 1.4 points.
    prepare("digits", tmp_path)
    runs = {}
    for precision in ("fp32", "bf16"):
        config = _digits_config(tmp_path, steps=300, eval_every=50, batch_size=32, mu=3, cap=True, cai=True,
                                cadr=True, precision=precision)
        runs[precision] = train(config, progress=False)["history"]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    for a, b in zip(fp32, bf16):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=0.05), a["step"]
    assert bf16[-1]["test_accuracy"] == pytest.approx(fp32[-1]["test_accuracy"], abs=0.04)
    assert fp32[-1]["test_accuracy"] > 0.8


def test_bf16_works_with_a_compiled_channels_last_model(tmp_path):
    prepare("digits", tmp_path)
    result = train(_digits_config(tmp_path, precision="bf16", compile=True, channels_last=True, steps=4,
                                  eval_every=4), progress=False)
    assert result["metrics"]["step"] == 4 and math.isfinite(result["metrics"]["loss/total"])
