"""ONNX Runtime (CPU): the deployed model is an ONNX file, float or int8 QDQ.

A float model is exported once per architecture (see ``onnx_export``). An int8 plan is
exported in float, calibrated and converted to QDQ with the plan's own weight codes (see
``int8``); ORT's CPU graph optimizer then fuses it into integer kernels, and which layers
it fused is read back from the optimized graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from paretoopt.compress.techniques.bench import prunable_layers
from paretoopt.measure.backends.base import Deployment, DeployRequest
from paretoopt.measure.int8 import integer_initializers, quantize_model
from paretoopt.measure.onnx_export import export_onnx
from paretoopt.measure.structure import onnx_structure
from paretoopt.workload.inputs import Inputs, feeds, numpy

if TYPE_CHECKING:
    from torch import nn

    from paretoopt.config.space import TargetSpec
    from paretoopt.measure.protocol import Runner

ONNX_FILE = "model.onnx"  # the file this runtime loads, times, and export hands over
FLOAT_FILE = "model.float.onnx"  # the float graph an int8 model is made from (not kept)


def write_qdq(request: DeployRequest, example: Inputs, out: Path) -> dict[str, str | None]:
    """An int8 plan as a QDQ ONNX file at `out`: exported in float, calibrated, the plan's
    own codes written in (see ``int8``); returns each layer's weight type, or None where
    it holds re-rounded codes. ONNX Runtime times this file, OpenVINO converts it."""
    model, quant, work = request.model, request.quant, request.work
    request.timed("export", export_onnx, model, example, work / FLOAT_FILE)
    floats = [f"{n}.weight" for n in prunable_layers(model) if quant.layer(n) > 8]
    if request.calibration is None or request.int8 is None:
        raise ValueError("an int8 deployment needs calibration samples and a recipe")
    types = request.timed(
        "calibrate",
        quantize_model,
        work / FLOAT_FILE,
        out,
        numpy(request.calibration),
        dict(request.codes),
        floats,
        request.int8,
    )
    (work / FLOAT_FILE).unlink()
    return types


class OrtRunner:
    name = "onnxruntime"
    mode = "cpu"

    def __init__(self, model: Path | bytes, threads: int) -> None:
        """`model`: an ONNX file, or its bytes. The bytes are kept, so that fresh
        sessions can be made after the file is gone (the baseline's is a temporary)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.model = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.threads = threads
        self.session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: Any) -> np.ndarray:
        """Logits of a batch: an array, or a tuple or dict of arrays (several inputs)."""
        return self.session.run(None, feeds(self.inputs, x))[0]

    def fresh(self) -> OrtRunner:
        return OrtRunner(self.model, self.threads)

    def timer(self, batch: Any) -> Callable[[], Any]:
        feed = feeds(self.inputs, batch)
        return lambda: self.session.run(None, feed)[0]

    def peak_memory(self, batch: np.ndarray) -> int | None:
        return None  # ONNX Runtime's CPU provider does not report its allocations


class OnnxRuntimeBackend:
    name = "onnxruntime"
    file: str | None = ONNX_FILE
    files: tuple[str, ...] = (ONNX_FILE,)

    def __init__(self, threads: int, example: Inputs) -> None:
        self.threads = threads
        self.example = example  # one input, for export

    @classmethod
    def from_spec(cls, spec: TargetSpec, example: Inputs) -> OnnxRuntimeBackend:
        return cls(spec.threads, example)

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        export_onnx(model, self.example, work / ONNX_FILE)
        return OrtRunner(work / ONNX_FILE, self.threads)

    def deploy(self, request: DeployRequest) -> Deployment:
        work, quant = request.work, request.quant
        if quant.activations != "int8":
            runner = request.timed("export", self._export, request)
            return Deployment(runner, work / ONNX_FILE)
        types = write_qdq(request, self.example, work / ONNX_FILE)
        return Deployment(OrtRunner(work / ONNX_FILE, self.threads), work / ONNX_FILE, types)

    def _export(self, request: DeployRequest) -> Runner:
        return self.runner(request.model, request.work)

    def reload(self, directory: Path, build: Callable[[], nn.Module]) -> Runner:
        return OrtRunner(directory / ONNX_FILE, self.threads)  # exactly the file it timed

    def integer_weights(self, deployment: Deployment) -> set[str]:
        if not deployment.exact or deployment.file is None:  # a float graph: no int kernels
            return set()
        suffix = "_quantized"
        found = integer_initializers(deployment.file)
        return {n.removesuffix(suffix) for n in found if n.endswith(suffix)}

    def structure(self, deployment: Deployment) -> str | None:
        return onnx_structure(deployment.file) if deployment.file else None

    def version(self) -> str:
        import onnxruntime as ort

        return str(ort.__version__)
