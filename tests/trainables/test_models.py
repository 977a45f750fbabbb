"""Specification of the model registry (trainables/models.py)."""

import copy
import math

import pytest
import torch
from torch import nn

from trainables.errors import TrainConfigError
from trainables.models import MODELS, create_model, list_models, weight_decay_parameters

# The input sizes each model is meant for.
MODEL_SIZES = {
    "wrn28_2": (32, 96),
    "wrn28_4": (32, 84),
    "wrn28_8": (32,),
    "resnet18": (32,),
    "cnn_small": (8, 28),
}
CASES = [(name, channels, size)
         for name, sizes in MODEL_SIZES.items() for size in sizes for channels in (1, 3)]
FIXMATCH_PORT_WRN28_2_PARAMETERS = 1_467_610  # kekmodel/FixMatch-pytorch, 10 classes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_every_registered_model_has_sizes_under_test():
    assert sorted(MODEL_SIZES) == list_models() == sorted(MODELS)


@pytest.mark.parametrize("name,in_channels,image_size", CASES)
def test_output_shape_is_batch_by_num_classes(name, in_channels, image_size):
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    logits = model(torch.randn(3, in_channels, image_size, image_size))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,in_channels,image_size",
                         [case for case in CASES if case[0] != "wrn28_8"])
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_channels_last_forward_matches_contiguous(name, in_channels, image_size, train_mode):
    model = create_model(name, num_classes=5, in_channels=in_channels, image_size=image_size)
    model.train(train_mode)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randn(4, in_channels, image_size, image_size)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(images)
        actual = model_cl(images_cl)
    assert model_cl.fc.weight.shape == model.fc.weight.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_wrn28_2_parameter_count_is_fixmatch_ports():
    count = _count_parameters(create_model("wrn28_2", num_classes=10))
    assert count == 1_467_610
    assert abs(count - FIXMATCH_PORT_WRN28_2_PARAMETERS) <= 0.01 * FIXMATCH_PORT_WRN28_2_PARAMETERS


def wide_resnet_parameters(k: int, num_classes: int, in_channels: int = 3, stages: int = 3) -> int:
    """WRN-28-k counted from its architecture: a 3x3 stem of 16 filters, `stages` stages of 4
    pre-activation blocks (widths 16k, 32k, 64k, ...), each two 3x3 convolutions with a batch-norm
    before each and a 1x1 shortcut where the width changes, a final batch-norm and a linear layer.
    Convolutions have no bias; a batch-norm has 2 parameters per channel."""
    total, width = 9 * in_channels * 16, 16
    for stage in range(stages):
        out = 16 * k * 2 ** stage
        for block in range(4):
            inp = width if block == 0 else out
            total += 2 * inp + 9 * inp * out + 2 * out + 9 * out * out + (inp * out if inp != out else 0)
        width = out
    return total + 2 * width + width * num_classes + num_classes


def test_wide_resnet_parameter_counts_follow_the_architecture():
    assert wide_resnet_parameters(2, 10) == FIXMATCH_PORT_WRN28_2_PARAMETERS  # the formula is right
    # WRN-28-4: the original's --filters=64, for mini-ImageNet's 100 classes at 84 px (a 4th stage).
    assert _count_parameters(create_model("wrn28_4", num_classes=100)) == wide_resnet_parameters(4, 100)
    assert _count_parameters(create_model("wrn28_4", num_classes=100, image_size=84)) == \
        wide_resnet_parameters(4, 100, stages=4)


def test_wrn28_8_for_cifar100_has_about_23_4m_parameters():
    assert _count_parameters(create_model("wrn28_8", num_classes=100)) == 23_401_012


def test_wrn_batch_norm_momentum_is_fixmatch_0_001():
    model = create_model("wrn28_2", num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1 + 3 * 4 * 2  # per block 2, plus the final one
    assert all(norm.momentum == 0.001 for norm in norms)


def test_wrn_activations_are_all_leaky_relu_0_1():
    model = create_model("wrn28_2", num_classes=10)
    activations = [m for m in model.modules()
                   if type(m).__module__ == "torch.nn.modules.activation"]
    assert len(activations) == 1 + 3 * 4 * 2
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in activations)


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_bn_momentum_kwarg_reaches_every_batch_norm(name):
    model = create_model(name, num_classes=3, bn_momentum=0.05)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(norm.momentum == 0.05 for norm in norms)


@pytest.mark.parametrize("image_size,final_side,final_width", [(32, 8, 128), (96, 12, 256)])
def test_wrn_larger_than_32_gets_one_more_downscaling_stage(image_size, final_side, final_width):
    model = create_model("wrn28_2", num_classes=10, image_size=image_size)
    captured = {}
    model.bn.register_forward_hook(lambda module, inputs, output: captured.update(x=output))
    model(torch.randn(2, 3, image_size, image_size))
    assert captured["x"].shape == (2, final_width, final_side, final_side)


def test_wrn_conv_init_is_kaiming_normal_fan_out_and_linear_bias_zero():
    model = create_model("wrn28_2", num_classes=10)
    # The strided conv entering stage 2 has fan_out = 64*9, twice its fan_in = 32*9.
    conv = model.blocks[4].conv1
    assert conv.weight.shape == (64, 32, 3, 3)
    gain = math.sqrt(2.0 / (1 + 0.1 ** 2))
    expected_std = gain / math.sqrt(64 * 9)
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.count_nonzero(model.fc.bias) == 0


def test_shortcut_sees_activated_input_only_in_the_first_block():
    """FixMatch's activate_before_residual: the network's first block feeds act(bn1(x)) to
    its shortcut; the other stage-opening blocks feed it the raw input x."""
    model = create_model("wrn28_2", num_classes=10).eval()
    seen, block_inputs = {}, {}
    for index in (0, 4, 8):
        model.blocks[index].register_forward_pre_hook(
            lambda module, inputs, index=index: block_inputs.update({index: inputs[0].clone()}))
        model.blocks[index].shortcut.register_forward_pre_hook(
            lambda module, inputs, index=index: seen.update({index: inputs[0].clone()}))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        first = model.blocks[0]
        activated = nn.functional.leaky_relu(first.bn1(block_inputs[0]), 0.1)
    torch.testing.assert_close(seen[0], activated)
    torch.testing.assert_close(seen[4], block_inputs[4])
    torch.testing.assert_close(seen[8], block_inputs[8])
    assert not torch.allclose(activated, block_inputs[0])


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_weight_decay_group_is_exactly_conv_and_linear_weights(name):
    model = create_model(name, num_classes=10)
    decay, no_decay = weight_decay_parameters(model)
    expected_decay = {id(m.weight) for m in model.modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear))}
    norm_params = {id(p) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    biases = {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    decay_ids = {id(p) for p in decay}
    no_decay_ids = {id(p) for p in no_decay}
    assert decay_ids == expected_decay
    assert len(decay) == len(decay_ids) and len(no_decay) == len(no_decay_ids)
    assert norm_params and biases and (norm_params | biases) <= no_decay_ids
    assert decay_ids.isdisjoint(no_decay_ids)
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}


def test_unknown_model_name_raises_with_known_names():
    with pytest.raises(TrainConfigError) as caught:
        create_model("vgg16", num_classes=10)
    message = str(caught.value)
    assert "vgg16" in message
    assert all(name in message for name in list_models())


def test_unknown_model_kwarg_is_config_error():
    with pytest.raises(TrainConfigError, match="dropout"):
        create_model("cnn_small", num_classes=10, dropout=0.5)


def test_cnn_small_learns_a_separable_toy_task_in_a_few_steps():
    model = create_model("cnn_small", num_classes=2, in_channels=1, image_size=8)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 1, 8, 8) + (2.0 * labels - 1.0).view(-1, 1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("image_size, feature_side", [(8, 4), (15, 7), (16, 4), (28, 7)])
def test_cnn_small_pools_early_from_16_px_with_the_same_parameters(image_size, feature_side):
    model = create_model("cnn_small", num_classes=10, in_channels=1, image_size=image_size)
    features = model.features(torch.zeros(2, 1, image_size, image_size))
    assert features.shape == (2, 64, feature_side, feature_side)
    assert _count_parameters(model) == _count_parameters(create_model("cnn_small", 10, in_channels=1, image_size=8))
