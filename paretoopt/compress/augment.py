"""Training-time augmentation of a batch: the user's own transform (``data.transform``),
then mixup or cutmix (``space.finetune.mixup``, ``cutmix``: the Beta parameter, 0 = off).

Mixup (Zhang et al. 2018) blends each sample with a partner from the same batch by a
weight lam ~ Beta(a, a), labels alike; cutmix (Yun et al. 2019) pastes a box of the
partner (a segment of a 1-D signal) and weights the labels by the box's area. With both
on, each batch takes one of them at random, as timm does. The teacher of distillation
sees the mixed inputs (its logits looked up for the unmixed ones would teach the wrong
sample)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from paretoopt.workload import inputs as trees
from paretoopt.workload.inputs import Inputs


@dataclass(frozen=True)
class Augment:
    mixup: float = 0.0
    cutmix: float = 0.0
    transform: Callable[[Inputs], Inputs] | None = None  # the user's, on training batches


@dataclass(frozen=True)
class Batch:
    """A training batch as the model sees it: the loss is lam x CE(labels) +
    (1 - lam) x CE(partners)."""

    x: Inputs
    labels: torch.Tensor
    partners: torch.Tensor | None = None  # labels of the samples mixed in
    lam: float = 1.0
    changed: bool = False  # inputs differ from the split's (no precomputed teacher)


def augment(x: Inputs, y: torch.Tensor, aug: Augment, rng: np.random.Generator) -> Batch:
    """The batch after the user's transform and mixup or cutmix; `rng` (seeded by the
    trial) draws the kind, the weight, the partners and the box."""
    changed = aug.transform is not None
    if aug.transform is not None:
        x = aug.transform(x)
    kinds = [k for k in ("mixup", "cutmix") if getattr(aug, k) > 0]
    if not kinds or trees.count(x) < 2:
        return Batch(x, y, changed=changed)
    kind = kinds[int(rng.integers(len(kinds)))]
    a = float(getattr(aug, kind))
    lam = float(rng.beta(a, a))
    order = torch.from_numpy(rng.permutation(trees.count(x)))
    if kind == "mixup":
        mixed = trees.tree_map(lambda v: lam * v + (1.0 - lam) * v[order], x)
        return Batch(mixed, y, y[order], lam, True)
    assert isinstance(x, torch.Tensor)  # checked at start: one input with spatial dims
    cut, lam = _box(x, lam, rng)
    mixed = x.clone()
    mixed[cut] = x[order][cut]
    return Batch(mixed, y, y[order], lam, True)


def _box(x: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[tuple[slice, ...], float]:
    """A random box over the spatial dimensions (all after batch and channel) holding a
    share 1 - lam of them, and the share of the batch's own pixels that stays."""
    spatial = x.shape[2:]
    side = (1.0 - lam) ** (1.0 / len(spatial))
    box = []
    for size in spatial:
        length = int(round(size * side))
        centre = int(rng.integers(size))
        start, stop = max(centre - length // 2, 0), min(centre + (length + 1) // 2, size)
        box.append(slice(start, stop))
    kept = 1.0 - math.prod(s.stop - s.start for s in box) / math.prod(spatial)
    return (slice(None), slice(None), *box), kept


def mixable(layout: dict[str, object], kind: str) -> str | None:
    """Why `kind` cannot augment inputs of this layout, or None: mixup blends real
    values; cutmix cuts along spatial dimensions of one input."""
    specs = layout["inputs"]  # type: ignore[index]
    ints = [s for s in specs if s["dtype"] != "float32"]  # type: ignore[index]
    if ints:
        return f"it blends real values, and the input {ints[0]['name']} is {ints[0]['dtype']}"
    one = layout["kind"] == "tensor" and len(specs[0]["shape"]) >= 2  # type: ignore[index]
    if kind == "cutmix" and not one:
        return "it cuts a box from one input of channels and at least one spatial dimension"
    return None
