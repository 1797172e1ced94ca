"""The backend protocol: what a runtime does for a study, and nothing else does.

A backend deploys a trial's model (and writes the exact file it times), reloads a kept
trial's file for the end-of-search confirmation, says which layers ran in integer
kernels (read from the runtime's own graph, never assumed), and names its version. The
target holds one; the pipeline, the confirmation and export call only it.

A runtime a remote agent serves also has a ``Served`` format: how its files travel as
one upload, the rules an upload must pass before anything else reads it, and how the
agent loads it (see ``measure/agent``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from paretoopt.compress.techniques.qtensor import QTensor
    from paretoopt.config.parts.quant import QuantConfig
    from paretoopt.measure.isa import Int8Recipe
    from paretoopt.measure.protocol import Runner


def untimed(_stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A stage clock that runs the stage and records nothing."""
    return fn(*args)


@dataclass(frozen=True)
class DeployRequest:
    """One model to deploy, with what an integer deployment needs."""

    model: nn.Module  # rebuilt from the compressed file
    work: Path  # the trial folder being written
    quant: QuantConfig
    calibration: Any = None  # training samples: int8 activation ranges
    codes: Mapping[str, QTensor] = field(default_factory=dict)  # the plan's integer codes
    timed: Callable[..., Any] = untimed  # (stage, fn, *args): the trial's stage clock
    int8: Int8Recipe | None = None  # the weight types the timing CPU's int8 kernels want


@dataclass(frozen=True)
class Deployment:
    runner: Runner
    file: Path | None  # the file the runtime loads and times (None: it runs the module)
    # int8 only: per layer, the type ("s8", "u8") its weight holds the plan's own codes
    # in, or None where the runtime model holds re-rounded ones
    int8_weights: dict[str, str | None] = field(default_factory=dict)

    @property
    def exact(self) -> dict[str, bool]:
        """Whether each int8 layer's weight in the runtime model is the plan's own code."""
        return {k: v is not None for k, v in self.int8_weights.items()}


class Backend(Protocol):
    name: str  # the runtime, as target.runtime names it
    file: str | None  # the runtime file in a trial folder (None: the module itself runs)
    files: tuple[str, ...]  # every file the runtime loads (an OpenVINO IR has two)

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        """A float model (the baseline, a candidate) in this runtime; `half` names the
        16-bit type it computes in, where the runtime does so."""
        ...

    def deploy(self, request: DeployRequest) -> Deployment:
        """A trial's model in this runtime, written to its file where it has one."""
        ...

    def reload(self, directory: Path, build: Callable[[], nn.Module]) -> Runner:
        """A kept trial's deployed model again, from the files it measured."""
        ...

    def integer_weights(self, deployment: Deployment) -> set[str]:
        """Parameters the runtime holds as integers for integer kernels in this
        deployment (weights, and the int32 biases beside them)."""
        ...

    def structure(self, deployment: Deployment) -> str | None:
        """A key equal for deployments that run the same kernels on the same shapes and
        types, weights aside (see ``structure``): they share one latency estimate."""
        ...

    def version(self) -> str: ...


class Refused(Exception):  # noqa: N818  (an answer to a client, not a fault)
    """An upload a runtime's rules refuse; the agent answers 400 with the reason."""


@dataclass(frozen=True)
class InputSpec:
    """One input of a loaded model, as an agent feeds it."""

    name: str
    dtype: str  # numpy's name: "float32", "int64", "int32", "bool"
    dims: tuple[int, ...]  # after the batch axis; 0 where the model leaves one free


@dataclass(frozen=True)
class Kernels:
    """What a runtime made of a model on the machine that loaded it: the weights its
    integer kernels took, and the structure of its compiled graph."""

    integer: frozenset[str]
    structure: str


class Served(Protocol):
    """A runtime's files as one upload to a remote agent, and the agent's side of it."""

    runtime: str  # as target.runtime names it

    def pack(self, file: Path) -> bytes:
        """The body that carries the trial's runtime file (and any file beside it)."""
        ...

    def check(self, body: bytes) -> Kernels | None:
        """Raise Refused unless `body` is a model this runtime loads and nothing else runs;
        what it compiled to where that depends on the machine (None: the file says)."""
        ...

    def load(self, body: bytes, threads: int) -> Runner: ...

    def inputs(self, runner: Runner) -> list[InputSpec]: ...

    def version(self) -> str: ...


# runtime -> (the package it needs, the extra that installs it)
OPTIONAL = {"openvino": ("openvino", "openvino"), "executorch": ("executorch", "executorch")}


def require(runtime: str, where: str = "target.runtime") -> None:
    """An optional runtime's package must be installed; say how when it is not (`where`:
    the setting that named it)."""
    import importlib.util

    package, extra = OPTIONAL[runtime]
    if importlib.util.find_spec(package) is None:
        from paretoopt.errors import StudyError

        raise StudyError(
            f"{where}: {runtime} needs the optional package {package!r}, which is not "
            f"installed; install it with `pip install -c constraints.txt -e '.[{extra}]'` "
            "(or `make extras`), or choose target.runtime onnxruntime or torch"
        )
