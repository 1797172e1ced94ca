"""Datasets: the built-in digits benchmark and user dataset factories.

Every dataset ends up as three in-memory splits of tensors (inputs, labels). The splits
are small enough on the benchmarks to hold in memory, and a tensor split makes training,
calibration and evaluation free of DataLoader overhead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from paretoopt.config.space import ComponentSpec
from paretoopt.errors import SpaceError, shown
from paretoopt.workload.registry import Registry, call_factory, load_callable

DATASETS: Registry[Any] = Registry("dataset")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch_indices(
        self,
        size: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Index tensors of mini-batches; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, size):
            yield (
                order[start : start + size]
                if order is not None
                else torch.arange(start, min(start + size, n))
            )


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


@DATASETS.register("digits")
def digits(size: int = 16, seed: int = 0) -> tuple[Any, Any, Any]:
    """scikit-learn's bundled 8x8 digits, resized to size x size, split 70/15/15 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.3, stratify=y.numpy(), random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y.numpy()[rest], random_state=seed)
    return tuple(torch.utils.data.TensorDataset(x[i], y[i]) for i in (train, val, test))


def create_data(spec: ComponentSpec) -> Splits:
    """Build and materialise the dataset a space file names; raise SpaceError on faults."""
    if spec.name is not None:
        fn, where = DATASETS.get(spec.name, "data.name"), "data.name"
    else:
        fn, where = load_callable(str(spec.factory), "data.factory"), "data.factory"
    out = call_factory(fn, dict(spec.kwargs), where)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise SpaceError(
            f"{where}: the factory must return (train, val, test) datasets, "
            f"but returned {type(out).__name__}"
        )
    names = ("train", "val", "test")
    splits = [_materialise(ds, f"{where} ({n} split)") for ds, n in zip(out, names, strict=True)]
    shapes = {tuple(s.x.shape[1:]) for s in splits}
    if len(shapes) != 1:
        raise SpaceError(f"{where}: the splits have different input shapes {sorted(shapes)}")
    return Splits(*splits)


def _materialise(dataset: Any, where: str) -> Split:
    try:
        n = len(dataset)
    except TypeError:
        raise SpaceError(
            f"{where}: expected a map-style Dataset with len(), got {type(dataset).__name__}"
        ) from None
    if n == 0:
        raise SpaceError(f"{where}: the split is empty")
    xs, ys = [], []
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as exc:
            raise SpaceError(
                f"{where}: reading item {i} failed: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise SpaceError(f"{where}: item {i} must be (input, label), got {type(item).__name__}")
        try:
            xs.append(_input(item[0]))
            ys.append(_label(item[1], f"{where}: item {i}"))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpaceError(
                f"{where}: item {i} is not (tensor-like input, integer label): {exc}"
            ) from None
    try:
        x = torch.stack(xs)
    except RuntimeError as exc:
        raise SpaceError(f"{where}: inputs do not share one shape: {exc}") from None
    # unchecked, training would report it as "fine-tuning diverged"
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if x.is_floating_point() and not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise SpaceError(f"{where}: item {bad}'s input holds NaN or infinity")
    return Split(x.contiguous(), torch.tensor(ys, dtype=torch.long))


def _input(raw: Any) -> torch.Tensor:
    """An input as a tensor of the type the model takes: real values as float32 (the
    dtype of every weight), integers (token ids, indices) as int64, flags as bool. An
    embedding refuses float ids, and a float id of 2**24 + 1 would not even survive."""
    value = torch.as_tensor(raw)
    if value.is_complex():
        raise TypeError(f"a complex input ({value.dtype}) is not supported")
    if value.is_floating_point():
        return value.to(torch.float32)
    return value if value.dtype == torch.bool else value.to(torch.int64)


def _label(raw: Any, where: str) -> int:
    """A class index: an integer >= 0 (a float label was truncated, a negative one made
    training fail with an IndexError)."""
    value = raw.item() if hasattr(raw, "item") else raw  # a 0-d tensor or numpy scalar
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{where}: the label must be an integer class index, got {shown(raw)}")
    if isinstance(value, float) and not value.is_integer():
        raise SpaceError(f"{where}: the label {value!r} is not an integer class index")
    if value < 0:
        raise SpaceError(f"{where}: the label {int(value)} is negative; classes are 0, 1, ...")
    return int(value)
