"""Eager PyTorch on the CPU: the deployed model is the module rebuilt from the compressed
file, run with the target's thread count. There is no runtime file and no integer kernel:
integer weights run dequantized in float32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from paretoopt.compress.artifact import ARTIFACT, load_compressed, read_metadata
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import TargetSpec
from paretoopt.measure.backends.base import Deployment, DeployRequest
from paretoopt.measure.protocol import Runner
from paretoopt.measure.structure import module_structure
from paretoopt.workload.inputs import Inputs, call, tree_map


class TorchRunner:
    name = "torch"
    mode = "eager"

    def __init__(self, model: nn.Module, threads: int) -> None:
        self.model = model.eval()
        self.threads = threads

    def __call__(self, x: Any) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return call(self.model, tree_map(torch.from_numpy, x)).numpy()
        finally:
            torch.set_num_threads(previous)

    def fresh(self) -> None:
        return None  # a module keeps no session of its own to renew: timed in one

    def timer(self, batch: Any) -> Callable[[], Any]:
        model, tensors = self.model, tree_map(torch.from_numpy, batch)

        def run() -> Any:  # threads: see runtime_threads, set outside the timing
            with torch.inference_mode():
                return call(model, tensors)

        return run

    def peak_memory(self, batch: Any) -> int | None:
        return None  # the CPU allocator keeps no peak statistics


class TorchBackend:
    name = "torch"
    file: str | None = None  # the module itself runs
    files: tuple[str, ...] = ()

    def __init__(self, threads: int, example: Inputs) -> None:
        self.threads = threads
        self.example = example  # one input, for export

    @classmethod
    def from_spec(cls, spec: TargetSpec, example: Inputs) -> TorchBackend:
        return cls(spec.threads, example)

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        return TorchRunner(model, self.threads)

    def deploy(self, request: DeployRequest) -> Deployment:
        half = half_type(request.quant)
        runner = request.timed("export", self.runner, request.model, request.work, half)
        return Deployment(runner, None)

    def reload(self, directory: Path, build: Callable[[], nn.Module]) -> Runner:
        metadata = read_metadata(directory / ARTIFACT)
        quant = CompressionPlan.from_dict(metadata["plan"]).quant
        model = load_compressed(directory / ARTIFACT, build)
        return self.runner(model, directory, half_type(quant))

    def integer_weights(self, deployment: Deployment) -> set[str]:
        return set()  # eager PyTorch dequantizes integer weights to float32

    def structure(self, deployment: Deployment) -> str | None:
        model = getattr(deployment.runner, "model", None)  # the module the runner runs
        return module_structure(model) if isinstance(model, nn.Module) else None

    def version(self) -> str:
        return str(torch.__version__)


def half_type(quant: QuantConfig) -> str | None:
    """The 16-bit type a model computes in, where every layer of the plan is 16-bit."""
    return quant.half_type if quant.widths == {16} else None
