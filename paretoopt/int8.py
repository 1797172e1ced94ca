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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import TrialError
from .techniques.qtensor import QTensor

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
class LayerMapping:
    """How one layer's weight sits in the exported graph."""

    initializer: str
    axis: int  # the output-channel axis of the ONNX tensor (1 for a transposed MatMul weight)
    factor: np.ndarray  # per output channel: ONNX weight / PyTorch weight (BatchNorm folding)


def quantize_model(
    float_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    codes: dict[str, QTensor],
    float_layers: list[str],
) -> dict[str, bool]:
    """Write the int8 model; return, per layer in `codes`, whether it kept the exact codes.

    `codes` maps a weight's parameter name to its quantized codes; `float_layers` names the
    parameters that stay in float (16 or 32 bits under mixed precision).
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
    input_name = source.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {input_name: calibration[i : i + CALIBRATION_BATCH]}
                for i in range(0, len(calibration), CALIBRATION_BATCH)
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
    exact = {}
    for param, q in codes.items():
        mapping = _map_layer(param, q, weights)
        exact[param] = mapping is not None and _write_weight(model, q, mapping, weights)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    return exact


@contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice (pre-processing) to the root logger on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _map_layer(param: str, q: QTensor, weights: dict[str, np.ndarray]) -> LayerMapping | None:
    """Find the layer's weight among the initializers and the per-channel factor that
    BatchNorm folding put on it; None if the graph does not hold it recognisably."""
    ours = q.dequantize().numpy().astype(np.float64)
    theirs = weights.get(param)
    if theirs is None:
        return None
    if theirs.shape == ours.shape:
        axis = 0
    elif ours.ndim == 2 and theirs.shape == ours.T.shape:
        axis, theirs = 1, theirs.T
    else:
        return None
    a = ours.reshape(ours.shape[0], -1)
    b = theirs.reshape(theirs.shape[0], -1).astype(np.float64)
    norm = (a * a).sum(axis=1)
    factor = np.where(norm > 0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1.0), 1.0)
    error = np.abs(b - factor[:, None] * a).max()
    if error > 1e-4 * max(np.abs(b).max(), 1e-12):
        return None  # not a per-channel multiple of our weight: some other rewrite
    return LayerMapping(param, axis, factor)


def _write_weight(
    model: onnx.ModelProto,
    q: QTensor,
    mapping: LayerMapping,
    weights: dict[str, np.ndarray],
) -> bool:
    inits = {i.name: i for i in model.graph.initializer}
    name = mapping.initializer
    if f"{name}_quantized" not in inits:
        return False  # the quantizer left this layer in float
    channels = q.codes.shape[0]
    ints = (q.codes - q.zero_point.view((-1,) + (1,) * (q.codes.dim() - 1))).numpy()
    sign = np.where(mapping.factor < 0, -1, 1)
    ints = ints * sign.reshape((-1,) + (1,) * (ints.ndim - 1))
    if np.abs(ints).max(initial=0) > 127:
        raise TrialError(f"{name}: codes do not fit int8 (an 8-bit affine grid)")
    scale = np.broadcast_to(q.scale.numpy().astype(np.float64), (channels,)) * np.abs(
        mapping.factor
    )
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    stored = ints.T if mapping.axis == 1 else ints
    _replace(model, inits[f"{name}_quantized"], stored.astype(np.int8))
    _replace(model, inits[f"{name}_scale"], scale)
    _replace(model, inits[f"{name}_zero_point"], np.zeros(channels, np.int8))
    dq = _weight_dequantizer(model, f"{name}_quantized")
    if dq is None:
        return False
    _set_axis(dq, mapping.axis)
    _requantize_bias(model, dq.output[0], scale, weights, inits)
    return True


def _replace(model: onnx.ModelProto, old: onnx.TensorProto, value: np.ndarray) -> None:
    new = numpy_helper.from_array(value, old.name)
    old.CopyFrom(new)


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
        x_scale = numpy_helper.to_array(inits[input_dq.input[1]]).astype(np.float64)
        scale = (x_scale * weight_scale.astype(np.float64)).astype(np.float32)
        ints = np.round(bias.astype(np.float64) / scale).clip(-(2**31), 2**31 - 1)
        _replace(model, inits[bias_dq.input[0]], ints.astype(np.int32))
        _replace(model, inits[bias_dq.input[1]], scale)


def integer_initializers(path: Path) -> set[str]:
    """Initializers that feed an integer kernel once ONNX Runtime has optimized the graph:
    the honest answer to "did this layer run in int8?"."""
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
    return {i for n in graph.node if n.op_type in INTEGER_OPS for i in n.input}
