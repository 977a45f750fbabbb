"""Classifier networks and their registry (timm-style: ``create_model(name, num_classes, ...)``).

Every model maps an NCHW float batch of shape (N, in_channels, image_size, image_size) to
logits of shape (N, num_classes), works in ``torch.channels_last`` memory format, and takes a
``bn_momentum`` keyword. PyTorch's batch-norm momentum is the weight of the *new* batch, so
``bn_momentum=0.001`` is FixMatch's TF decay 0.999 (running statistics move slowly).

Adding a model is adding one constructor ``f(num_classes, in_channels, image_size, **kwargs)``
to ``MODELS``. Every model's classifier is its linear ``fc`` on the pooled features, so
``create_model(..., auxiliary_head=True)`` can give any of them a second classifier on the same
features (a method that trains two heads, docs/method.md): the logits are then (N, 2 num_classes),
the main head's first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18 as torchvision_resnet18

from trainables.errors import TrainConfigError

FIXMATCH_BN_MOMENTUM = 0.001
LEAKY_SLOPE = 0.1


def _leaky_relu() -> nn.LeakyReLU:
    # In place is safe: it is only ever applied to a fresh batch-norm output.
    return nn.LeakyReLU(negative_slope=LEAKY_SLOPE, inplace=True)


class WideResidualBlock(nn.Module):
    """Pre-activation residual block of FixMatch's WideResNet (libml/models.py ``residual``).

    ``out = shortcut(x) + conv2(act(bn2(conv1(act(bn1(x))))))``. The shortcut is the identity
    when shape is kept, else a strided 1x1 convolution. It sees the raw input ``x``, except with
    ``activate_before_residual`` where it sees ``act(bn1(x))`` (the first block of the network).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 activate_before_residual: bool, bn_momentum: float):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.act1 = _leaky_relu()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.act2 = _leaky_relu()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        residual = self.conv2(self.act2(self.bn2(self.conv1(activated))))
        return self.shortcut(activated if self.activate_before_residual else x) + residual


class WideResNet(nn.Module):
    """WideResNet-depth-k as in FixMatch: a 3x3 stem with 16 filters, then stages of
    ``(depth - 4) / 6`` blocks with widths 16k, 32k, 64k (one more, 128k, per extra stage),
    each stage after the first halving the resolution; final BN + leaky ReLU, global average
    pooling, linear head. Shape: (N, in_channels, H, W) -> (N, num_classes).
    """

    def __init__(self, num_classes: int, depth: int = 28, widen_factor: int = 2,
                 in_channels: int = 3, num_stages: int = 3,
                 bn_momentum: float = FIXMATCH_BN_MOMENTUM):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise TrainConfigError(f"WideResNet depth must be 6n+4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        channels = 16
        for stage in range(num_stages):
            width = 16 * widen_factor << stage
            for index in range(blocks_per_stage):
                first = index == 0
                blocks.append(WideResidualBlock(
                    channels, width,
                    stride=2 if first and stage > 0 else 1,
                    activate_before_residual=first and stage == 0,
                    bn_momentum=bn_momentum))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.act = _leaky_relu()
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, mode="fan_out",
                                        nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)  # TF's glorot_normal in FixMatch
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(features.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """A small CNN for tiny inputs (8x8 digits, 28x28): two conv-BN-leaky layers at ``width``
    channels, 2x2 max-pool, two at ``2 * width``, global average pooling, linear head.
    ``early_pool`` adds a 2x2 max-pool after the first layer, for inputs of 16 px and more:
    the 28x28 network then costs a quarter of the compute at the same parameters.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32,
                 bn_momentum: float = 0.01, early_pool: bool = False):
        super().__init__()

        def conv_bn_act(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout, momentum=bn_momentum), _leaky_relu()]

        self.features = nn.Sequential(
            *conv_bn_act(in_channels, width), *([nn.MaxPool2d(2)] if early_pool else []),
            *conv_bn_act(width, width),
            nn.MaxPool2d(2),
            *conv_bn_act(width, 2 * width), *conv_bn_act(2 * width, 2 * width),
        )
        self.fc = nn.Linear(2 * width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, mode="fan_out",
                                        nonlinearity="leaky_relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _wide_resnet(widen_factor: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32,
              bn_momentum: float = FIXMATCH_BN_MOMENTUM) -> nn.Module:
        # STL-10 (96) and mini-ImageNet (84) get one more downscaling stage.
        num_stages = 4 if image_size > 32 else 3
        return WideResNet(num_classes, depth=28, widen_factor=widen_factor,
                          in_channels=in_channels, num_stages=num_stages,
                          bn_momentum=bn_momentum)
    build.__doc__ = f"WideResNet-28-{widen_factor} (FixMatch form)."
    return build


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32,
             bn_momentum: float = FIXMATCH_BN_MOMENTUM) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem: 3x3 stride-1 first conv, no max-pool."""
    del image_size  # the CIFAR stem suits every size this project uses
    model = torchvision_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = bn_momentum
    return model


def cnn_small(num_classes: int, in_channels: int = 3, image_size: int = 8,
              bn_momentum: float = 0.01) -> nn.Module:
    """SmallCNN. Its BN momentum defaults to 0.01, not 0.001: it serves short CPU runs, where
    running statistics moving at 0.001 per step would not settle before evaluation. Global
    pooling makes it size-agnostic (>= 2x2); from 16 px it pools once more, early."""
    return SmallCNN(num_classes, in_channels=in_channels, bn_momentum=bn_momentum, early_pool=image_size >= 16)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn28_2": _wide_resnet(2),
    "wrn28_4": _wide_resnet(4),  # the original's --filters=64 (mini-ImageNet)
    "wrn28_8": _wide_resnet(8),
    "resnet18": resnet18,
    "cnn_small": cnn_small,
}


class TwoHeads(nn.Module):
    """Two linear classifiers on the same features: (N, F) -> (N, 2C), the main head's logits first."""

    def __init__(self, main: nn.Linear):
        super().__init__()
        self.main = main
        self.auxiliary = nn.Linear(main.in_features, main.out_features, device=main.weight.device,
                                   dtype=main.weight.dtype)
        # A fresh head, initialised as ACR's WideResNet initialises its second one.
        nn.init.xavier_normal_(self.auxiliary.weight)
        nn.init.zeros_(self.auxiliary.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.main(features), self.auxiliary(features)], dim=1)


def add_auxiliary_head(model: nn.Module) -> nn.Module:
    """The model with a second classifier beside its linear ``fc`` (the head gets its own weights)."""
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise TrainConfigError(f"{type(model).__name__} has no linear fc head to add an auxiliary head beside")
    model.fc = TwoHeads(model.fc)
    return model


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 auxiliary_head: bool = False, **kwargs) -> nn.Module:
    """Build model ``name`` for (N, in_channels, image_size, image_size) inputs and
    ``num_classes`` outputs (twice that with ``auxiliary_head``: `add_auxiliary_head`).
    ``kwargs`` go to the constructor (e.g. ``bn_momentum``)."""
    if name not in MODELS:
        raise TrainConfigError(
            f"model: unknown model {name!r}; known models: {', '.join(list_models())}")
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels),
                         ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrainConfigError(f"{field}: must be a positive integer, got {value!r}")
    momentum = kwargs.get("bn_momentum")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise TrainConfigError(f"bn_momentum: must be in (0, 1], got {momentum!r}")
    constructor = MODELS[name]
    try:
        inspect.signature(constructor).bind(num_classes, in_channels=in_channels,
                                            image_size=image_size, **kwargs)
    except TypeError as error:
        raise TrainConfigError(f"model {name!r}: {error}") from None
    model = constructor(num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    return add_auxiliary_head(model) if auxiliary_head else model


def weight_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (decay, no_decay) by module type: the ``weight`` of every
    convolution and linear layer decays; batch-norm parameters, all biases and anything else
    do not. Each parameter appears once, in ``model.parameters()`` order."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        decays_weight = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (decay if decays_weight and name == "weight" else no_decay).append(parameter)
    return decay, no_decay
