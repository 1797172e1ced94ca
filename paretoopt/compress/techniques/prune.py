"""Pruning: unstructured (weight masks) or channel (channels physically removed).

Every dimension is a plan setting: the saliency (see ``saliency.py``), the distribution of
the budget over layers (uniform, one global ranking, or searched per-layer budgets), the
schedule (one-shot before fine-tuning, or gradual along the cubic schedule of Zhu & Gupta
2018 during it) and RigL-style regrowth at constant sparsity.

Channel pruning goes through Torch-Pruning's dependency graph, so residual additions,
BatchNorms, depthwise convolutions and a flatten into a Linear layer stay consistent. The
removal is recorded as a replayable history, so a fresh copy of the architecture can be
rebuilt from the artifact without pickling modules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch_pruning as tp

from paretoopt.compress.techniques import Rebuild, Stage, register
from paretoopt.compress.techniques.bench import StepHook, Workbench, prunable_layers
from paretoopt.compress.techniques.saliency import SALIENCIES, fill_gradients, gradient_stats
from paretoopt.compress.techniques.surgeon import input_hessians, operable, surgeon
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.errors import TrialError
from paretoopt.workload.inputs import Inputs, call

GRADUAL_END = 0.75  # gradual pruning and regrowth stop here; the rest of fine-tuning recovers
REGROWTH_FRACTION = 0.3  # RigL's alpha: share of active weights moved at the first event


def prune(bench: Workbench, plan: CompressionPlan) -> None:
    """Prune to the plan's level now, or install the gradual schedule or regrowth that
    fine-tuning steps through."""
    cfg = plan.prune
    if not cfg.active:
        return
    fine_tunes = plan.finetune.epochs > 0
    if cfg.schedule == "gradual" and fine_tunes:
        bench.step_hooks.append(_gradual(bench, cfg))
        return
    prune_to(bench, cfg, cfg.sparsity)
    if cfg.regrowth and fine_tunes:
        bench.step_hooks.append(_regrowth(bench, cfg))


def prune_to(
    bench: Workbench, cfg: PruneConfig, level: float, pruner: tp.pruner.MetaPruner | None = None
) -> None:
    """Bring the model to `level` (scaled per layer by the distribution)."""
    saliency = SALIENCIES[cfg.saliency]
    stats = None
    if saliency.gradients is not None:
        stats = gradient_stats(
            bench.model,
            bench.splits.train,
            saliency.gradients,
            cfg.saliency_batches,
            bench.seed,
            loss=bench.setup.criterion,  # the gradients of what fine-tuning minimises
        )
    if cfg.structure in ("unstructured", "nm"):
        _mask(bench, cfg, level, stats)
    else:
        if stats is not None:
            fill_gradients(bench.model, stats)
        _remove_channels(bench, pruner or _pruner(bench, cfg, level))


# --------------------------------------------------------------------------- unstructured


def _mask(
    bench: Workbench, cfg: PruneConfig, level: float, stats: dict[str, torch.Tensor] | None
) -> None:
    score = SALIENCIES[cfg.saliency].score
    scores = {}
    for name, layer in prunable_layers(bench.model).items():
        param = f"{name}.weight"
        w = layer.weight.detach()
        scores[param] = score(w, stats[param] if stats is not None else None)
        if param in bench.masks:  # weights pruned earlier stay pruned (gradual schedule)
            scores[param] = scores[param] * bench.masks[param]
    if cfg.structure == "nm":  # the best nm_keep of every group of a row
        for param, s in scores.items():
            bench.masks[param] = nm_mask(s, cfg.nm_keep, cfg.nm_group)
        if cfg.reconstruction == "obs":
            _surgeon(bench, cfg)
        bench.apply_masks()
        return
    if cfg.distribution == "global":  # one ranking: the budget flows to the least salient
        pooled = _threshold(torch.cat([s.flatten() for s in scores.values()]), level)
        # ... but no layer loses more than 99 %: scores of different layers can differ by
        # orders of magnitude, and a layer with no weight left cuts the network
        thresholds = {p: min(pooled, _threshold(s.flatten(), 0.99)) for p, s in scores.items()}
    else:
        thresholds = {
            p: _threshold(s.flatten(), _layer_level(cfg, p[: -len(".weight")], level))
            for p, s in scores.items()
        }
    for param, s in scores.items():
        bench.masks[param] = (s > thresholds[param]).float()
    if cfg.reconstruction == "obs":  # the same level per layer, other weights, updated
        _surgeon(bench, cfg)
    bench.apply_masks()


def _surgeon(bench: Workbench, cfg: PruneConfig) -> None:
    """Optimal Brain Surgeon on every masked layer, at the sparsity its mask has."""
    layers = prunable_layers(bench.model)
    samples = cfg.saliency_batches * 64
    hessians = input_hessians(bench.model, layers, bench.splits.train, samples)
    with torch.no_grad():
        for name, layer in layers.items():
            param = f"{name}.weight"
            if not operable(layer, hessians[name]):  # keeps the saliency's mask
                continue
            level = 1.0 - float(bench.masks[param].mean())
            rows = layer.weight.reshape(layer.weight.shape[0], -1)
            nm = (cfg.nm_keep, cfg.nm_group) if cfg.structure == "nm" else None
            weight, keep = surgeon(rows, hessians[name].to(rows.device), level, nm)
            layer.weight.copy_(weight.reshape(layer.weight.shape))
            bench.masks[param] = keep.reshape(layer.weight.shape).float()


def nm_mask(scores: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Keep the `keep` highest scores of every `group` consecutive weights of a row (its
    input dimension, as N:M sparse kernels read it); a row's last, partial group stays."""
    rows = scores.reshape(scores.shape[0], -1)
    full = rows.shape[1] // group * group
    groups = rows[:, :full].reshape(rows.shape[0], -1, group)
    chosen = torch.zeros_like(groups).scatter_(2, groups.topk(keep, dim=2).indices, 1.0)
    rest = torch.ones_like(rows[:, full:])
    return torch.cat([chosen.reshape(rows.shape[0], full), rest], dim=1).reshape(scores.shape)


def _layer_level(cfg: PruneConfig, layer: str, level: float) -> float:
    return min(level * cfg.scale(layer), 0.99)


def _threshold(values: torch.Tensor, sparsity: float) -> float:
    # never all of them: a layer with no weight left is not a compressed layer but a cut
    k = min(int(round(sparsity * values.numel())), values.numel() - 1)
    if k <= 0:
        return -1.0  # keep everything, zeros included
    return float(torch.kthvalue(values, k).values)


# --------------------------------------------------------------------------- channels


def _pruner(
    bench: Workbench,
    cfg: PruneConfig,
    level: float,
    steps: int = 1,
) -> tp.pruner.MetaPruner:
    """A Torch-Pruning pruner with one ratio per layer, each capped so that the layer keeps
    at least `round_to` channels. A global distribution is turned into such ratios by
    `_global_ratios` first: Torch-Pruning's own global mode has no per-layer floor."""
    layers = prunable_layers(bench.model)
    if cfg.distribution == "global":
        wanted = _global_ratios(bench, cfg, level)
    else:
        wanted = {m: _layer_level(cfg, n, level) for n, m in layers.items()}
    ratios = {
        m: min(r, _keep_at_least(m, cfg.round_to))
        for m, r in wanted.items()
        if m is not layers[bench.classifier]
    }
    return _meta_pruner(bench, cfg, level, ratios, steps)


def _meta_pruner(
    bench: Workbench,
    cfg: PruneConfig,
    level: float,
    ratios: dict[torch.nn.Module, float] | None,
    steps: int = 1,
) -> tp.pruner.MetaPruner:
    model = bench.model.eval()
    classifier = prunable_layers(model)[bench.classifier]
    try:
        return tp.pruner.MetaPruner(
            model,
            bench.example,
            importance=SALIENCIES[cfg.saliency].importance(),
            pruning_ratio=level,
            pruning_ratio_dict=ratios,
            forward_fn=call,  # model(x), model(*x) or model(**x), as the data has it
            ignored_layers=[classifier],
            # attention keeps its head count, each head narrower (embed_dim must stay a
            # multiple of num_heads; Torch-Pruning 1.6 removes whole heads only from
            # attention built of separate q/k/v Linear layers, not nn.MultiheadAttention)
            num_heads=_attention_heads(model),
            prune_head_dims=True,
            round_to=cfg.round_to if cfg.round_to > 1 else None,
            iterative_steps=steps,
            iterative_pruning_ratio_scheduler=cubic_ratios,
        )
    except Exception as exc:  # a model the dependency graph cannot take is a trial fault
        raise TrialError(f"channel pruning failed: {type(exc).__name__}: {exc}") from exc


def _attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    return {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}


def _global_ratios(
    bench: Workbench,
    cfg: PruneConfig,
    level: float,
) -> dict[torch.nn.Module, float]:
    """One ranking across layers: every group's channel scores (mean-normalised by the
    importance) are pooled, and each group's ratio is its share below the pooled
    threshold."""
    probe = _meta_pruner(bench, cfg, level, None)
    scores = []
    for group in probe.DG.get_all_groups(
        ignored_layers=probe.ignored_layers, root_module_types=probe.root_module_types
    ):
        imp = probe.estimate_importance(group)
        if imp is not None and len(imp):
            scores.append((group[0][0].target.module, imp.detach().float()))
    if not scores:
        return {}
    pooled = torch.cat([s for _, s in scores])
    k = min(max(int(round(level * pooled.numel())), 1), pooled.numel())
    threshold = float(torch.kthvalue(pooled, k).values)
    return {module: float((s <= threshold).float().mean()) for module, s in scores}


def _remove_channels(bench: Workbench, pruner: tp.pruner.MetaPruner) -> None:
    try:
        pruner.step()
    except Exception as exc:
        raise TrialError(f"channel pruning failed: {type(exc).__name__}: {exc}") from exc
    bench.model.zero_grad(set_to_none=True)
    bench.pruning_history = [list(h) for h in pruner.pruning_history()]


def _keep_at_least(layer: torch.nn.Module, round_to: int) -> float:
    """The largest ratio that still leaves `round_to` channels.

    Torch-Pruning rounds the kept count down to a multiple of round_to; where that would be
    zero it leaves the whole layer unpruned, so a higher sparsity would give a *bigger*
    model. Capping the ratio keeps sparsity monotone in the size of the result.
    """
    width = getattr(layer, "out_channels", None) or layer.out_features
    return max(0.0, 1.0 - (round_to + 0.5) / width)


# --------------------------------------------------------------------------- schedules


def cubic_ratios(final: float, steps: int) -> list[float]:
    """Zhu & Gupta 2018: s_k = s_f (1 - (1 - k/n)^3), fast early, slow late; s_0 = 0."""
    return [final * (1.0 - (1.0 - k / steps) ** 3) for k in range(steps + 1)]


def _events(total: int, steps: int) -> dict[int, int]:
    """Optimizer step -> pruning event (1..steps), spread over the first 75 % of training."""
    end = max(1, int(GRADUAL_END * total))
    return {max(1, round(k * end / steps)): k for k in range(1, steps + 1)}


def _gradual(bench: Workbench, cfg: PruneConfig) -> StepHook:
    return _Gradual(bench, cfg)


class _Gradual:
    """Prune at evenly spaced steps, to the cubic schedule's level at each (a step hook)."""

    def __init__(self, bench: Workbench, cfg: PruneConfig) -> None:
        self.bench, self.cfg = bench, cfg
        self.levels = cubic_ratios(cfg.sparsity, cfg.gradual_steps)
        self.events: dict[int, int] | None = None  # known once the step count is
        self.pruner: tp.pruner.MetaPruner | None = None  # channels: one iterative pruner
        self.done = 0  # events applied

    def __call__(self, step: int, total: int) -> bool:
        if self.events is None:
            self.events = _events(total, self.cfg.gradual_steps)
        event = self.events.get(step)
        if event is None:
            return False
        if self.cfg.structure == "unstructured":
            prune_to(self.bench, self.cfg, self.levels[event])
            return False
        if self.pruner is None:
            self.pruner = _pruner(self.bench, self.cfg, self.cfg.sparsity, self.cfg.gradual_steps)
        for _ in range(event - self.done):  # each pruner step advances the schedule by one
            prune_to(self.bench, self.cfg, self.levels[event], self.pruner)
        self.done = event
        return True  # parameters were replaced: the optimizer must be rebuilt


def _regrowth(bench: Workbench, cfg: PruneConfig) -> StepHook:
    """RigL (Evci et al. 2020): drop the weakest active weights, regrow as many inactive
    ones where the gradient is largest, at constant sparsity; the share moved decays along
    a cosine to 0 at 75 % of training."""

    def hook(step: int, total: int) -> bool:
        end = max(1, int(GRADUAL_END * total))
        if step % cfg.regrowth_interval or step > end:
            return False
        share = REGROWTH_FRACTION / 2 * (1 + math.cos(math.pi * step / end))
        params = dict(bench.model.named_parameters())
        for name, mask in bench.masks.items():
            _drop_and_grow(params[name], mask, share)
        bench.apply_masks()
        return False

    return hook


def _drop_and_grow(weight: torch.nn.Parameter, mask: torch.Tensor, share: float) -> None:
    if weight.grad is None:
        return
    active = mask.bool()
    k = int(share * int(active.sum()))
    if k == 0 or int((~active).sum()) < k:
        return
    flat_mask = mask.view(-1)
    weakest = torch.where(active, weight.detach().abs(), torch.inf).view(-1).topk(k, largest=False)
    flat_mask[weakest.indices] = 0.0
    # grown among all inactive weights, the just-dropped included (as in RigL)
    growth = torch.where(flat_mask.view_as(mask).bool(), -torch.inf, weight.grad.abs())
    growth = growth.view(-1).topk(k)
    flat_mask[growth.indices] = 1.0
    with torch.no_grad():
        weight.view(-1)[growth.indices] = 0.0  # regrown connections start from zero


# --------------------------------------------------------------------------- records


def layer_report(bench: Workbench, plan: CompressionPlan) -> None:
    """Per layer: sparsity reached, channels kept of the original, saliency used."""
    sparsity, channels = {}, {}
    for name, m in prunable_layers(bench.model).items():
        width, numel = bench.original[name]
        kept = int((m.weight != 0).sum())
        sparsity[name] = round(1.0 - kept / numel, 4)
        channels[name] = [int(m.weight.shape[0]), width]
    bench.records["layer_sparsity"] = sparsity
    bench.records["layer_channels"] = channels
    bench.records["saliency"] = plan.prune.saliency if plan.prune.active else None


# --------------------------------------------------------------------------- the file


def _replay(model: torch.nn.Module, history: list[list[Any]], example: Inputs) -> None:
    """Remove the same channels from a fresh copy of the architecture."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=call)
    graph.load_pruning_history([tuple(h) for h in history])


# the key is the file format's since its first version
REBUILD = Rebuild(
    "pruning_history", "channel removal", lambda bench: bench.pruning_history, _replay
)

register("prune", Stage.STRUCTURE, report=layer_report, rebuild=REBUILD)(prune)
