"""Training: the baseline, and the fine-tuning loop every trial runs.

Fine-tuning distils from the baseline when the plan asks for it. The teacher's logits are
computed once per study over the training split (no augmentation is applied, so they do
not change), which removes the teacher forward pass from every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from paretoopt.errors import TrialError
from paretoopt.workload.data import Split

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


def train(
    model: nn.Module,
    split: Split,
    recipe: Recipe,
    *,
    teacher_logits: torch.Tensor | None = None,
    after_step: StepHook | None = None,
    weight_view: WeightView | None = None,
    step_guard: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> list[float]:
    """Train in place with Adam and cosine decay; return the mean loss of every epoch."""
    if recipe.epochs == 0:
        return []
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    steps_per_epoch = math.ceil(len(split) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    schedule = _cosine(optimizer, total, start=0)
    distil = teacher_logits is not None and recipe.alpha > 0
    model.train()
    history, step = [], 0
    for epoch in range(recipe.epochs):
        running = 0.0
        for idx in split.batch_indices(recipe.batch_size, generator):
            with step_guard():  # no latency is timed on this machine while a step runs
                loss = _loss(
                    model, split, idx, recipe, teacher_logits if distil else None, weight_view
                )
                if not torch.isfinite(loss):
                    raise TrialError(
                        f"fine-tuning diverged: loss is {loss.item()} at epoch "
                        f"{epoch + 1}, step {step + 1} (lr={recipe.lr:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if after_step is not None and after_step(step, total) and step < total:
                    # channels were removed: new parameters need a new optimizer (Adam's
                    # moments restart), on the same cosine curve, and training mode again
                    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
                    schedule = _cosine(optimizer, total, start=step)
                    model.train()
            running += loss.item() * len(idx)
        history.append(running / len(split))
    model.eval()
    return history


def _loss(
    model: nn.Module,
    split: Split,
    idx: torch.Tensor,
    recipe: Recipe,
    teacher_logits: torch.Tensor | None,
    weight_view: WeightView | None,
) -> torch.Tensor:
    """Cross-entropy, blended with the distillation term when a teacher is given."""
    x = split.x[idx]
    logits = (
        torch.func.functional_call(model, weight_view(model), (x,))
        if weight_view is not None
        else model(x)
    )
    loss = F.cross_entropy(logits, split.y[idx])
    if teacher_logits is None:
        return loss
    kd = distillation_loss(logits, teacher_logits[idx], recipe.temperature)
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
def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    # counted in integers, so it equals the runtime's figure exactly when predictions agree
    return int((logits.argmax(dim=1) == labels).sum()) * 100.0 / len(labels)
