"""A model's inputs: one tensor, a tuple of tensors (``forward(ids, mask)``) or a dict of
named tensors (``forward(input_ids=..., attention_mask=...)``), batched along the first
dimension of each.

Everything that feeds a model (training, evaluation, export, calibration, timing, the
agent) goes through these few functions, so a second input is never dropped on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")
U = TypeVar("U")
# one of: a value, a tuple of values, a dict of named values (tensors or numpy arrays)
Tree = Any
Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
TYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def tree_map(fn: Callable[[Any], Any], x: Tree) -> Tree:
    """`fn` applied to every tensor of the inputs, keeping their structure."""
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(fn(v) for v in x)
    return fn(x)


def leaves(x: Tree) -> list[Any]:
    if isinstance(x, dict):
        return list(x.values())
    return list(x) if isinstance(x, (tuple, list)) else [x]


def call(model: nn.Module | Callable[..., Any], x: Tree) -> Any:
    """The forward pass on batched inputs: model(x), model(*x) or model(**x)."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def as_args(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of the forward pass (for torch.export)."""
    if isinstance(x, dict):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def count(x: Tree) -> int:
    """The batch size: the first dimension, the same for every input."""
    return int(leaves(x)[0].shape[0])


def take(x: Tree, index: Any) -> Tree:
    """The samples at `index` (a slice or an index tensor) of every input."""
    return tree_map(lambda v: v[index], x)


def cat(parts: Sequence[Tree]) -> Tree:
    """Batches joined along the batch dimension."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(list(parts))


def numpy(x: Tree) -> Tree:
    return tree_map(lambda v: v.detach().cpu().numpy(), x)


def nbytes(x: Tree) -> int:
    return sum(v.numel() * v.element_size() for v in leaves(x))


def describe(x: Inputs) -> dict[str, Any]:
    """The inputs' layout, without a batch dimension: how they are passed ("tensor",
    "tuple" or "dict"), and each one's name, shape and type. Stored in the compressed
    file and the study, so a model can be rebuilt and exported without the data."""
    kind = "dict" if isinstance(x, dict) else "tuple" if isinstance(x, (tuple, list)) else "tensor"
    names = list(x) if isinstance(x, dict) else [str(i) for i in range(len(leaves(x)))]
    return {
        "kind": kind,
        "inputs": [
            {"name": n, "shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
            for n, v in zip(names, leaves(x), strict=True)
        ],
    }


def zeros(layout: dict[str, Any], batch: int = 1) -> Inputs:
    """Inputs of zeros in a described layout (zero is a valid id of every vocabulary)."""
    values = [
        torch.zeros(batch, *spec["shape"], dtype=TYPES[spec["dtype"]]) for spec in layout["inputs"]
    ]
    if layout["kind"] == "dict":
        return {spec["name"]: v for spec, v in zip(layout["inputs"], values, strict=True)}
    return tuple(values) if layout["kind"] == "tuple" else values[0]


def single(shape: Sequence[int], dtype: str = "float32") -> dict[str, Any]:
    """The layout of one input tensor (files written before layouts were stored)."""
    return {"kind": "tensor", "inputs": [{"name": "0", "shape": list(shape), "dtype": dtype}]}


def feeds(names: Sequence[str], x: Tree) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed: inputs matched to the graph's input names, by name for a
    dict, in order otherwise."""
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ValueError(f"the model takes inputs {list(names)}, but {missing} are missing")
        return {n: np.asarray(x[n]) for n in names}
    values = leaves(x)
    if len(values) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs ({list(names)}), got {len(values)}")
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def for_export(x: Inputs, max_batch: int = 65_536) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """torch.export's positional and keyword arguments, and their dynamic shapes: the
    batch dimension free up to `max_batch` (the same one for every input), every other
    fixed."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    args, kwargs = as_args(x)
    if kwargs:
        return args, kwargs, {name: {0: batch} for name in kwargs}
    return args, kwargs, tuple({0: batch} for _ in args)


def describe_inputs(layout: dict[str, Any]) -> str:
    """The inputs in words, for messages: "of shape [1, 8, 8]", or each input's name,
    shape and type."""
    specs = layout["inputs"]
    if layout["kind"] == "tensor":
        kind = "" if specs[0]["dtype"] == "float32" else f" ({specs[0]['dtype']})"
        return f"of shape {specs[0]['shape']}{kind}"
    return "(" + ", ".join(f"{s['name']}: {s['dtype']} {s['shape']}" for s in specs) + ")"
