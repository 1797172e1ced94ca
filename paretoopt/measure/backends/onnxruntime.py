"""ONNX Runtime (CPU): the deployed model is an ONNX file, float or int8 QDQ.

A float model is exported once per architecture (see ``onnx_export``). An int8 plan is
exported in float, calibrated and converted to QDQ with the plan's own weight codes (see
``int8``); ORT's CPU graph optimizer then fuses it into integer kernels, and which layers
it fused is read back from the optimized graph.

An agent serving this runtime takes the ONNX file as it is (``OnnxFormat``) and refuses
anything but a self-contained model in the standard and ONNX Runtime operator domains
that ONNX Runtime loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from paretoopt.compress.techniques.bench import prunable_layers
from paretoopt.measure.backends.base import (
    Deployment,
    DeployRequest,
    InputSpec,
    Kernels,
    Refused,
)
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
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})  # on an agent


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


# --------------------------------------------------------------------------- on an agent


class OnnxFormat:
    """An ONNX file as an agent takes it: the file's bytes, unchanged."""

    runtime = "onnxruntime"

    def pack(self, file: Path) -> bytes:
        return file.read_bytes()

    def check(self, body: bytes) -> Kernels | None:
        check_onnx(body)
        return None  # the graph's fusions do not depend on the machine: the file says

    def load(self, body: bytes, threads: int) -> Runner:
        return OrtRunner(body, threads)

    def inputs(self, runner: Runner) -> list[InputSpec]:
        assert isinstance(runner, OrtRunner)
        out = []
        for value in runner.session.get_inputs():
            dims = tuple(d if isinstance(d, int) and d > 0 else 0 for d in value.shape[1:])
            out.append(InputSpec(value.name, ONNX_INPUTS.get(value.type, "?"), dims))
        return out

    def version(self) -> str:
        import onnxruntime as ort

        return str(ort.__version__)


ONNX_INPUTS = {
    "tensor(float)": "float32",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def check_onnx(body: bytes) -> None:
    """Raise Refused unless `body` is a self-contained ONNX model ONNX Runtime can load."""
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load_model_from_string(body)
    except Exception:
        raise Refused("not a valid ONNX model: cannot parse") from None
    # before anything reads the model further: external data would name files here
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model)):
        raise Refused("tensors stored outside the file are refused")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise Refused(f"not a valid ONNX model: {exc}") from None
    nodes = [n for g in _graphs(model) for n in g.node]
    domains = {op.domain for op in model.opset_import} | {n.domain for n in nodes}
    foreign = sorted(domains - ALLOWED_DOMAINS)
    if foreign:
        raise Refused(f"operators from unsupported domains {foreign}")
    try:
        ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Refused(f"ONNX Runtime cannot load it: {exc}") from None


def _graphs(model: Any) -> list[Any]:
    """The main graph and every subgraph (If/Loop/Scan bodies), at any depth."""
    import onnx

    out, todo = [], [model.graph]
    nodes = [n for f in model.functions for n in f.node]  # a function's If/Loop bodies too
    while todo or nodes:
        if todo:
            graph = todo.pop()
            out.append(graph)
            nodes += list(graph.node)
        for node in nodes:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    todo.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    todo.extend(a.graphs)
        nodes = []
    return out


def _tensors(model: Any) -> list[Any]:
    """Every tensor the model holds: initializers and attribute tensors, in subgraphs and
    functions too."""
    import onnx

    out = []
    nodes = [n for f in model.functions for n in f.node]
    for graph in _graphs(model):
        out += list(graph.initializer) + [s.values for s in graph.sparse_initializer]
        nodes += list(graph.node)
    for node in nodes:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out.append(a.t)
            elif a.type == onnx.AttributeProto.TENSORS:
                out.extend(a.tensors)
    return out
