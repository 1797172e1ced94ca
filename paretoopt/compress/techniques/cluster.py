"""Weight clustering (weight sharing, Deep Compression's second stage): each layer's
weights share 2^b values found by k-means, per layer or per output channel.

The grid is ``quant.grid: kmeans`` at the plan's bit-widths: a b-bit layer stores b-bit
indices and a codebook of 2^b float32 values per row (``QTensor.codebook``), where the
linear grid stores b-bit codes and a scale. k-means is one-dimensional, so Lloyd's
iterations assign by binary search between sorted centroids (never an n x k distance
matrix); it starts from centroids spread linearly between the row's minimum and maximum,
the initialisation Han et al. found best. A layer that prunes unstructured keeps one
centroid at exactly 0.0 for its pruned weights, so they stay pruned and the file's mask
still drops them.

With ``quant.method: qat`` the first half of fine-tuning moves the weights freely (it
repairs what pruning broke: shared values fixed on a freshly pruned layer cannot, measured
on digits-conv at 90 % sparsity); then the assignments are fixed and every forward pass
uses each cluster's mean weight (this technique's weight view): each member receives
its cluster's summed gradient over the member count, the same for all, so the members
move together (under Adam, by the step Deep Compression gives the shared value; plain SGD
would move it count times slower). With gradual pruning or regrowth, sharing begins only
once the masks stop changing. The final codebook is the members' means after fine-tuning,
so the model that was fine-tuned is the model the file holds. With ``ptq`` the weights
are clustered once, after fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from paretoopt.compress.techniques import Stage, register
from paretoopt.compress.techniques.bench import Workbench, prunable_layers
from paretoopt.compress.techniques.prune import GRADUAL_END
from paretoopt.compress.techniques.qtensor import QTensor
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan

ITERATIONS = 30  # Lloyd's iterations: 1-D k-means on a layer settles in far fewer
# under qat, the share of fine-tuning after which the weights share values: before it they
# move freely (pruning is repaired first, as Deep Compression retrains before sharing)
SHARED_FROM = 0.5


def rows_of(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The weight as (rows, n): one row per output channel, or one for the tensor."""
    return w.reshape(w.shape[0], -1) if cfg.granularity == "per_channel" else w.reshape(1, -1)


def kmeans(values: torch.Tensor, k: int, zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of each row of `values` (rows, n) into k centroids: (centroids (rows,
    k), codes (rows, n)). With `zero`, centroid 0 is exactly 0.0 and holds every zero
    weight; the other k - 1 cluster the rest."""
    values = values.detach().float()
    free = k - 1 if zero else k
    members = values != 0 if zero else torch.ones_like(values, dtype=torch.bool)
    big = torch.finfo(values.dtype).max
    lo = torch.where(members, values, big).min(dim=1).values
    hi = torch.where(members, values, -big).max(dim=1).values
    empty = lo > hi  # a row with no member (all pruned): centroids at 0
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    steps = torch.linspace(0.0, 1.0, free, dtype=values.dtype) if free > 1 else torch.zeros(1)
    centroids = lo[:, None] + (hi - lo)[:, None] * steps[None, :]
    for _ in range(ITERATIONS):
        codes = assign(values, centroids)
        moved = means(values, codes, free, members, centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved.sort(dim=1).values
    codes = assign(values, centroids)
    if not zero:
        return centroids, codes
    codes = torch.where(members, codes + 1, 0)
    return torch.cat([torch.zeros_like(centroids[:, :1]), centroids], dim=1), codes


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each value's nearest centroid (sorted per row): a binary search between midpoints."""
    bounds = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(bounds.contiguous(), values.contiguous())


def means(
    values: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    members: torch.Tensor,
    fallback: torch.Tensor,
) -> torch.Tensor:
    """Each cluster's mean of its member values; an empty cluster keeps `fallback`.
    Differentiable in `values`: each member receives its cluster's gradient over the
    count."""
    weight = members.to(values.dtype)
    sums = torch.zeros(values.shape[0], k, dtype=values.dtype, device=values.device)
    sums = sums.scatter_add(1, codes, values * weight)
    counts = torch.zeros_like(sums).scatter_add(1, codes, weight)
    return torch.where(counts > 0, sums / counts.clamp(min=1), fallback)


def shared(
    w: torch.Tensor, codes: torch.Tensor, k: int, zero: bool, cfg: QuantConfig
) -> torch.Tensor:
    """The weight as each member's cluster mean; the gradient reaching a member is its
    cluster's summed gradient over the count (the mean's), the same for every member."""
    rows = rows_of(w, cfg)
    everyone = torch.ones_like(rows, dtype=torch.bool)
    centroids = means(rows, codes, k, everyone, torch.zeros((), dtype=rows.dtype))
    if zero:  # the pruned weights' value stays exactly 0.0
        centroids = torch.cat([torch.zeros_like(centroids[:, :1]), centroids[:, 1:]], dim=1)
    return centroids.gather(1, codes).reshape(w.shape)


def keeps_zero(bench: Workbench, param: str) -> bool:
    """Whether a layer keeps a shared value at 0.0: pruning masks its weights."""
    return param in bench.masks


def cluster_tensor(
    w: torch.Tensor, cfg: QuantConfig, bits: int, zero: bool, codes: torch.Tensor | None = None
) -> QTensor:
    """The weight on its k-means grid: the given `codes` (fixed during fine-tuning) with
    their members' means, or a fresh k-means."""
    rows, k = rows_of(w.detach().float(), cfg), 2**bits
    if codes is None or codes.shape != w.shape:  # none fixed, or channels removed since
        centroids, codes = kmeans(rows, k, zero)
    else:
        codes = rows_of(codes, cfg)
        if zero:  # weights pruned during fine-tuning join the zero cluster
            codes = torch.where(rows == 0, 0, codes)
        members = codes > 0 if zero else torch.ones_like(rows, dtype=torch.bool)
        centroids = means(rows, codes, k, members, torch.zeros(rows.shape[0], k))
        if zero:
            centroids[:, 0] = 0.0
    nearest = centroids.abs().argmin(dim=1)  # the code a pruned weight would hold
    return QTensor(
        codes.reshape(w.shape).long(),
        torch.ones(rows.shape[0]),
        nearest.long(),
        bits,
        codebook=centroids.float().contiguous(),
    )


# --------------------------------------------------------------------------- fine-tuning


def clustered_layers(model: nn.Module, cfg: QuantConfig) -> dict[str, nn.Module]:
    """The layers on the k-means grid: 2-8 bits."""
    return {n: m for n, m in prunable_layers(model).items() if cfg.layer(n) <= 8}


@register("cluster", Stage.TRAINING_SETUP)
def cluster(bench: Workbench, plan: CompressionPlan) -> None:
    """Fine-tune freely, then fix each clustered layer's assignments and fine-tune the
    shared values for the rest (Deep Compression's retrain after pruning, then after
    sharing)."""
    cfg = plan.quant
    if cfg.grid != "kmeans" or cfg.method != "qat":
        return
    # masks that still change (gradual pruning, regrowth) would move weights in and out
    # of the zero value after sharing began: share once they hold
    moving = plan.prune.active and (plan.prune.schedule == "gradual" or plan.prune.regrowth)
    begin = max(SHARED_FROM, GRADUAL_END) if moving else SHARED_FROM

    def start(step: int, total: int) -> bool:
        if not bench.clusters and step >= begin * total:
            for name, layer in clustered_layers(bench.model, cfg).items():
                param = f"{name}.weight"
                weight = layer.weight.detach().cpu()
                zero = keeps_zero(bench, param)
                bench.clusters[param] = cluster_tensor(weight, cfg, cfg.layer(name), zero).codes
        return False

    def view(model: nn.Module) -> dict[str, torch.Tensor]:
        if not bench.clusters:  # the first part of fine-tuning: weights move freely
            return {}
        out = {}
        for name, layer in clustered_layers(model, cfg).items():
            param, k = f"{name}.weight", 2 ** cfg.layer(name)
            codes = bench.clusters.get(param)
            zero = keeps_zero(bench, param)
            if codes is None or codes.shape != layer.weight.shape:  # channels removed since
                weight = layer.weight.detach().cpu()
                codes = cluster_tensor(weight, cfg, cfg.layer(name), zero).codes
                bench.clusters[param] = codes
            if codes.device != layer.weight.device:  # moved once, not at every step
                codes = bench.clusters[param] = codes.to(layer.weight.device)
            out[param] = shared(layer.weight, rows_of(codes, cfg), k, zero, cfg)
        return out

    bench.step_hooks.append(start)
    bench.weight_view = view
