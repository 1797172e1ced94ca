"""The deployed model as an ONNX file, with a dynamic batch dimension.

``torch.onnx.export`` traces the model with torch.export every time, which cost 1.3 s
for the conv benchmark's model here, half of a whole trial. Yet the candidates of a
study share a few architectures: unstructured pruning and quantization change weights,
channel pruning changes only tensor shapes. So the exporter runs once per architecture,
without optimisation (the initializers are then exactly the state_dict), and each
candidate's weights are swapped into that graph before the same optimiser the exporter
runs (constant folding, which folds BatchNorm into the convolutions).

- Same shapes: the cached graph takes the new weights as they are (about 45 ms), into
  the same nodes and bit-identical initializers as a fresh export.
- Other shapes (channel pruning): the graph is kept in a shape-free form too. Shapes the
  tracer froze into it are taken out where their meaning is certain (a reshape that
  flattens everything after the batch dimension becomes ``Flatten``), and the result
  must reproduce the PyTorch model's outputs; anything else is traced afresh (0.6-1.1 s).

The trial checks the runtime's outputs against PyTorch's either way.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from paretoopt.workload import inputs as trees
from paretoopt.workload.inputs import Inputs

TEMPLATES = 32  # graphs kept per process and kind (a conv model's graph is about 1 MB)
PLAIN = (bool, int, float, str, tuple, type(None))  # attributes that may steer forward()
_templates: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()  # by architecture
_shapeless: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()  # by architecture less shapes


def export_onnx(model: nn.Module, example: Inputs, path: Path) -> None:
    """Write the model to `path` (atomically) as an optimised ONNX graph."""
    model = model.eval()
    state = model.state_dict()
    key = _architecture(model, state, example)
    if key is None:
        data = _optimised(onnx.ModelProto.FromString(_trace(model, example)))
    else:
        data = _from_cache(model, state, example, key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _from_cache(
    model: nn.Module, state: dict[str, torch.Tensor], example: Inputs, key: tuple[Any, ...]
) -> bytes:
    """The optimised graph from the cached template of this architecture, else from the
    shape-free one (if it reproduces the model), else from a fresh trace."""
    template = _recall(_templates, key)
    if template is not None:
        return _optimised(_with_weights(template, state))
    loose = _without_shapes(key)
    shapeless = _recall(_shapeless, loose)
    if shapeless is not None:
        proto = _with_weights(shapeless, state)
        data = _optimised(proto)
        if _reproduces(data, model, example):
            _keep(_templates, key, proto.SerializeToString())
            return data
    template = _trace(model, example)
    if _rebuildable(template, state):
        _keep(_templates, key, template)
        _keep(_shapeless, loose, _free_of_shapes(template))
    return _optimised(onnx.ModelProto.FromString(template))


def _recall(cache: OrderedDict[tuple[Any, ...], bytes], key: tuple[Any, ...]) -> bytes | None:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _keep(cache: OrderedDict[tuple[Any, ...], bytes], key: tuple[Any, ...], value: bytes) -> None:
    cache[key] = value
    if len(cache) > TEMPLATES:
        cache.popitem(last=False)


def _optimised(proto: onnx.ModelProto) -> bytes:
    from onnxscript import ir, optimizer

    graph = ir.serde.deserialize_model(proto)
    optimizer.optimize_ir(graph)
    return ir.serde.serialize_model(graph).SerializeToString()


def _architecture(
    model: nn.Module, state: dict[str, torch.Tensor], example: Inputs
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
    layout = trees.describe(example)
    inputs = tuple((i["name"], tuple(i["shape"]), i["dtype"]) for i in layout["inputs"])
    key = (tuple(modules), tensors, layout["kind"], inputs)
    try:
        hash(key)
    except TypeError:  # a tuple attribute holding a list
        return None
    return key


def _without_shapes(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """The architecture less what channel pruning changes: tensor sizes (ranks stay) and
    integer attributes (``in_channels``, ``num_features``). An integer that steered the
    graph in another way makes a graph that fails `_reproduces`, and is traced."""
    modules, tensors, kind, inputs = key
    loose_modules = tuple(
        (name, cls, qualname, tuple((k, v) for k, v in plain if type(v) is not int))
        for name, cls, qualname, plain in modules
    )
    loose_tensors = tuple((k, len(s), d) for k, s, d in tensors)
    return (loose_modules, loose_tensors, kind, inputs)


def _trace(model: nn.Module, example: Inputs) -> bytes:
    """The unoptimised graph, its initializers named after the state_dict, traced on two
    samples: torch.export takes a dimension of size 1 for a constant, and a model whose
    code branches on it (``nn.MultiheadAttention`` does) was exported for batch 1 only."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if trees.count(example) == 1:
        example = trees.cat([example, _another(example)])
    args, kwargs, shapes = trees.for_export(example)
    registry = _onnx_registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if registry is not None:
            from torch.onnx._internal.exporter import _core

            program = _core.export(
                model, args, kwargs, registry=registry, dynamic_shapes=shapes,
                optimize=False, verbose=False,
            )  # fmt: skip
        else:
            program = torch.onnx.export(
                model, args, kwargs=kwargs, dynamo=True, verbose=False, optimize=False,
                dynamic_shapes=shapes,
            )  # fmt: skip
    proto = program.model_proto
    for value in proto.graph.input:
        dims = _dims(value)
        if dims and isinstance(dims[0], int):
            raise ValueError(
                f"the model cannot be exported with a free batch dimension (torch.export "
                f"fixed input {value.name!r} at {dims[0]}): its forward pass must not "
                "depend on the batch size"
            )
    return proto.SerializeToString()


def _another(example: Inputs) -> Inputs:
    """Second inputs like `example`, the same in every process: random values of each
    one's type, or, for token ids, masks and the like, a draw from its own values."""
    generator = torch.Generator().manual_seed(0)

    def like(value: torch.Tensor) -> torch.Tensor:
        if value.is_floating_point():
            return torch.randn(value.shape, generator=generator, dtype=value.dtype)
        values = value.flatten()
        return values[torch.randint(len(values), value.shape, generator=generator)]

    return trees.tree_map(like, example)


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


def _free_of_shapes(template: bytes) -> bytes:
    """The template with the sizes the tracer froze taken out where their meaning is
    certain. ``x.flatten(1)`` is traced as a Reshape to (batch, C*H*W) with C*H*W a
    constant; it becomes ``Flatten(axis=1)``, right for any C, H and W. The recorded
    intermediate shapes go too: the optimiser infers them again."""
    proto = onnx.ModelProto.FromString(template)
    graph = proto.graph
    shapes = {v.name: _dims(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    for i, node in enumerate(graph.node):
        if node.op_type == "Reshape" and _flattens(
            shapes.get(node.input[0]), shapes.get(node.output[0])
        ):
            flatten = helper.make_node("Flatten", [node.input[0]], list(node.output), axis=1)
            graph.node[i].CopyFrom(flatten)
    del graph.value_info[:]
    return proto.SerializeToString()


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _flattens(source: list[int | str] | None, result: list[int | str] | None) -> bool:
    """(b, d1, ..., dk) -> (b, d1*...*dk), every d known: a flatten after the batch."""
    if source is None or result is None or len(source) < 2 or len(result) != 2:
        return False
    rest = source[1:]
    return (
        result[0] == source[0]
        and all(isinstance(d, int) and d > 0 for d in rest)
        and result[1] == math.prod(rest)  # type: ignore[arg-type]
    )


def _reproduces(data: bytes, model: nn.Module, example: Inputs) -> bool:
    """Does the graph compute what the model computes, on two inputs at once (the batch
    dimension stays free)? A graph built from a shape-free template must, or it is
    traced afresh."""
    import onnxruntime as ort

    x = trees.cat([example, _another(example)])
    with torch.no_grad():
        output = trees.call(model, x)
    if not isinstance(output, torch.Tensor):  # several outputs: not checked here, traced
        return False
    expected = output.numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed load is an answer here, not an error
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, trees.feeds(names, trees.numpy(x)))[0]
    except Exception:  # noqa: BLE001 - any failure to load or run means "trace it"
        return False
    scale = float(np.abs(expected).max()) or 1.0
    return got.shape == expected.shape and bool(
        np.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)
    )


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
