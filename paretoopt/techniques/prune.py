"""Magnitude pruning: unstructured (weight masks) or channel (channels physically removed).

Channel pruning goes through Torch-Pruning's dependency graph, so residual additions,
BatchNorms, depthwise convolutions and a flatten into a Linear layer stay consistent; the
removal is recorded as a replayable history so a fresh model can be rebuilt from the
artifact without pickling modules.
"""

from __future__ import annotations

import torch
import torch_pruning as tp

from ..errors import TrialError
from ..plan import CompressionPlan, PruneConfig
from . import register
from .bench import Workbench, prunable_layers


@register("prune")
def prune(bench: Workbench, plan: CompressionPlan) -> None:
    cfg = plan.prune
    if not cfg.active:
        return
    before = {n: m.weight.numel() for n, m in prunable_layers(bench.model).items()}
    if cfg.structure == "unstructured":
        _unstructured(bench, cfg)
    else:
        _channel(bench, cfg)
    bench.records["layer_sparsity"] = layer_sparsity(bench, before)


def _unstructured(bench: Workbench, cfg: PruneConfig) -> None:
    layers = prunable_layers(bench.model)
    weights = {f"{n}.weight": m.weight for n, m in layers.items()}
    if cfg.layer_scale:
        thresholds = {
            p: _threshold(w.detach().abs().flatten(), cfg.layer_sparsity(p[:-7]))
            for p, w in weights.items()
        }
    else:  # one global ranking: the budget flows to the layers with the smallest weights
        pooled = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        level = _threshold(pooled, cfg.sparsity)
        thresholds = dict.fromkeys(weights, level)
    for p, w in weights.items():
        bench.masks[p] = (w.detach().abs() > thresholds[p]).to(w.dtype)
    bench.apply_masks()


def _threshold(values: torch.Tensor, sparsity: float) -> float:
    # never all of them: a layer with no weight left is not a compressed layer but a cut
    k = min(int(round(sparsity * values.numel())), values.numel() - 1)
    if k <= 0:
        return -1.0  # keep everything, zeros included
    return float(torch.kthvalue(values, k).values)


def _channel(bench: Workbench, cfg: PruneConfig) -> None:
    model = bench.model.eval()
    layers = prunable_layers(model)
    ratio_dict = {
        m: min(cfg.layer_sparsity(n), _keep_at_least(m, cfg.round_to))
        for n, m in layers.items()
        if n != bench.classifier
    }
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            bench.example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=cfg.sparsity,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=[layers[bench.classifier]],
            round_to=cfg.round_to if cfg.round_to > 1 else None,
        )
        pruner.step()
    except Exception as exc:  # a model the dependency graph cannot take is a trial fault
        raise TrialError(f"channel pruning failed: {type(exc).__name__}: {exc}") from exc
    bench.pruning_history = [list(h) for h in pruner.pruning_history()]


def _keep_at_least(layer: torch.nn.Module, round_to: int) -> float:
    """The largest ratio that still leaves `round_to` channels.

    Torch-Pruning rounds the kept count down to a multiple of round_to; where that would be
    zero it leaves the whole layer unpruned, so a higher sparsity would give a *bigger*
    model. Capping the ratio keeps sparsity monotone in the size of the result.
    """
    width = getattr(layer, "out_channels", None) or layer.out_features
    return max(0.0, 1.0 - (round_to + 0.5) / width)


def layer_sparsity(bench: Workbench, before: dict[str, int]) -> dict[str, float]:
    """Fraction of each layer's original weights that are zero (masked) or gone (removed)."""
    out = {}
    for name, m in prunable_layers(bench.model).items():
        kept = int((m.weight != 0).sum())
        out[name] = round(1.0 - kept / before[name], 4)
    return out
