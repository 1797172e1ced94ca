"""The int8 runtime model: static QDQ quantization that keeps the plan's exact weights.

ONNX Runtime's quantizer inserts QuantizeLinear/DequantizeLinear pairs around every
quantizable operator, calibrates the activation ranges (min-max over training samples),
and the runtime then fuses each ``DQ -> Conv -> Q`` pattern into an int8 kernel
(QLinearConv, QGemm). Left alone it would also re-round the weights to its own 8-bit grid,
which is not the grid the plan chose: a 4-bit weight would come out as some other 8-bit
weight, and the model measured would not be the model in the compressed file.

So after calibration every weight is overwritten with the plan's own codes, widened to
int8 (symmetric codes of any width fit, and affine codes of up to 7 bits once their zero
point is subtracted), with the plan's scale times the BatchNorm factor that the exporter
folded into the convolution. The int32 bias, whose scale int8 kernels take to be
input_scale x weight_scale, is requantized to match. The deployed weights then equal the
trial's weights exactly; only the activations are rounded, and the trial measures what
that costs (the gap between the PyTorch model and the runtime model).

Each weight is stored as s8 (zero point 0) or, where the CPU's u8s8 kernels would
saturate on its codes, as u8 around a zero point of 128: the same codes either way (see
``isa``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from paretoopt.compress.techniques.qtensor import QTensor
from paretoopt.errors import TrialError
from paretoopt.measure.isa import Int8Recipe
from paretoopt.workload import inputs as trees

# fused operators that compute in integers (what ORT's CPU graph optimizer produces)
INTEGER_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
    }
)
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Int8Weight:
    """One layer's weight as the int8 graph will hold it."""

    ints: np.ndarray  # int8 codes in the ONNX tensor's own layout
    scale: np.ndarray  # float32, one per output channel
    axis: int  # the output-channel axis of the ONNX tensor (1 for a transposed MatMul weight)


def quantize_model(
    float_path: Path,
    out_path: Path,
    calibration: Any,
    codes: dict[str, QTensor],
    float_layers: list[str],
    recipe: Int8Recipe,
) -> dict[str, str | None]:
    """Write the int8 model; return, per layer in `codes`, the type its exact codes were
    stored in ("s8", "u8"), or None where the quantizer's own weight stayed.

    `codes` maps a weight's parameter name to its quantized codes; `float_layers` names the
    parameters that stay in float (16 or 32 bits under mixed precision); `recipe` says
    which layers take u8 weights on the CPU that runs the model.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    source = onnx.load(str(float_path))
    weights = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    names = [i.name for i in source.graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                trees.feeds(names, trees.take(calibration, slice(i, i + CALIBRATION_BATCH)))
                for i in range(0, trees.count(calibration), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    excluded = [n.name for n in source.graph.node if set(n.input) & set(float_layers)]
    staging = out_path.with_name(out_path.name + ".staging")
    with _quiet():
        quantize_static(
            str(float_path),
            str(staging),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    model = onnx.load(str(staging))
    staging.unlink()
    exact: dict[str, str | None] = {}
    for param, q in codes.items():
        weight = int8_weight(q, weights.get(param))
        kind = recipe.weight_type(int(np.abs(weight.ints).max(initial=0))) if weight else None
        written = kind is not None and _write_weight(model, param, weight, weights, kind)
        exact[param] = kind if written else None
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    return exact


@contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice (pre-processing) to the root logger on every call.
    (A process-wide setting: trials run one at a time in a process.)"""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def int8_weight(q: QTensor, theirs: np.ndarray | None) -> Int8Weight | None:
    """The plan's codes laid out as the exported tensor `theirs`, which may be transposed
    and scaled per output channel by a folded BatchNorm; None unless the result, decoded,
    reproduces `theirs` (so a layer is never called exact on faith)."""
    if theirs is None:
        return None
    codes = q.codes - q.zero_point.view((-1,) + (1,) * (q.codes.dim() - 1))
    ints = codes.numpy().reshape(codes.shape[0], -1).astype(np.int64)
    scale = np.broadcast_to(q.scale.numpy().astype(np.float64), (ints.shape[0],))
    layouts = [(0, theirs)] if theirs.shape == tuple(codes.shape) else []
    if codes.dim() == 2 and theirs.shape == tuple(codes.shape)[::-1]:
        layouts.append((1, theirs.T))  # a square Linear weight may be either way round
    for axis, target in layouts:
        b = target.reshape(ints.shape[0], -1).astype(np.float64)
        a = ints * scale[:, None]
        norm = (a * a).sum(axis=1)
        factor = (a * b).sum(axis=1) / np.where(norm > 0, norm, 1.0)  # BatchNorm's gamma/std
        signed = ints * np.where(factor < 0, -1, 1)[:, None] * (factor != 0)[:, None]
        step = np.where(scale * np.abs(factor) > 0, scale * np.abs(factor), 1.0).astype(np.float32)
        if np.abs(signed).max(initial=0) > 127:
            return None  # an 8-bit affine grid: its codes do not fit int8
        decoded = signed * step[:, None].astype(np.float64)
        if np.abs(decoded - b).max(initial=0) <= 1e-5 * max(np.abs(b).max(initial=0), 1e-12):
            shaped = signed.reshape(tuple(codes.shape)).astype(np.int8)
            return Int8Weight(shaped.T if axis == 1 else shaped, step, axis)
    return None


def _write_weight(
    model: onnx.ModelProto,
    param: str,
    weight: Int8Weight,
    weights: dict[str, np.ndarray],
    kind: str,
) -> bool:
    """Put the weight in the graph in place of the quantizer's, as `kind` ("s8", or "u8"
    shifted by 128); False (and the graph untouched) where the quantizer left the layer
    in float."""
    inits = {i.name: i for i in model.graph.initializer}
    names = [f"{param}_quantized", f"{param}_scale", f"{param}_zero_point"]
    dq = _weight_dequantizer(model, names[0])
    if dq is None or not all(n in inits for n in names):
        return False
    ints, zero = weight.ints, np.zeros(len(weight.scale), np.int8)
    if kind == "u8":  # the same codes, around 128: kernels that never saturate take them
        ints = (ints.astype(np.int16) + 128).astype(np.uint8)
        zero = np.full(len(weight.scale), 128, np.uint8)
    _replace(inits[names[0]], ints)
    _replace(inits[names[1]], weight.scale)
    _replace(inits[names[2]], zero)
    _set_axis(dq, weight.axis)
    _requantize_bias(model, dq.output[0], weight.scale, weights, inits)
    return True


def _replace(old: onnx.TensorProto, value: np.ndarray) -> None:
    old.CopyFrom(numpy_helper.from_array(value, old.name))


def _weight_dequantizer(model: onnx.ModelProto, quantized: str) -> onnx.NodeProto | None:
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == quantized:
            return node
    return None


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for attr in node.attribute:
        if attr.name == "axis":
            attr.i = axis
            return
    node.attribute.append(onnx.helper.make_attribute("axis", axis))


def _requantize_bias(
    model: onnx.ModelProto,
    weight_output: str,
    weight_scale: np.ndarray,
    weights: dict[str, np.ndarray],
    inits: dict[str, onnx.TensorProto],
) -> None:
    """The int32 bias of the consumer of `weight_output`, on input_scale x weight_scale."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if len(node.input) < 3 or node.input[1] != weight_output:
            continue
        bias_dq, input_dq = producers.get(node.input[2]), producers.get(node.input[0])
        if bias_dq is None or input_dq is None or input_dq.op_type != "DequantizeLinear":
            continue
        bias = weights.get(node.input[2])
        if bias is None or bias_dq.op_type != "DequantizeLinear":
            continue
        if input_dq.input[1] not in inits or bias_dq.input[0] not in inits:
            raise TrialError(f"{node.name}: the int8 graph has no constant scale for its bias")
        x_scale = numpy_helper.to_array(inits[input_dq.input[1]]).astype(np.float64)
        scale = (x_scale * weight_scale.astype(np.float64)).astype(np.float32)
        ints = np.round(bias.astype(np.float64) / scale)
        if np.abs(ints).max(initial=0) >= 2**31:
            raise TrialError(f"{node.name}: the bias does not fit int32 on its int8 scale")
        _replace(inits[bias_dq.input[0]], ints.astype(np.int32))
        _replace(inits[bias_dq.input[1]], scale)


def integer_initializers(path: Path) -> set[str]:
    """Constant inputs (weights) of integer kernels once ONNX Runtime has optimized the
    graph: the honest answer to "did this layer run in int8?"."""
    import onnxruntime as ort

    optimized = path.with_name(path.name + ".optimized")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized)).graph
    finally:
        optimized.unlink(missing_ok=True)
    constants = {i.name for i in graph.initializer}
    return {i for n in graph.node if n.op_type in INTEGER_OPS for i in n.input if i in constants}
