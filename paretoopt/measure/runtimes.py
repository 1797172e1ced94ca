"""What every runtime shares: a deployed model's logits and accuracy, real timing inputs,
and the thread count eager PyTorch is timed with.

A runner wraps one deployed model in one runtime (see ``backends/``) with the target's
thread count. The search measures in the same process as training but never at the same
time (see ``gate.py`` for other processes on the machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

# the runners live with their backends; named here too, as this module always had them
from paretoopt.measure.backends.cuda import CudaRunner
from paretoopt.measure.backends.onnxruntime import OrtRunner
from paretoopt.measure.backends.torch_eager import TorchRunner
from paretoopt.measure.protocol import Runner
from paretoopt.workload import inputs as trees
from paretoopt.workload.data import Data
from paretoopt.workload.quality import TOP1, Quality

__all__ = ["CudaRunner", "OrtRunner", "TorchRunner"]


def runtime_quality(
    runner: Runner, split: Data, quality: Quality = TOP1, batch_size: int = 256
) -> float:
    """The study's quality metric (top-1 accuracy in percent by default) of the deployed
    model over a split, a batch at a time (built-ins count in integers, so they equal
    PyTorch's figure exactly when predictions agree)."""
    return quality.score(
        (np.asarray(runner(trees.numpy(x))), y.numpy()) for x, y, _ in split.batches(batch_size)
    )


def timing_batch(split: Data, batch_size: int) -> Any:
    """One batch of real inputs (the split repeated if it is smaller than the batch), as
    numpy arrays: one, or a tuple or dict of them."""
    x = split.head(batch_size)
    reps = -(-batch_size // trees.count(x))

    def repeated(v: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([v.numpy()] * reps)[:batch_size])

    return trees.tree_map(repeated, x)


def timed_call(runner: Runner, split: Data, batch_size: int) -> Callable[[], Any]:
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
