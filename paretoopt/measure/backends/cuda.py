"""Eager PyTorch on a CUDA device, timed by CUDA events.

A small model at batch 1 spends its GPU time waiting for kernel launches (measured on
an H200: 0.23-0.29 ms for a small CNN at batch 1 and 64 alike, in every precision), so
by default the forward pass is captured once as a CUDA graph and replayed, which
removes the launch overhead. ``mode`` says which was timed ("cuda-graph" or "eager",
the latter also where capture fails), so no gain is credited that the mode hid. The
model runs in float32, or in float16/bfloat16 when every layer of the plan is 16-bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from paretoopt.config.space import TargetSpec
from paretoopt.measure.backends.torch_eager import TorchBackend
from paretoopt.measure.protocol import DeviceTime, Runner
from paretoopt.workload.inputs import Inputs, call, tree_map

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CudaRunner:
    name = "torch-cuda"

    def __init__(self, model: nn.Module, dtype: torch.dtype, graphs: bool) -> None:
        self.device = torch.device("cuda")
        self.dtype = dtype
        # a copy: .to() moves in place, and the caller's model must stay on the CPU
        self.model = copy.deepcopy(model).to(self.device, dtype).eval()
        self.mode = "cuda-graph" if graphs else "eager"
        self.fallback: str | None = None  # why a graph could not be captured

    def __call__(self, x: Any) -> np.ndarray:
        with torch.inference_mode():
            out = call(self.model, self._on_device(x))
        return out.float().cpu().numpy()

    def _on_device(self, x: Any) -> Any:
        """Numpy inputs on the GPU: real values in the model's dtype, ids as they are."""

        def move(v: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(v)
            return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

        return tree_map(move, x)

    def fresh(self) -> None:
        return None  # a module keeps no session of its own to renew: timed in one

    def timer(self, batch: Any) -> Callable[[], Any]:
        x = self._on_device(batch)
        step = self._graph(x) if self.mode == "cuda-graph" else None
        if step is None:
            self.mode = "eager"

            def step() -> None:
                with torch.inference_mode():
                    call(self.model, x)

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run() -> DeviceTime:
            start.record()
            step()
            end.record()
            end.synchronize()
            return DeviceTime(start.elapsed_time(end))

        return run

    def _graph(self, x: Any) -> Callable[[], None] | None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(3):  # lazy initialisation must not happen during capture
                    call(self.model, x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                call(self.model, x)
        except RuntimeError as exc:
            self.fallback = f"{type(exc).__name__}: {exc}"[:300]
            return None
        return graph.replay

    def peak_memory(self, batch: Any) -> int | None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self(batch)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)


class CudaBackend(TorchBackend):
    """Reloads like eager PyTorch (from the compressed file); runs on the GPU."""

    name = "torch-cuda"

    def __init__(self, threads: int, example: Inputs, graphs: bool = True) -> None:
        super().__init__(threads, example)
        self.graphs = graphs

    @classmethod
    def from_spec(cls, spec: TargetSpec, example: Inputs) -> CudaBackend:
        return cls(spec.threads, example, spec.cuda_graphs)

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        return CudaRunner(model, HALF[half] if half else torch.float32, self.graphs)

    def version(self) -> str:
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}"
