"""ExecuTorch with the XNNPACK delegate (CPU): the deployed model is a ``model.pte``.

The module rebuilt from the compressed file is captured with ``torch.export`` (batch
dimension free up to MAX_BATCH), lowered with ``to_edge_transform_and_lower`` and the
XNNPACK partitioner, and run by ExecuTorch's runtime. Which layers ran in XNNPACK, and
in which precision, is read from the lowered program: each delegated subgraph keeps the
nodes it took over, with the module each came from.

int8 goes through PyTorch 2 export quantization (torchao's ``prepare_pt2e`` /
``convert_pt2e``) with ExecuTorch's ``XNNPACKQuantizer``: symmetric per-channel int8
weights, asymmetric int8 activations calibrated on training samples. Left alone, its
observers would re-round each weight to their own 8-bit grid; instead, before the
weights are folded into int8 constants, each weight's scale is set to the plan's own
step (times a folded BatchNorm's factor), so that quantizing it gives back the plan's
codes exactly, and that is checked layer by layer.

Two facts of ExecuTorch 1.5 shape this module: the XNNPACK thread pool is the process's
(set to ``target.threads`` when a runner is made), and a program exported at a small
example batch refused larger batches at run time whatever the dimension's declared
maximum, so programs are exported at MAX_BATCH.

An agent serving this runtime takes the ``.pte`` as it is (``PteFormat``). It refuses a
file without ExecuTorch's identifier, a program that delegates to any backend but
XNNPACK (the runtime here also registers others), and one that ExecuTorch's own
verification refuses. Which layers run in integer kernels is decided at lowering, so
the lowering's report stands for the file wherever it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from paretoopt.compress.techniques.bench import prunable_layers
from paretoopt.config.space import EXECUTORCH_MAX_BATCH
from paretoopt.measure.backends.base import (
    Deployment,
    DeployRequest,
    InputSpec,
    Kernels,
    Refused,
    require,
)
from paretoopt.measure.int8 import CALIBRATION_BATCH, int8_weight
from paretoopt.measure.structure import digest
from paretoopt.workload import inputs as trees
from paretoopt.workload.inputs import Inputs

if TYPE_CHECKING:
    from torch import nn

    from paretoopt.compress.techniques.qtensor import QTensor
    from paretoopt.config.space import TargetSpec
    from paretoopt.measure.protocol import Runner

PTE_FILE = "model.pte"  # the file this runtime loads, times, and export hands over
# the largest batch a program takes (the study evaluates 256 at a time)
MAX_BATCH = EXECUTORCH_MAX_BATCH
WEIGHTED = ("convolution", "linear", "addmm", "mm")  # edge ops that multiply by a weight


_QUIET = threading.RLock()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ExecuTorch 1.5 and torchao 0.18 talk at a user's terminal: a FutureWarning about
    torch's LeafSpec six times per lowering, torchao's CUDA-only kernels that do not
    load on a CPU machine, a torch.compile notice at import. None is the user's to act
    on, so they are held back while this module calls them (ExecuTorch's own C++ lines
    about the CPU, once per process, still reach stderr)."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    with _QUIET, warnings.catch_warnings():  # process-wide state: one thread at a time
        levels = [lg.level for lg in loggers]
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"executorch\.")
        warnings.filterwarnings("ignore", message=r".*experimental.*")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@contextlib.contextmanager
def native_quiet() -> Iterator[None]:
    """ExecuTorch's C++ writes "[cpuinfo_utils.cpp:87] Failed to open midr file ..." (an
    ARM register it looks for on x86) and "Resetting threadpool" to the process's
    stderr, which read like faults and are none. They go to /dev/null for the few
    milliseconds the thread pool is set up; a line another thread writes to stderr in
    that window would go with them, so nothing but this call runs inside it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class ExecuTorchRunner:
    name = "executorch"
    mode = "cpu"

    def __init__(
        self,
        program: bytes,
        threads: int,
        integer: frozenset[str] | None = None,
        structure: str | None = None,
    ) -> None:
        """`program`: a .pte's bytes; `integer` and `structure`: what lowering reported
        (unknown for a program loaded from its file alone)."""
        with quiet():
            from executorch.extension.pybindings.portable_lib import (
                _threadpool_get_thread_count,
                _unsafe_reset_threadpool,
            )
            from executorch.runtime import Runtime

        with native_quiet():  # its first look at the CPU, and each reset, log to stderr
            if _threadpool_get_thread_count() != threads:  # the process's one thread pool
                _unsafe_reset_threadpool(threads)
        self.program, self.threads = program, threads
        self.integer, self.structure = integer, structure
        self.method = Runtime.get().load_program(program).load_method("forward")
        self.meta = self.method.metadata

    def __call__(self, x: Any) -> np.ndarray:
        """Logits of a batch (an array, or a tuple or dict of arrays), MAX_BATCH rows at
        a time."""
        rows = trees.count(x)
        parts = [
            self._run(trees.take(x, slice(i, i + MAX_BATCH))) for i in range(0, rows, MAX_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def _run(self, x: Any) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in trees.leaves(x)]
        return self.method.execute(tensors)[0].numpy()

    def fresh(self) -> ExecuTorchRunner:
        return ExecuTorchRunner(self.program, self.threads, self.integer, self.structure)

    def timer(self, batch: Any) -> Callable[[], Any]:
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in trees.leaves(batch)]
        method = self.method
        return lambda: method.execute(tensors)

    def peak_memory(self, batch: Any) -> int | None:
        return None  # the runtime plans its memory ahead and does not report a peak


class ExecuTorchBackend:
    name = "executorch"
    file: str | None = PTE_FILE
    files: tuple[str, ...] = (PTE_FILE,)

    def __init__(self, threads: int, example: Inputs) -> None:
        require("executorch")
        self.threads = threads
        self.example = example  # one input, for export

    @classmethod
    def from_spec(cls, spec: TargetSpec, example: Inputs) -> ExecuTorchBackend:
        return cls(spec.threads, example)  # the space file keeps batch_size <= MAX_BATCH

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        program, integer, structure = lower(model.eval(), self.example)
        (work / PTE_FILE).write_bytes(program)
        return ExecuTorchRunner(program, self.threads, integer, structure)

    def deploy(self, request: DeployRequest) -> Deployment:
        work, quant = request.work, request.quant
        if quant.activations != "int8":
            runner = request.timed("export", self.runner, request.model, work)
            return Deployment(runner, work / PTE_FILE)
        if request.calibration is None:
            raise ValueError("an int8 deployment needs calibration samples")
        model = request.model.eval()
        floats = [n for n in prunable_layers(model) if quant.layer(n) > 8]
        quantized, exact = request.timed(
            "calibrate", quantize, model, self.example, request.calibration, request.codes, floats
        )
        program, integer, structure = request.timed("export", lower, quantized, self.example)
        (work / PTE_FILE).write_bytes(program)
        runner = ExecuTorchRunner(program, self.threads, integer, structure)
        return Deployment(runner, work / PTE_FILE, exact)

    def reload(self, directory: Path, build: Callable[[], nn.Module]) -> Runner:
        return ExecuTorchRunner((directory / PTE_FILE).read_bytes(), self.threads)

    def integer_weights(self, deployment: Deployment) -> set[str]:
        integer = getattr(deployment.runner, "integer", None)
        return set(integer or ()) if deployment.int8_weights else set()

    def structure(self, deployment: Deployment) -> str | None:
        return getattr(deployment.runner, "structure", None)

    def version(self) -> str:
        from importlib.metadata import version

        return version("executorch")


# --------------------------------------------------------------------------- lowering


def _export(model: nn.Module, example: Inputs) -> Any:
    full = trees.cat([example] * MAX_BATCH)  # see the module's docstring: at MAX_BATCH
    args, kwargs, shapes = trees.for_export(full, max_batch=MAX_BATCH)
    return torch.export.export(model, args, kwargs, dynamic_shapes=shapes)


@quiet()
def lower(model: nn.Module, example: Inputs) -> tuple[bytes, frozenset[str], str]:
    """The model as an ExecuTorch program delegated to XNNPACK; with the weights that run
    in its integer kernels and the lowered program's structure."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(_export(model, example), partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph_module
    delegated = [m for m in graph.children() if hasattr(m, "original_module")]
    integer = frozenset(
        f"{path}.weight" for m in delegated for path in _integer_layers(m.original_module.graph)
    )
    structure = digest(
        {
            "program": _nodes(graph.graph.nodes),
            "delegates": [
                [getattr(m, "backend_id", ""), _nodes(m.original_module.graph.nodes)]
                for m in delegated
            ],
        }
    )
    return bytes(edge.to_executorch().buffer), integer, structure


def _integer_layers(graph: Any) -> list[str]:
    """Module paths of the weighted layers in a delegated graph whose input and weight
    both arrive dequantized from int8: XNNPACK runs them as quantized operators."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or not any(w in _op(node) for w in WEIGHTED):
            continue
        inputs = [a for a in node.args[:2] if hasattr(a, "target")]
        if len(inputs) == 2 and all(_dequantized_int8(a) for a in inputs):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                found.append(str(stack[-1][0]))
    return found


def _dequantized_int8(node: Any) -> bool:
    return "dequantize" in _op(node) and torch.int8 in node.args


def _op(node: Any) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _nodes(nodes: Iterable[Any]) -> list[list[Any]]:
    """Each node's operator and output shape and type (symbolic sizes as "s")."""
    out = []
    for node in nodes:
        val = node.meta.get("val")
        shape = re.sub(r"s\d+", "s", str(getattr(val, "shape", "")))
        out.append([node.op, _op(node), shape, str(getattr(val, "dtype", ""))])
    return out


# --------------------------------------------------------------------------- int8


@quiet()
def quantize(
    model: nn.Module,
    example: Inputs,
    calibration: Inputs,
    codes: dict[str, QTensor] | Any,
    floats: list[str],
) -> tuple[Any, dict[str, str | None]]:
    """The model with int8 weights and activations for XNNPACK, calibrated on
    `calibration`; per quantized weight, "s8" where it holds the plan's own codes, or
    None where the quantizer's re-rounded weight stayed. `floats`: layers kept float
    (their nodes are filtered out; every other pattern is quantized)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer().set_global(config)
    if floats:  # the layers kept float are exempted; every other pattern is quantized
        quantizer.set_filter_function(_outside(frozenset(floats)))
    prepared = prepare_pt2e(_export(model, example).module(), quantizer)
    with torch.no_grad():
        for i in range(0, trees.count(calibration), CALIBRATION_BATCH):
            trees.call(prepared, trees.take(calibration, slice(i, i + CALIBRATION_BATCH)))
    converted = convert_pt2e(prepared, fold_quantize=False)
    exact = _own_codes(converted, dict(codes))
    _fold_weights(converted)
    return converted, exact


def _outside(floats: frozenset[str]) -> Callable[[Any], bool]:
    """A node filter: False for nodes of the layers kept float. Naming the int8 layers
    instead (set_module_name) missed conv-BN patterns, whose weight nodes belong to no
    module."""

    def keep(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return not any(str(path) in floats for path, _ in stack.values())

    return keep


def _weight_quantizers(graph_module: Any) -> Iterable[tuple[str, Any]]:
    """(parameter name, quantize node) for each weight quantized per channel."""
    op = torch.ops.quantized_decomposed.quantize_per_channel.default
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is op and node.args[0].op == "get_attr":
            yield str(node.args[0].target), node


def _own_codes(graph_module: Any, codes: dict[str, QTensor]) -> dict[str, str | None]:
    """Set each weight's quantization step to the plan's, where the plan's codes lay out
    as the captured (BatchNorm-folded) weight; check that quantizing gives them back."""
    exact: dict[str, str | None] = {}
    for param, node in _weight_quantizers(graph_module):
        if param not in codes:
            continue
        weight = graph_module.get_parameter(param).detach()
        mine = int8_weight(codes[param], weight.numpy())
        exact[param] = None
        if mine is None or mine.axis != node.args[3]:
            continue
        scale = torch.from_numpy(np.ascontiguousarray(mine.scale, np.float32))
        zero = torch.zeros(len(scale), dtype=torch.int64)
        held = node.target(weight, scale, zero, *node.args[3:])
        if torch.equal(held, torch.from_numpy(mine.ints)):
            setattr(graph_module, node.args[1].target, scale)
            setattr(graph_module, node.args[2].target, zero)
            exact[param] = "s8"
    return exact


def _fold_weights(graph_module: Any) -> None:
    """Quantize the weights once, into int8 constants (what XNNPACK takes)."""
    from torchao.quantization.pt2e.constant_fold import constant_fold

    ops = {
        torch.ops.quantized_decomposed.quantize_per_channel.default,
        torch.ops.quantized_decomposed.quantize_per_tensor.default,
    }
    constant_fold(graph_module, lambda n: n.op == "call_function" and n.target in ops)


# --------------------------------------------------------------------------- on an agent

IDENTIFIER = b"ET12"  # the flatbuffer's file identifier, bytes 4-8 of every .pte
DELEGATES = frozenset({"XnnpackBackend"})  # the backends an agent lets a program call
MAX_PLANS, MAX_DELEGATES, MAX_BUFFERS = 16, 1024, 1024  # read of a program, at most
MAX_PLANNED_BYTES = 1 << 30  # buffers a method may plan (its memory when it loads)
# ExecuTorch's ScalarType codes of the inputs an agent can feed
ET_INPUTS = {6: "float32", 4: "int64", 3: "int32", 11: "bool"}


class PteFormat:
    """An ExecuTorch program as an agent takes it: the ``.pte``'s bytes, unchanged."""

    runtime = "executorch"

    def pack(self, file: Path) -> bytes:
        return file.read_bytes()

    def check(self, body: bytes) -> Kernels | None:
        from executorch.runtime import Runtime, Verification

        if len(body) < 8 or body[4:8] != IDENTIFIER:
            raise Refused("not an ExecuTorch program: the file lacks the ET12 identifier")
        try:  # ExecuTorch's flatbuffer verifier (bounds, depth, table count); no backend runs
            verified = Verification.InternalConsistency
            program = Runtime.get().load_program(body, verification=verified)
        except Exception as exc:
            raise Refused(f"ExecuTorch cannot load it: {_line(exc)}") from None
        try:
            plans = program_plans(body)
        except Refused:
            raise
        except Exception:
            raise Refused("not an ExecuTorch program: its flatbuffer does not parse") from None
        for plan in plans:
            foreign = sorted(set(plan.delegates) - DELEGATES)
            if foreign:
                raise Refused(
                    f"method {plan.name!r} delegates to {foreign}; this agent runs only "
                    f"{sorted(DELEGATES)}"
                )
            if plan.planned_bytes > MAX_PLANNED_BYTES:  # allocated when the method loads
                raise Refused(
                    f"method {plan.name!r} plans {plan.planned_bytes} bytes of buffers; this "
                    f"agent gives a program at most {MAX_PLANNED_BYTES}"
                )
        names = sorted(plan.name for plan in plans)
        if "forward" not in names:
            raise Refused(f"the program has no forward method (it has {names})")
        try:
            program.load_method("forward")
        except Exception as exc:
            raise Refused(f"ExecuTorch cannot load it: {_line(exc)}") from None
        return None  # lowering chose the kernels: the report made with the file stands

    def load(self, body: bytes, threads: int) -> Runner:
        return ExecuTorchRunner(body, threads)

    def inputs(self, runner: Runner) -> list[InputSpec]:
        assert isinstance(runner, ExecuTorchRunner)
        out = []
        for i in range(runner.meta.num_inputs()):
            info = runner.meta.input_tensor_meta(i)
            kind = ET_INPUTS.get(int(info.dtype()), "?")
            out.append(InputSpec(f"input{i}", kind, tuple(int(d) for d in info.sizes()[1:])))
        return out

    def version(self) -> str:
        from importlib.metadata import version

        return version("executorch")


@dataclass(frozen=True)
class PlanFacts:
    """What an agent reads of one method before ExecuTorch loads it."""

    name: str
    delegates: tuple[str, ...]  # the backend ids it calls
    planned_bytes: int  # the memory-planned buffers it asks for


def program_plans(body: bytes) -> list[PlanFacts]:
    """Each method of a .pte: its name, the ids of the backends it delegates to, and the
    bytes of the buffers it plans, read from the flatbuffer (``schema/program.fbs``:
    Program.execution_plan, ExecutionPlan.name, .delegates and .non_const_buffer_sizes,
    BackendDelegate.id). Run after ExecuTorch's verifier; at most MAX_PLANS methods and
    MAX_DELEGATES delegates each are read (Refused beyond), so a small file cannot make
    the walk long."""
    from flatbuffers import encode, number_types, packer
    from flatbuffers.table import Table

    buf = bytearray(body)

    def slot(table: Table, index: int) -> int:  # a table field's offset, 0 when absent
        return int(table.Offset(4 + 2 * index))

    def tables(table: Table, index: int, limit: int, what: str) -> list[Table]:
        at = slot(table, index)
        if not at:
            return []
        start, count = table.Vector(at), table.VectorLen(at)
        if count > limit:
            raise Refused(f"the program lists {count} {what}; this agent reads at most {limit}")
        return [Table(buf, table.Indirect(start + 4 * k)) for k in range(count)]

    def text(table: Table, index: int) -> str:
        at = slot(table, index)
        return bytes(table.String(table.Pos + at)).decode() if at else ""

    def sizes(table: Table, index: int) -> list[int]:
        at = slot(table, index)
        if not at:
            return []
        start, count = table.Vector(at), table.VectorLen(at)
        if count > MAX_BUFFERS:
            raise Refused(
                f"the program plans {count} buffers; this agent reads at most {MAX_BUFFERS}"
            )
        return [table.Get(number_types.Int64Flags, start + 8 * k) for k in range(count)]

    program = Table(buf, encode.Get(packer.uoffset, buf, 0))
    return [
        PlanFacts(
            text(plan, 0),
            tuple(text(d, 0) for d in tables(plan, 7, MAX_DELEGATES, "delegates in a method")),
            sum(max(0, int(n)) for n in sizes(plan, 8)),
        )
        for plan in tables(program, 1, MAX_PLANS, "methods")
    ]


def _line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
