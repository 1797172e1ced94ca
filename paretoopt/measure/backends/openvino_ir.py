"""OpenVINO (CPU): the deployed model is an OpenVINO IR, ``model.xml`` with ``model.bin``.

The IR is converted from the same ONNX graph ONNX Runtime would time: float, or the int8
QDQ graph that holds the plan's own weight codes (see ``int8``). OpenVINO's ONNX reader
keeps each QDQ weight as an integer constant under its initializer's name, and its CPU
plugin fuses ``FakeQuantize -> Convolution`` into integer kernels. Which layers ran in
them is read from the compiled model's runtime graph (each node's ``runtimePrecision``),
and whether the IR holds the plan's codes is checked constant by constant.

Float models are compiled with ``INFERENCE_PRECISION_HINT: f32``: on a CPU with
AVX-512 BF16 or AMX (this machine's EPYC lists BF16 among the plugin's capabilities) the
plugin otherwise runs float32 models in bfloat16, a different model from the one the
file holds.

An agent serving this runtime takes the IR as one upload (``IrFormat``: the ``.xml``
and the ``.bin`` framed together). It refuses document type and entity declarations
in the ``.xml`` (entity expansion), any constant whose bytes lie outside the ``.bin``,
and anything OpenVINO cannot read and compile; it reports which layers its own CPU
plugin compiled into integer kernels, as that depends on the CPU (u8 weights ran in
float kernels on a CPU without VNNI).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from paretoopt.measure.backends.base import (
    Deployment,
    DeployRequest,
    InputSpec,
    Kernels,
    Refused,
    require,
)
from paretoopt.measure.backends.onnxruntime import FLOAT_FILE, write_qdq
from paretoopt.measure.onnx_export import export_onnx
from paretoopt.measure.structure import digest
from paretoopt.workload.inputs import Inputs, feeds

if TYPE_CHECKING:
    from torch import nn

    from paretoopt.config.space import TargetSpec
    from paretoopt.measure.protocol import Runner

IR_FILE, WEIGHTS_FILE = "model.xml", "model.bin"  # what this runtime loads; export hands over
QDQ_FILE = "model.qdq.onnx"  # the int8 graph the IR is converted from (not kept)
# runtime-graph layer types that multiply by a weight: where int8 kernels pay off
WEIGHTED = frozenset(
    {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"}
)
INTEGER = frozenset({"u8", "i8"})
_CORE: Any = None  # one OpenVINO Core per process (its plugins load once)


def core() -> Any:
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


class OpenVinoRunner:
    name = "openvino"
    mode = "cpu"

    def __init__(self, model: Path | Any, threads: int) -> None:
        """`model`: an IR's ``.xml`` (its ``.bin`` beside it), or an ``ov.Model``. The
        model is kept, so that fresh compilations can be made after the file is gone."""
        self.model = core().read_model(str(model)) if isinstance(model, Path) else model
        self.threads = threads
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # not bf16 (see the module's docstring)
        }
        self.compiled = core().compile_model(self.model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]

    def __call__(self, x: Any) -> np.ndarray:
        """Logits of a batch: an array, or a tuple or dict of arrays (several inputs)."""
        return np.array(self.request.infer(feeds(self.inputs, x))[0])

    def fresh(self) -> OpenVinoRunner:
        return OpenVinoRunner(self.model, self.threads)  # compiled anew: its memory too

    def timer(self, batch: Any) -> Callable[[], Any]:
        feed, request = feeds(self.inputs, batch), self.compiled.create_infer_request()
        return lambda: request.infer(feed, share_inputs=True, share_outputs=True)

    def peak_memory(self, batch: Any) -> int | None:
        return None  # the CPU plugin does not report its allocations

    def layers(self) -> list[dict[str, Any]]:
        """The compiled model's runtime graph: per node, its layer type, the precision it
        ran in, its kernel and the names of its inputs' producers."""
        out = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            out.append(
                {
                    **{k: str(info[k].astype(str)) for k in RT_KEYS if k in info},
                    "inputs": [_named(i.get_source_output().get_node()) for i in op.inputs()],
                    "shapes": [str(o.get_partial_shape()) for o in op.outputs()],
                }
            )
        return out


RT_KEYS = ("layerType", "runtimePrecision", "outputPrecisions", "primitiveType")


def _named(node: Any) -> tuple[str, str]:
    """A runtime-graph node as (friendly name, layer type)."""
    info = node.get_rt_info()
    kind = str(info["layerType"].astype(str)) if "layerType" in info else ""
    return node.get_friendly_name(), kind


class OpenVinoBackend:
    name = "openvino"
    file: str | None = IR_FILE
    files: tuple[str, ...] = (IR_FILE, WEIGHTS_FILE)

    def __init__(self, threads: int, example: Inputs) -> None:
        require("openvino")
        self.threads = threads
        self.example = example  # one input, for export

    @classmethod
    def from_spec(cls, spec: TargetSpec, example: Inputs) -> OpenVinoBackend:
        return cls(spec.threads, example)

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        export_onnx(model, self.example, work / FLOAT_FILE)
        write_ir(work / FLOAT_FILE, work / IR_FILE)
        (work / FLOAT_FILE).unlink()
        return OpenVinoRunner(work / IR_FILE, self.threads)

    def deploy(self, request: DeployRequest) -> Deployment:
        work, quant = request.work, request.quant
        if quant.activations != "int8":
            runner = request.timed("export", self.runner, request.model, work)
            return Deployment(runner, work / IR_FILE)
        types = write_qdq(request, self.example, work / QDQ_FILE)
        held = request.timed("export", write_ir, work / QDQ_FILE, work / IR_FILE)
        codes = qdq_codes(work / QDQ_FILE, types)
        (work / QDQ_FILE).unlink()
        # a layer counts as exact only where the IR holds the QDQ file's very codes
        exact = {
            p: kind if kind and _same(held.get(f"{p}_quantized"), codes.get(p)) else None
            for p, kind in types.items()
        }
        return Deployment(OpenVinoRunner(work / IR_FILE, self.threads), work / IR_FILE, exact)

    def reload(self, directory: Path, build: Callable[[], nn.Module]) -> Runner:
        return OpenVinoRunner(directory / IR_FILE, self.threads)  # exactly the file it timed

    def integer_weights(self, deployment: Deployment) -> set[str]:
        runner = deployment.runner
        if not deployment.int8_weights or not isinstance(runner, OpenVinoRunner):
            return set()
        return integer_constants(runner)

    def structure(self, deployment: Deployment) -> str | None:
        runner = deployment.runner
        return runtime_structure(runner) if isinstance(runner, OpenVinoRunner) else None

    def version(self) -> str:
        return package_version()


def write_ir(onnx_path: Path, xml: Path) -> dict[str, np.ndarray]:
    """Convert an ONNX file to an IR (float32 weights stay float32: OpenVINO would halve
    them by default); return the IR's integer constants by name."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    tmp = xml.with_name(xml.stem + ".tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)
    return {
        op.get_friendly_name(): op.get_data()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_element_type().is_integral()
    }


def qdq_codes(path: Path, types: dict[str, str | None]) -> dict[str, np.ndarray]:
    """The integer weights of a QDQ ONNX file, for each parameter written exactly."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    names = {p: f"{p}_quantized" for p, kind in types.items() if kind}
    return {p: numpy_helper.to_array(inits[n]) for p, n in names.items() if n in inits}


def integer_constants(runner: OpenVinoRunner) -> set[str]:
    """Weights that ran in integer kernels: the integer constants (``<param>_quantized``)
    feeding a weighted layer whose runtime precision is u8 or i8."""
    found = set()
    for node in runner.layers():
        if node.get("layerType") not in WEIGHTED or node.get("runtimePrecision") not in INTEGER:
            continue
        for name, kind in node["inputs"]:
            if name.endswith("_quantized") and kind == "Const":
                found.add(name.removesuffix("_quantized"))
    return found


def package_version() -> str:
    """The release installed, e.g. 2026.4.1 (openvino.__version__ adds the build)."""
    from importlib.metadata import version

    return version("openvino")


def runtime_structure(runner: OpenVinoRunner) -> str:
    """The compiled graph's structure: each node's layer type, precisions, kernel and
    output shapes."""
    nodes = [[n.get(k) for k in RT_KEYS] + [n["shapes"]] for n in runner.layers()]
    return digest({"openvino": nodes})


def _same(held: np.ndarray | None, codes: np.ndarray | None) -> bool:
    if held is None or codes is None or held.dtype != codes.dtype:
        return False
    return held.shape == codes.shape and bool(np.array_equal(held, codes))


# --------------------------------------------------------------------------- on an agent

MAGIC = b"OVIR"  # then the .xml's length (8 bytes, little-endian), the .xml, the .bin
HEADER = struct.Struct("<4sQ")
DECLARATIONS = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class IrFormat:
    """An OpenVINO IR as an agent takes it: its ``.xml`` and ``.bin`` in one body."""

    runtime = "openvino"

    def pack(self, file: Path) -> bytes:
        xml = file.read_bytes()
        return HEADER.pack(MAGIC, len(xml)) + xml + file.with_suffix(".bin").read_bytes()

    def check(self, body: bytes) -> Kernels | None:
        xml, weights = unpack(body)
        check_ir(xml, len(weights))
        try:
            runner = self.load(body, 1)
        except Exception as exc:
            raise Refused(f"OpenVINO cannot load it: {_line(exc)}") from None
        return Kernels(frozenset(integer_constants(runner)), runtime_structure(runner))

    def load(self, body: bytes, threads: int) -> Runner:
        xml, weights = unpack(body)
        return OpenVinoRunner(core().read_model(xml, weights), threads)

    def inputs(self, runner: Runner) -> list[InputSpec]:
        assert isinstance(runner, OpenVinoRunner)
        out = []
        for value in runner.compiled.inputs:
            dims = tuple(d.get_length() if d.is_static else 0 for d in value.get_partial_shape())
            kind = OV_INPUTS.get(value.get_element_type().get_type_name(), "?")
            out.append(InputSpec(value.get_any_name(), kind, dims[1:]))
        return out

    def version(self) -> str:
        return package_version()


OV_INPUTS = {"f32": "float32", "i64": "int64", "i32": "int32", "boolean": "bool"}


def unpack(body: bytes) -> tuple[bytes, bytes]:
    """The .xml and the .bin of an upload; Refused unless it is framed as IrFormat packs."""
    if len(body) < HEADER.size or body[:4] != MAGIC:
        raise Refused("not an OpenVINO IR upload: the .xml and .bin come framed as one body")
    _, length = HEADER.unpack_from(body)
    if length > len(body) - HEADER.size:
        raise Refused(f"the IR's .xml is said to be {length} bytes, more than the upload holds")
    xml = body[HEADER.size : HEADER.size + length]
    return xml, body[HEADER.size + length :]


def check_ir(xml: bytes, weights: int) -> None:
    """Refused unless the .xml is UTF-8 (what OpenVINO reads it as), declares no document
    type or entities, parses as an IR, and every constant's bytes lie inside the
    `weights`-byte .bin."""
    root = _parsed(xml)
    if root.tag != "net":
        raise Refused(f"not an OpenVINO IR: the .xml's root is <{root.tag}>, not <net>")
    for layer in root.iter("layer"):
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None:
            continue
        offset, size = data.get("offset", ""), data.get("size", "")
        if not all(v.isascii() and v.isdecimal() for v in (offset, size)):
            raise Refused(
                f"constant {layer.get('name')!r}: offset and size must be whole numbers of "
                f"bytes, but are {offset!r} and {size!r}"
            )
        if int(offset) + int(size) > weights:
            raise Refused(
                f"constant {layer.get('name')!r}: bytes {offset}+{size} lie outside the "
                f"{weights}-byte .bin"
            )


def _parsed(xml: bytes) -> Any:
    """The .xml's tree, read as UTF-8 only (a UTF-16 file hid its declarations from a
    byte search) by a parser that refuses a document type or an entity outright."""
    from xml.etree import ElementTree
    from xml.parsers import expat

    try:
        text = xml.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("the IR's .xml must be UTF-8") from None
    head = re.match(r"\ufeff?<\?xml[^>]*encoding=[\"']([^\"']+)", text)
    if "\x00" in text or (head and head.group(1).lower().replace("_", "-") != "utf-8"):
        raise Refused("the IR's .xml must be UTF-8")
    if DECLARATIONS.search(xml):
        raise Refused("document type and entity declarations in the .xml are refused")

    def refuse(*_: Any) -> None:
        raise Refused("document type and entity declarations in the .xml are refused")

    builder = ElementTree.TreeBuilder()
    parser = expat.ParserCreate("utf-8")  # the encoding is fixed, whatever the file says
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = refuse  # a DTD is never read, let alone expanded
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(text.encode("utf-8"), True)
        return builder.close()
    except expat.ExpatError as exc:
        raise Refused(f"the IR's .xml does not parse: {exc}") from None


def _line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
