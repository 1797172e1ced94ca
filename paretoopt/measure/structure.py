"""A deployed model's structure: what its latency depends on, weights aside.

Two trials whose deployed graphs have the same operators, attributes, shapes and dtypes
run the same kernels on the same amounts of data, so they have one latency; their
measurements are samples of it and are pooled (see ``pooling``). Weight values (and
quantization scales) are left out: dense kernels do not look at them, and an int8
weight takes a byte whatever its bit-width. The weight *type* is kept (s8 and u8 weights
run different kernels).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
from torch import nn


def onnx_structure(path: Path) -> str:
    """The structure of an ONNX file: nodes (operator, domain, attributes, wiring),
    initializers and graph inputs/outputs by name, shape and dtype."""
    graph = onnx.load(str(path)).graph
    doc = {
        "nodes": [
            [n.op_type, n.domain, list(n.input), list(n.output), _attributes(n)] for n in graph.node
        ],
        "initializers": sorted([i.name, list(i.dims), i.data_type] for i in graph.initializer),
        "inputs": [_value_info(v) for v in graph.input],
        "outputs": [_value_info(v) for v in graph.output],
    }
    return digest(doc)


def module_structure(model: nn.Module) -> str:
    """The structure of a module that runs as it is (eager PyTorch, CUDA): its layers
    and every tensor's name, shape and dtype."""
    tensors = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    return digest({"modules": repr(model), "tensors": tensors})


def _attributes(node: onnx.NodeProto) -> list[Any]:
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:  # a Constant: its shape, not its values
            out.append([attr.name, list(attr.t.dims), attr.t.data_type])
        elif attr.type == onnx.AttributeProto.GRAPH:
            out.append([attr.name, attr.g.name])
        else:
            value = onnx.helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, list):
                value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
            out.append([attr.name, value])
    return out


def _value_info(v: onnx.ValueInfoProto) -> list[Any]:
    tensor = v.type.tensor_type
    dims = [d.dim_value or d.dim_param for d in tensor.shape.dim]
    return [v.name, tensor.elem_type, dims]


def digest(doc: dict[str, Any]) -> str:
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
