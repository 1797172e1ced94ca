"""The deployed model as an ONNX file, with a dynamic batch dimension.

``torch.onnx.export`` traces the model with torch.export every time, which cost 1.3 s
for the conv benchmark's model here, half of a whole trial. Yet most candidates of a
study share an architecture: unstructured pruning and quantization change weights, not
shapes. So the model is exported once per architecture without optimisation (its
initializers are then exactly its state_dict), and each candidate's weights are swapped
into that graph before the same optimiser the exporter runs (constant folding, which
folds BatchNorm into the convolutions). A cached architecture exports in about 45 ms,
into the same nodes and bit-identical initializers as a fresh export; the trial checks
the runtime's outputs against PyTorch's either way.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn

TEMPLATES = 32  # architectures kept per process (a conv model's graph is about 1 MB)
PLAIN = (bool, int, float, str, tuple, type(None))  # attributes that may steer forward()
_templates: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write the model to `path` (atomically) as an optimised ONNX graph."""
    from onnxscript import ir, optimizer

    model = model.eval()
    state = model.state_dict()
    key = _architecture(model, state, example)
    template = _templates.get(key) if key is not None else None
    if template is None:
        template = _trace(model, example)
        if key is not None and _rebuildable(template, state):
            _templates[key] = template
            if len(_templates) > TEMPLATES:
                _templates.popitem(last=False)
    else:
        _templates.move_to_end(key)
    graph = ir.serde.deserialize_model(_with_weights(template, state))
    optimizer.optimize_ir(graph)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(ir.serde.serialize_model(graph), tmp)
    tmp.replace(path)


def _architecture(
    model: nn.Module, state: dict[str, torch.Tensor], example: torch.Tensor
) -> tuple[Any, ...] | None:
    """What the traced graph depends on: every module's class (the class object itself:
    a class redefined later is another one) and plain attributes (``num_heads`` is not
    printed by every module), every tensor's name, shape and type, and the input's. None
    where hooks could change the forward pass unseen: such a model is traced each time."""
    modules = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        plain = tuple(
            sorted(
                (k, v)
                for k, v in vars(module).items()
                if isinstance(v, PLAIN) and not k.startswith("_")
            )
        )
        modules.append((name, id(type(module)), type(module).__qualname__, plain))
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in state.items())
    key = (tuple(modules), tensors, tuple(example.shape[1:]), example.dtype)
    try:
        hash(key)
    except TypeError:  # a tuple attribute holding a list
        return None
    return key


def _trace(model: nn.Module, example: torch.Tensor) -> bytes:
    """The unoptimised graph, its initializers named after the state_dict."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    shapes = ({0: torch.export.Dim("batch", min=1, max=65_536)},)
    registry = _onnx_registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if registry is not None:
            from torch.onnx._internal.exporter import _core

            program = _core.export(
                model, (example,), registry=registry, dynamic_shapes=shapes,
                optimize=False, verbose=False,
            )  # fmt: skip
        else:
            program = torch.onnx.export(
                model, (example,), dynamo=True, verbose=False, optimize=False,
                dynamic_shapes=shapes,
            )  # fmt: skip
    return program.model_proto.SerializeToString()


def _rebuildable(template: bytes, state: dict[str, torch.Tensor]) -> bool:
    """Every initializer is a state_dict tensor, so another model's weights can replace
    them all (a constant computed while tracing could not be replaced)."""
    graph = onnx.ModelProto.FromString(template).graph
    return all(init.name in state for init in graph.initializer)


def _with_weights(template: bytes, state: dict[str, torch.Tensor]) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(template)
    for init in proto.graph.initializer:
        if init.name in state:
            value = state[init.name].detach().cpu().numpy()
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return proto


@functools.cache
def _onnx_registry() -> Any:
    """The exporter's table of ATen-to-ONNX functions. ``torch.onnx.export`` rebuilds it
    on every call, which took 0.9 s of each export here; it depends only on the opset,
    so it is built once per process. Where torch's internal exporter API differs (other
    versions), the public call is used."""
    try:
        from torch.onnx._internal.exporter import _core, _registration

        if "registry" not in inspect.signature(_core.export).parameters:
            return None
        return _registration.ONNXRegistry.from_torchlib()
    except (ImportError, AttributeError, TypeError):
        return None
