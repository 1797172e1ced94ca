"""The workbench: the model under compression and what the techniques leave for later stages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from paretoopt.compress.recipe import Setup, on_device
from paretoopt.workload import inputs as trees
from paretoopt.workload.data import Splits
from paretoopt.workload.inputs import Inputs, call

if TYPE_CHECKING:
    from paretoopt.compress.techniques.qtensor import QTensor
    from paretoopt.compress.train import Teacher

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
# called after every fine-tuning step with (step, total); True = parameters were replaced
StepHook = Callable[[int, int], bool]


@dataclass
class Workbench:
    model: nn.Module
    splits: Splits
    teacher_logits: torch.Tensor | Teacher  # the baseline's logits over the training split
    classifier: str  # module name of the output layer: its outputs are never pruned
    seed: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> keep mask
    # Torch-Pruning's replayable removal: (module name, output side?, channel indices)
    pruning_history: list[list[Any]] = field(default_factory=list)
    # low-rank factorization: layer name -> {"kind", "ranks", "full"} (the file keeps them)
    factorized: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized: dict[str, QTensor] = field(default_factory=dict)  # param name -> codes
    # weight clustering fine-tuned through shared values: param name -> fixed assignments
    clusters: dict[str, torch.Tensor] = field(default_factory=dict)
    halved: dict[str, str] = field(default_factory=dict)  # param name -> float16 / bfloat16
    # QAT: the weights the forward pass uses instead of the parameters (straight-through)
    weight_view: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    # held around every fine-tuning step, so no latency is timed meanwhile (measure.gate)
    step_guard: Callable[[], AbstractContextManager[None]] = nullcontext
    records: dict[str, Any] = field(default_factory=dict)  # per-technique facts to store
    timings: dict[str, float] = field(default_factory=dict)
    step_hooks: list[StepHook] = field(default_factory=list)  # run during fine-tuning
    original: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer: (width, numel)
    setup: Setup = field(default_factory=Setup)  # fine-tuning's device, loss and optimizer

    def __post_init__(self) -> None:
        if not self.original:
            self.original = {
                n: (int(m.weight.shape[0]), m.weight.numel())
                for n, m in prunable_layers(self.model).items()
            }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def example(self) -> Inputs:
        """One training sample, on the model's device (pruning traces the model with it)."""
        x, device = self.splits.train.head(1), self.device
        return x if device.type == "cpu" else trees.tree_map(lambda t: t.to(device), x)

    @contextmanager
    def on(self, device: torch.device) -> Iterator[None]:
        """The model and the pruning masks on `device` for a block (fine-tuning), back
        where they were afterwards (the CPU, where files and runtimes are made)."""
        home = self.device
        with on_device(self.model, device):
            self.masks = {k: m.to(device) for k, m in self.masks.items()}
            try:
                yield
            finally:  # masks made meanwhile (gradual pruning) come back with the rest
                self.masks = {k: m.to(home) for k, m in self.masks.items()}

    def timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def apply_masks(self) -> None:
        """Zero the pruned weights again (after an optimizer step moved them)."""
        if not self.masks:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d, Conv2d and Linear layer by module name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def find_classifier(model: nn.Module, example: Inputs) -> str:
    """The output layer: the last prunable layer to run in a forward pass.

    Found by execution order rather than by name or width, so user models with any naming
    (or a hidden layer that happens to have num_classes units) are handled.
    """
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda *_, n=n: order.append(n))
        for n, m in prunable_layers(model).items()
    ]
    try:
        with torch.no_grad():
            call(model.eval(), example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError("the model has no Conv1d, Conv2d or Linear layer to compress")
    return order[-1]
