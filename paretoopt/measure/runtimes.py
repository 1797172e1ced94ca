"""Runtimes: the deployed model in ONNX Runtime or eager PyTorch, and its accuracy there.

A runner wraps one deployed model in one runtime with the target's thread count. The
search measures in the same process as training but never at the same time (see
``gate.py`` for other processes on the machine).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Split
from .protocol import DeviceTime, Runner


class OrtRunner:
    name = "onnxruntime"
    mode = "cpu"

    def __init__(self, model: Path | bytes, threads: int) -> None:
        """`model`: an ONNX file, or its bytes."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]

    def timer(self, batch: np.ndarray) -> Callable[[], Any]:
        return lambda: self(batch)

    def peak_memory(self, batch: np.ndarray) -> int | None:
        return None  # ONNX Runtime's CPU provider does not report its allocations


class TorchRunner:
    name = "torch"
    mode = "eager"

    def __init__(self, model: nn.Module, threads: int) -> None:
        self.model = model.eval()
        self.threads = threads

    def __call__(self, x: np.ndarray) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).numpy()
        finally:
            torch.set_num_threads(previous)

    def timer(self, batch: np.ndarray) -> Callable[[], Any]:
        model, tensor = self.model, torch.from_numpy(batch)

        def run() -> Any:  # threads: see runtime_threads, set outside the timing
            with torch.inference_mode():
                return model(tensor)

        return run

    def peak_memory(self, batch: np.ndarray) -> int | None:
        return None  # the CPU allocator keeps no peak statistics


class CudaRunner:
    """Eager PyTorch on a CUDA device, timed by CUDA events.

    A small model at batch 1 spends its GPU time waiting for kernel launches (measured on
    an H200: 0.23-0.29 ms for a small CNN at batch 1 and 64 alike, in every precision), so
    by default the forward pass is captured once as a CUDA graph and replayed, which
    removes the launch overhead. ``mode`` says which was timed ("cuda-graph" or "eager",
    the latter also where capture fails), so no gain is credited that the mode hid.
    """

    name = "torch-cuda"

    def __init__(self, model: nn.Module, dtype: torch.dtype, graphs: bool) -> None:
        self.device = torch.device("cuda")
        self.dtype = dtype
        # a copy: .to() moves in place, and the caller's model must stay on the CPU
        self.model = copy.deepcopy(model).to(self.device, dtype).eval()
        self.mode = "cuda-graph" if graphs else "eager"
        self.fallback: str | None = None  # why a graph could not be captured

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device, self.dtype))
        return out.float().cpu().numpy()

    def timer(self, batch: np.ndarray) -> Callable[[], Any]:
        x = torch.from_numpy(batch).to(self.device, self.dtype)
        step = self._graph(x) if self.mode == "cuda-graph" else None
        if step is None:
            self.mode = "eager"

            def step() -> None:
                with torch.inference_mode():
                    self.model(x)

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run() -> DeviceTime:
            start.record()
            step()
            end.record()
            end.synchronize()
            return DeviceTime(start.elapsed_time(end))

        return run

    def _graph(self, x: torch.Tensor) -> Callable[[], None] | None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(3):  # lazy initialisation must not happen during capture
                    self.model(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                self.model(x)
        except RuntimeError as exc:
            self.fallback = f"{type(exc).__name__}: {exc}"[:300]
            return None
        return graph.replay

    def peak_memory(self, batch: np.ndarray) -> int | None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self(batch)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)


def runtime_logits(runner: Runner, split: Split, batch_size: int = 256) -> np.ndarray:
    x = split.x.numpy()
    return np.concatenate([runner(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def runtime_accuracy(runner: Runner, split: Split) -> float:
    logits = runtime_logits(runner, split)
    return int((logits.argmax(axis=1) == split.y.numpy()).sum()) * 100.0 / len(split.y)


def timing_batch(split: Split, batch_size: int) -> np.ndarray:
    """One batch of real inputs (the split repeated if it is smaller than the batch)."""
    x = split.x.numpy()
    reps = -(-batch_size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size])


def timed_call(runner: Runner, split: Split, batch_size: int) -> Callable[[], Any]:
    """A no-argument call that runs one batch of real inputs in the runner's runtime."""
    return runner.timer(timing_batch(split, batch_size))


@contextmanager
def runtime_threads(runner: Runner) -> Iterator[None]:
    """Eager PyTorch is timed with the target's thread count; training gets its own back."""
    if not isinstance(runner, TorchRunner):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(runner.threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
