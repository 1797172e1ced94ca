"""Training: the baseline, and the fine-tuning loop every trial runs, on the device and
with the loss and optimizer of the study's recipe (``compress/recipe``).

Fine-tuning distils from the baseline when the plan asks for it. Over a split held in
memory, the teacher's logits are computed once per study (no augmentation is applied, so
they do not change), which removes the teacher forward pass from every step; a streamed
split has no index to look them up by, so the teacher runs on each batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from paretoopt.compress.augment import Augment, Batch, augment
from paretoopt.compress.recipe import Setup, on_device
from paretoopt.errors import TrialError
from paretoopt.workload import inputs as trees
from paretoopt.workload.data import Data
from paretoopt.workload.inputs import Inputs
from paretoopt.workload.quality import TOP1, Quality

# called after every optimizer step with (step, total); True = the parameters were replaced
# (channels removed mid-training), so the optimizer must be rebuilt
StepHook = Callable[[int, int], bool]
# the tensors the forward pass uses in place of some parameters (quantization-aware training)
WeightView = Callable[[nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int
    seed: int
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the distillation term; 0 = cross-entropy only
    augment: Augment = Augment()  # the user's transform, mixup, cutmix
    setup: Setup = Setup()  # device, mixed precision, the user's loss and optimizer


class Teacher:
    """The baseline's logits for a batch: looked up where they were computed over a split
    in memory (`logits`, by sample index), computed from `model` otherwise."""

    def __init__(self, logits: torch.Tensor | None = None, model: nn.Module | None = None) -> None:
        if logits is None and model is None:
            raise ValueError("a teacher has precomputed logits or a model")
        self.logits, self.model = logits, model
        self._copies: dict[torch.device, nn.Module] = {}  # the model on a training device

    @classmethod
    def of(cls, model: nn.Module, split: Data) -> Teacher:
        """Logits precomputed over a split in memory (and the model, for batches that
        augmentation changed); the model alone for a stream."""
        model = model.eval()
        if split.in_memory:
            return cls(logits=logits_of(model, split.head(len(split))), model=model)
        return cls(model=model)

    def __call__(
        self, x: Inputs, idx: torch.Tensor | None, device: torch.device | None = None
    ) -> torch.Tensor:
        """The logits of the batch, on `device` (default: the CPU): looked up by `idx`, or
        (None: a stream, or inputs changed by augmentation) computed there."""
        device = device or torch.device("cpu")
        if self.logits is not None and idx is not None:
            return self.logits[idx].to(device, non_blocking=True)
        if self.model is None:
            raise ValueError("precomputed teacher logits need the batch's sample indices")
        with torch.inference_mode():
            return trees.call(self._on(device), x)

    def _on(self, device: torch.device) -> nn.Module:
        """The teacher on a training device: copied there once, the CPU's own left alone."""
        assert self.model is not None
        if device.type == "cpu":
            return self.model
        if device not in self._copies:
            self._copies[device] = copy.deepcopy(self.model).to(device).eval()
        return self._copies[device]


def train(
    model: nn.Module,
    split: Data,
    recipe: Recipe,
    *,
    teacher_logits: torch.Tensor | Teacher | None = None,
    after_step: StepHook | None = None,
    weight_view: WeightView | None = None,
    step_guard: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> list[float]:
    """Train in place on the recipe's device (the model comes back where it was) with its
    optimizer (Adam by default) and cosine decay; return the mean loss of every epoch."""
    if recipe.epochs == 0:
        return []
    with on_device(model, recipe.setup.device):
        return _train(model, split, recipe, teacher_logits, after_step, weight_view, step_guard)


def _train(
    model: nn.Module,
    split: Data,
    recipe: Recipe,
    teacher_logits: torch.Tensor | Teacher | None,
    after_step: StepHook | None,
    weight_view: WeightView | None,
    step_guard: Callable[[], AbstractContextManager[None]],
) -> list[float]:
    setup = recipe.setup
    generator = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)  # augmentation's draws
    optimizer = setup.make_optimizer(model.parameters(), recipe.lr)
    scaler = setup.scaler()
    steps_per_epoch = math.ceil(len(split) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    schedule = _cosine(optimizer, total, start=0)
    teacher = (
        Teacher(logits=teacher_logits)
        if isinstance(teacher_logits, torch.Tensor)
        else (teacher_logits)
    )
    distil = teacher is not None and recipe.alpha > 0
    model.train()
    history, step = [], 0
    for epoch in range(recipe.epochs):
        running = 0.0
        for x, y, idx in split.batches(recipe.batch_size, generator):
            batch = _to(augment(x, y, recipe.augment, rng), setup.device)
            with step_guard():  # no latency is timed on this machine while a step runs
                with setup.autocast():
                    loss = _loss(
                        model, batch, idx, recipe, teacher if distil else None, weight_view
                    )
                if not torch.isfinite(loss):
                    raise TrialError(
                        f"training diverged: loss is {loss.item()} at epoch "
                        f"{epoch + 1}, step {step + 1} (lr={recipe.lr:g})"
                    )
                _step(model, loss, optimizer, scaler, setup)
                schedule.step()
                step += 1
                if after_step is not None and after_step(step, total) and step < total:
                    # channels were removed: new parameters need a new optimizer (Adam's
                    # moments restart), on the same cosine curve, and training mode again
                    optimizer = setup.make_optimizer(model.parameters(), recipe.lr)
                    schedule = _cosine(optimizer, total, start=step)
                    model.train()
                # read inside the guard: on a GPU this waits for the step's kernels, so
                # the gate is not let go while the device still trains
                running += loss.item() * len(y)
        history.append(running / len(split))
    model.eval()
    return history


def _to(batch: Batch, device: torch.device) -> Batch:
    """The batch on the training device (the sample indices stay: teacher lookups)."""
    if device.type == "cpu":
        return batch
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    partners = None if batch.partners is None else move(batch.partners)
    return replace(
        batch, x=trees.tree_map(move, batch.x), labels=move(batch.labels), partners=partners
    )


def _step(
    model: nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    setup: Setup,
) -> None:
    """One optimizer step: gradients (scaled under float16), clipped to the recipe's norm."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if setup.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if setup.grad_clip is not None:
        scaler.unscale_(optimizer)  # the norm is of the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _loss(
    model: nn.Module,
    batch: Batch,
    idx: torch.Tensor | None,
    recipe: Recipe,
    teacher: Teacher | None,
    weight_view: WeightView | None,
) -> torch.Tensor:
    """The recipe's loss, cross-entropy by default (against both label sets of a mixed
    batch), blended with the distillation term when a teacher is given."""
    x, y = batch.x, batch.labels
    if weight_view is not None:
        args, kwargs = trees.as_args(x)
        logits = torch.func.functional_call(model, weight_view(model), args, kwargs)
    else:
        logits = trees.call(model, x)
    if int(y.max()) >= logits.shape[1]:  # else an IndexError from deep inside the loss
        raise TrialError(
            f"the data has a label {int(y.max())}, but the model gives {logits.shape[1]} "
            "logits: labels must be 0 to one less than the model's outputs"
        )
    criterion = recipe.setup.criterion  # cross-entropy, or the recipe's loss
    loss = criterion(logits, y)
    if batch.partners is not None:
        loss = batch.lam * loss + (1.0 - batch.lam) * criterion(logits, batch.partners)
    if teacher is None:
        return loss
    soft = teacher(x, None if batch.changed else idx, y.device)
    kd = distillation_loss(logits.float(), soft.float(), recipe.temperature)
    return recipe.alpha * kd + (1.0 - recipe.alpha) * loss


def _cosine(
    optimizer: torch.optim.Optimizer,
    total: int,
    start: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from the base learning rate to 0 over `total` steps, from step `start`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s + start, total) / total))
    )


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Hinton et al.: T^2 * KL(teacher_T || student_T), so gradients keep their scale."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


@torch.inference_mode()
def logits_of(model: nn.Module, x: Inputs, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    n = trees.count(x)
    return torch.cat(
        [
            trees.call(model, trees.take(x, slice(i, i + batch_size)))
            for i in range(0, n, batch_size)
        ]
    )


@torch.inference_mode()
def split_quality(
    model: nn.Module, split: Data, quality: Quality = TOP1, batch_size: int = 512
) -> float:
    """The study's quality metric (top-1 accuracy in percent by default) over a split,
    read a batch at a time."""
    model.eval()
    return quality.score(
        (trees.call(model, x).float().numpy(), y.numpy()) for x, y, _ in split.batches(batch_size)
    )


@torch.inference_mode()
def partial_quality(
    model: nn.Module,
    split: Data,
    quality: Quality = TOP1,
    weight_view: WeightView | None = None,
    batch_size: int = 512,
) -> float:
    """The quality metric mid-training (successive halving's rungs): on the model's own
    device, through the QAT weight view where one is set; the model goes back to the
    mode it was in."""
    was, device = model.training, next(model.parameters()).device
    model.eval()
    view = weight_view(model) if weight_view is not None else None
    try:
        scored = []
        for x, y, _ in split.batches(batch_size):
            x = trees.tree_map(lambda t: t.to(device), x)
            if view is not None:
                args, kwargs = trees.as_args(x)
                logits = torch.func.functional_call(model, view, args, kwargs)
            else:
                logits = trees.call(model, x)
            scored.append((logits.float().cpu().numpy(), y.numpy()))
        return quality.score(iter(scored))
    finally:
        model.train(was)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    # counted in integers, so it equals the runtime's figure exactly when predictions agree
    return int((logits.argmax(dim=1) == labels).sum()) * 100.0 / len(labels)
