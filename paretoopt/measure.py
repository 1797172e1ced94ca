"""Measurement: accuracy and latency of the deployed model in the target runtime.

A runner wraps one deployed model in one runtime (ONNX Runtime or eager PyTorch) with the
target's thread count. Latency follows one protocol everywhere: warm-up runs, then
``repeats`` rounds of ``iterations`` timed runs each; the median and p90 are taken over
every timed run, the spread is the ratio of the slowest to the fastest round median.
Candidates are timed in alternation with the baseline (``time_paired``), so that drift of
the machine cancels out of the ratio between them.
The search measures in the same process as training but never at the same time: each
trial's fine-tuning has returned before its timing starts.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .data import Split
from .space import TargetSpec


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    spread: float  # slowest round median / fastest round median
    runs: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def _round(run: Callable[[], Any], iterations: int) -> list[float]:
    clock = time.perf_counter_ns
    times = []
    for _ in range(iterations):
        start = clock()
        run()
        times.append((clock() - start) / 1e6)
    return times


def _stats(rounds: list[list[float]], batch_size: int) -> LatencyStats:
    every = sorted(t for r in rounds for t in r)
    medians = [statistics.median(r) for r in rounds]
    return LatencyStats(
        median_ms=statistics.median(every),
        p90_ms=every[min(len(every) - 1, int(0.9 * len(every)))],
        min_ms=every[0],
        spread=max(medians) / min(medians),
        runs=len(every),
        batch_size=batch_size,
    )


def time_runner(run: Callable[[], Any], target: TargetSpec) -> LatencyStats:
    """The protocol for one model: warm-up, then `repeats` rounds of `iterations` runs."""
    for _ in range(target.warmup):
        run()
    rounds = [_round(run, target.iterations) for _ in range(target.repeats)]
    return _stats(rounds, target.batch_size)


def time_paired(
    run: Callable[[], Any],
    reference: Callable[[], Any],
    target: TargetSpec,
) -> tuple[LatencyStats, LatencyStats, float]:
    """The same protocol with the reference model timed in alternating rounds.

    Returns both models' statistics and the candidate/reference latency ratio. The machine
    drifts (clock, caches, neighbours) by 10-30 % over minutes, and now and then one round
    runs several times slower. So each round of the candidate is paired with the adjacent
    round of the reference (in ABBA order, which cancels a linear drift), and the ratio is
    the median of the per-pair ratios: one disturbed round cannot move it.
    """
    for _ in range(target.warmup):
        reference()
        run()
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    for i in range(target.repeats):
        if i % 2 == 0:
            theirs.append(_round(reference, target.iterations))
            ours.append(_round(run, target.iterations))
        else:
            ours.append(_round(run, target.iterations))
            theirs.append(_round(reference, target.iterations))
    ratios = [
        statistics.median(a) / statistics.median(b) for a, b in zip(ours, theirs, strict=True)
    ]
    return (
        _stats(ours, target.batch_size),
        _stats(theirs, target.batch_size),
        statistics.median(ratios),
    )


# --------------------------------------------------------------------------- runtimes


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


def hardware_fingerprint() -> dict[str, Any]:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
