"""Built-in models, user model factories and checkpoints.

Nothing downstream depends on these models' layer names or shapes: the pipeline works on
any ``nn.Module`` classifier built from Conv1d/Conv2d, Linear, BatchNorm, residual
additions and depthwise convolutions.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paretoopt.config.space import ComponentSpec
from paretoopt.errors import SpaceError
from paretoopt.workload.registry import Registry, call_factory, load_callable

MODELS: Registry[nn.Module] = Registry("model")


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


@MODELS.register("conv")
def conv(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 32,
    image_size: int = 16,
    hidden: int = 128,
) -> nn.Module:
    """A small residual CNN: two conv stages, one residual block, a two-layer head."""
    side = image_size // 4
    return nn.Sequential(
        _conv_bn(in_channels, width),
        _conv_bn(width, 2 * width),
        nn.MaxPool2d(2),
        ResidualBlock(2 * width),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@MODELS.register("mlp")
def mlp(
    in_features: int = 256,
    num_classes: int = 10,
    hidden: tuple[int, ...] = (256, 128),
) -> nn.Module:
    """A multi-layer perceptron over the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a 1x1 expansion, a 3x3 depthwise convolution and a linear 1x1
    projection, with a residual addition where the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


# (expansion, output channels, blocks, stride of the first): MobileNetV2's first five
# stages at twice their width, for 28x28 inputs (a stride-2 stem, then 14 -> 7 -> 4)
MOBILENET_STAGES = ((1, 32, 1, 1), (6, 48, 2, 2), (6, 64, 3, 2), (6, 128, 3, 1), (6, 192, 2, 1))


@MODELS.register("mobilenet")
def mobilenet(
    in_channels: int = 1, num_classes: int = 10, width: float = 1.0, last: int = 1280
) -> nn.Module:
    """A MobileNetV2-style network for small images: depthwise-separable inverted
    residual blocks, a 1x1 head and global pooling (width 1.0: 1.67 M parameters and
    30.5 M multiply-accumulates on a 28x28 image)."""

    def scaled(c: int) -> int:  # channel counts stay multiples of 8, as MobileNet's do
        return max(8, int(c * width + 4) // 8 * 8)

    cin = scaled(64)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, cin, 3, 2, 1, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(),
    ]
    for expand, c, n, stride in MOBILENET_STAGES:
        for i in range(n):
            layers.append(InvertedResidual(cin, scaled(c), stride if i == 0 else 1, expand))
            cin = scaled(c)
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


@MODELS.register("tiny_conv")
def tiny_conv(in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> nn.Module:
    """A very small CNN for fast tests."""
    return conv(in_channels, num_classes, width=4, image_size=image_size, hidden=16)


def create_model(spec: ComponentSpec) -> nn.Module:
    """Build the model a space file names; raise SpaceError on any fault."""
    if spec.name is not None:
        fn = MODELS.get(spec.name, "model.name")
        where = "model.name"
    else:
        fn = load_callable(str(spec.factory), "model.factory")
        where = "model.factory"
    model = call_factory(fn, dict(spec.kwargs), where)
    if not isinstance(model, nn.Module):
        raise SpaceError(
            f"{where}: the factory must return a torch.nn.Module, "
            f"but returned {type(model).__name__}"
        )
    return model


def load_checkpoint(model: nn.Module, path: str | Path, where: str = "model.checkpoint") -> None:
    """Load a state_dict (never a pickle: weights_only=True) and check it fits the model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SpaceError(
            f"{where}: {str(path)!r} holds pickled Python objects (a whole module?), which are "
            "never loaded; save model.state_dict() instead"
        ) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpaceError(
            f"{where}: cannot read {str(path)!r} as a state_dict: {type(exc).__name__}: {first}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SpaceError(f"{where}: {str(path)!r} holds {type(state).__name__}, not a state_dict")
    problems = checkpoint_mismatch(model, state)
    if problems:
        raise SpaceError(f"{where}: {str(path)!r} does not match the model: {problems}")
    model.load_state_dict(state)


def checkpoint_mismatch(model: nn.Module, state: dict[str, Any]) -> str:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {_short(missing)}")
    if extra:
        parts.append(f"unexpected keys {_short(extra)}")
    if shapes:
        parts.append(f"shape mismatch (checkpoint vs model) {_short(shapes)}")
    return "; ".join(parts)


def _short(items: list[str], n: int = 4) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
