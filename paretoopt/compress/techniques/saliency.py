"""Saliency: how much each weight, or each channel, matters. The pruner removes the least.

Four registered, interchangeable choices:

* ``l1``, ``l2``: magnitude. For single weights the two rank alike; for channels the group
  norm differs (sum of |w| vs sum of w^2).
* ``taylor``: first order, |w| x mean |dL/dw| over a few batches, i.e. the mean of
  |w x g| per batch (Molchanov et al. 2019).
* ``hessian``: second order, Optimal Brain Damage's 1/2 w^2 H_ii, with the diagonal
  Hessian estimated by the empirical Fisher (mean squared gradient of small batches).

Channel scores come from Torch-Pruning's group importances, fed with the same gradient
statistics; its own Fisher accumulator is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
import torch_pruning as tp
from torch import nn

from paretoopt.workload import inputs as trees
from paretoopt.workload.data import Data

FISHER_BATCH = 8  # samples per squared-gradient estimate: small batches approach per-sample


@dataclass(frozen=True)
class Saliency:
    name: str
    gradients: str | None  # None, "mean" (first order) or "fisher" (second order)
    score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (w, stat) -> scores
    importance: Callable[[], tp.importance.Importance]  # channel scorer


SALIENCIES: dict[str, Saliency] = {
    s.name: s
    for s in (
        Saliency(
            "l1", None, lambda w, _: w.abs(), lambda: tp.importance.GroupMagnitudeImportance(p=1)
        ),
        Saliency(
            "l2", None, lambda w, _: w * w, lambda: tp.importance.GroupMagnitudeImportance(p=2)
        ),
        Saliency(
            "taylor",
            "mean",
            lambda w, g: (w * g).abs(),
            lambda: tp.importance.GroupTaylorImportance(),
        ),
        Saliency(
            "hessian",
            "fisher",
            lambda w, f: 0.5 * w * w * f,
            lambda: tp.importance.GroupHessianImportance(),
        ),
    )
}


def gradient_stats(
    model: nn.Module,
    split: Data,
    kind: str,
    batches: int,
    seed: int,
    batch_size: int = 64,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Mean gradient magnitude ("mean") or mean squared gradient ("fisher") of the loss, per
    parameter, over `batches` seeded batches of the training split. BatchNorm runs in eval
    mode, so estimating leaves the model exactly as it was."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    step = FISHER_BATCH if kind == "fisher" else batch_size
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count, seen = 0, 0
    device = next(iter(params.values())).device  # the training device, during fine-tuning
    for x, y, _ in split.batches(step, generator):
        if seen >= batches * batch_size:
            break
        keep = slice(0, batches * batch_size - seen)
        x, y = trees.take(x, keep), y[keep]
        x, y = trees.tree_map(lambda t: t.to(device), x), y.to(device)
        seen += len(y)
        model.zero_grad(set_to_none=True)
        loss(trees.call(model, x), y).backward()  # the recipe's loss, cross-entropy by default
        for n, p in params.items():
            if p.grad is not None:
                # per-batch magnitudes: signed gradients of a converged model cancel out
                total[n] += p.grad * p.grad if kind == "fisher" else p.grad.abs()
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: t / max(count, 1) for n, t in total.items()}


def fill_gradients(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Put the statistics where Torch-Pruning's Taylor and Hessian scorers read them."""
    for n, p in model.named_parameters():
        p.grad = stats[n].clone() if n in stats else None
