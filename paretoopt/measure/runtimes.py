"""Runtimes: the deployed model in ONNX Runtime or eager PyTorch, and its accuracy there.

A runner wraps one deployed model in one runtime with the target's thread count. The
search measures in the same process as training but never at the same time (see
``gate.py`` for other processes on the machine).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Split
from .protocol import Runner


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export-based ONNX export with a dynamic batch dimension."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            optimize=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65_536)},),
        )
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    tmp.replace(path)


class OrtRunner:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]


class TorchRunner:
    name = "torch"

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


def runtime_logits(runner: Runner, split: Split, batch_size: int = 256) -> np.ndarray:
    x = split.x.numpy()
    return np.concatenate([runner(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def runtime_accuracy(runner: Runner, split: Split) -> float:
    logits = runtime_logits(runner, split)
    return int((logits.argmax(axis=1) == split.y.numpy()).sum()) * 100.0 / len(split.y)


def timed_call(runner: Runner, split: Split, batch_size: int) -> Callable[[], Any]:
    """A no-argument call that runs one batch of real inputs (repeated if the split is small)."""
    x = split.x.numpy()
    reps = -(-batch_size // len(x))
    batch = np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size])
    if isinstance(runner, TorchRunner):  # threads: see runtime_threads, outside the timing
        model, tensor = runner.model, torch.from_numpy(batch)

        def run() -> Any:
            with torch.inference_mode():
                return model(tensor)

        return run
    return lambda: runner(batch)


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
