"""Low-rank factorization: each Linear and convolution becomes thinner layers in sequence.

A Linear layer W (out x in) of rank r becomes ``Linear(in, r) -> Linear(r, out)`` with the
truncated SVD split evenly, ``W ~ (U sqrt(S)) (sqrt(S) V^T)``; a convolution with a 1x1
(or length-1) kernel the same, as two 1x1 convolutions. A KxK convolution becomes
``1x1 (in -> r_in) -> KxK (r_in -> r_out) -> 1x1 (r_out -> out)``: Tucker-2 by the higher-
order SVD, the input and output modes projected on their leading singular vectors and the
core kept in between (Kim et al. 2016). At full rank both reproduce the layer exactly (up
to float rounding). Grouped and depthwise convolutions, the output layer and a layer whose
factors would hold as many weights as itself are kept whole: those gain nothing.

The factors replace the layer in place (an ``nn.Sequential`` under the layer's own name,
so ``fc1`` becomes ``fc1.0`` and ``fc1.1``) before anything else: pruning then acts on
the factors (masks on their weights, or channels removed, the inner rank included), and
they are fine-tuned like any other layer; pruning budgets and bit-widths of a layer
apply to its factors. The compressed file keeps each factorized layer's kind and ranks,
and a fresh copy of the architecture is rebuilt with the same shapes before the weights
are loaded. Whether fewer multiply-accumulates make the deployed model faster is measured,
not assumed: the runtime's latency says so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from paretoopt.compress.techniques import Rebuild, Stage, register
from paretoopt.compress.techniques.bench import Workbench, prunable_layers
from paretoopt.config.parts.lowrank import LowRankConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.errors import TrialError
from paretoopt.workload.inputs import call

CONVS = {1: nn.Conv1d, 2: nn.Conv2d}


def kernel(layer: nn.Module) -> tuple[int, ...]:
    """The layer's kernel size (() for a Linear layer)."""
    return tuple(layer.weight.shape[2:])


def full_ranks(layer: nn.Module) -> tuple[int, ...]:
    """The most rank each factor can keep: (min(out, in),) for a matrix-like layer, the
    ranks of the input and output unfoldings for a KxK convolution."""
    out, inp, k = layer.weight.shape[0], layer.weight.shape[1], math.prod(kernel(layer))
    if k == 1:
        return (min(out, inp),)
    return (min(inp, out * k), min(out, inp * k))


def factored_size(layer: nn.Module, ranks: tuple[int, ...]) -> int:
    """Weights of the factors (biases aside)."""
    out, inp, k = layer.weight.shape[0], layer.weight.shape[1], math.prod(kernel(layer))
    if len(ranks) == 1:
        return ranks[0] * (inp + out)
    r_in, r_out = ranks
    return inp * r_in + r_in * r_out * k + r_out * out


# --------------------------------------------------------------------------- ranks


def kept_rank(values: torch.Tensor, cfg: LowRankConfig, share: float) -> int:
    """How many of the singular values `values` (descending) a factor keeps: `share` of
    them, or the least count holding `cfg.energy` of their squares."""
    if cfg.criterion == "energy":
        energy = values.double().square().cumsum(0)
        total = float(energy[-1])
        if total == 0.0:
            return 1
        return min(
            int(torch.searchsorted(energy, cfg.energy * total * (1 - 1e-12))) + 1, len(values)
        )
    return max(1, min(math.ceil(share * len(values)), len(values)))


def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-`mode` unfolding of a convolution weight (0: outputs, 1: inputs)."""
    return weight.transpose(0, mode).reshape(weight.shape[mode], -1)


def plan_ranks(layer: nn.Module, cfg: LowRankConfig, share: float) -> tuple[int, ...]:
    """The ranks the plan gives `layer`: one for an SVD, (r_in, r_out) for Tucker-2."""
    w = layer.weight.detach().double()
    if math.prod(kernel(layer)) == 1:
        values = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        return (kept_rank(values, cfg, share),)
    return tuple(kept_rank(torch.linalg.svdvals(_unfold(w, mode)), cfg, share) for mode in (1, 0))


# --------------------------------------------------------------------------- factors


def _linear_like(layer: nn.Module, inp: int, out: int, bias: bool, first: bool) -> nn.Module:
    """A Linear layer, or a 1x1 convolution of the layer's dimension (`first` takes the
    layer's stride, padding and dilation: a 1x1 kernel commutes with zero padding)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(inp, out, bias=bias)
    conv = CONVS[layer.weight.dim() - 2]
    if not first:
        return conv(inp, out, 1, bias=bias)
    return conv(
        inp,
        out,
        1,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=bias,
        padding_mode=layer.padding_mode,
    )


def factor_modules(layer: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
    """The factors' modules for `ranks`, weights not yet set (the file's replay)."""
    out, inp = layer.weight.shape[0], layer.weight.shape[1]
    bias = layer.bias is not None
    if len(ranks) == 1:
        (r,) = ranks
        return nn.Sequential(
            _linear_like(layer, inp, r, False, True), _linear_like(layer, r, out, bias, False)
        )
    r_in, r_out = ranks
    core = CONVS[layer.weight.dim() - 2](
        r_in,
        r_out,
        kernel(layer),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=False,
        padding_mode=layer.padding_mode,
    )
    return nn.Sequential(
        _linear_like(layer, inp, r_in, False, False),
        core,
        _linear_like(layer, r_out, out, bias, False),
    )


def factorize(layer: nn.Module, ranks: tuple[int, ...]) -> nn.Sequential:
    """`layer` as its rank-`ranks` factors, weights set from its own (SVD or Tucker-2)."""
    factors = factor_modules(layer, ranks)
    w = layer.weight.detach().double()
    ones = (1,) * (w.dim() - 2)
    with torch.no_grad():
        if len(ranks) == 1:
            u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
            root = s[: ranks[0]].sqrt()
            first = root[:, None] * vh[: ranks[0]]
            second = u[:, : ranks[0]] * root[None, :]
            weights = [first.reshape(*first.shape, *ones), second.reshape(*second.shape, *ones)]
        else:
            r_in, r_out = ranks
            u_in = torch.linalg.svd(_unfold(w, 1), full_matrices=False)[0][:, :r_in]
            u_out = torch.linalg.svd(_unfold(w, 0), full_matrices=False)[0][:, :r_out]
            core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)
            weights = [u_in.T.reshape(r_in, -1, *ones), core, u_out.reshape(-1, r_out, *ones)]
        for module, value in zip(factors, weights, strict=True):
            module.weight.copy_(value.to(module.weight.dtype))
        if layer.bias is not None:
            factors[-1].bias.copy_(layer.bias.detach())
    return factors.to(layer.weight.device)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def eligible(model: nn.Module, classifier: str) -> dict[str, nn.Module]:
    """The layers that can be factorized: not the output layer, not grouped, and not the
    output projection of an attention module (which reads its weight directly)."""
    owned = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return {
        name: layer
        for name, layer in prunable_layers(model).items()
        if name != classifier and getattr(layer, "groups", 1) == 1 and id(layer) not in owned
    }


def kind_of(ranks: tuple[int, ...] | list[int]) -> str:
    """An SVD keeps one rank, Tucker-2 two."""
    return "svd" if len(ranks) == 1 else "tucker2"


# --------------------------------------------------------------------------- the technique


def lowrank(bench: Workbench, plan: CompressionPlan) -> None:
    """Replace every eligible layer by its factors where they are smaller than it."""
    cfg = plan.lowrank
    if not cfg.active:
        return
    kept: dict[str, dict[str, Any]] = {}
    for name, layer in eligible(bench.model, bench.classifier).items():
        ranks = plan_ranks(layer, cfg, cfg.share(name))
        if factored_size(layer, ranks) >= layer.weight.numel():
            continue  # no smaller than the layer: nothing to gain
        factors = factorize(layer, ranks)
        _replace(bench.model, name, factors)
        for i, factor in enumerate(factors):
            bench.original[f"{name}.{i}"] = (int(factor.weight.shape[0]), factor.weight.numel())
        full = list(full_ranks(layer))
        kept[name] = {"kind": kind_of(ranks), "ranks": list(ranks), "full": full}
    bench.factorized = kept
    _check_forward(bench)


def _check_forward(bench: Workbench) -> None:
    """A model that reads a replaced layer's weight itself cannot be factorized."""
    try:
        with torch.no_grad():
            call(bench.model.eval(), bench.example)
    except Exception as exc:
        raise TrialError(
            f"low-rank factorization: the factorized model does not run "
            f"({type(exc).__name__}: {exc}); the model may read a layer's weight directly. "
            "Set space.lowrank.rank: 1 for this model"
        ) from exc


def layer_report(bench: Workbench, plan: CompressionPlan) -> None:
    """Per factor layer, the rank it carries and the most it could carry ([kept, full]),
    read from the factors as they end (channel pruning may narrow the rank too): an SVD's
    two factors both carry r; Tucker-2's first carries r_in, the others r_out."""
    ranks: dict[str, list[int]] = {}
    layers = prunable_layers(bench.model)
    for name, entry in bench.factorized.items():
        inner = [int(layers[f"{name}.{i}"].weight.shape[0]) for i in range(len(entry["full"]))]
        pairs = list(zip(inner, entry["full"], strict=True))
        for i, pair in enumerate(pairs + pairs[-1:]):  # the last factor carries the last rank
            ranks[f"{name}.{i}"] = list(pair)
    bench.records["layer_rank"] = ranks


# --------------------------------------------------------------------------- the file


MAX_FACTORIZED = 100_000  # entries a file may name: more is a damaged or hostile file


def _store(bench: Workbench) -> dict[str, Any]:
    return {n: {"kind": e["kind"], "ranks": e["ranks"]} for n, e in bench.factorized.items()}


def _replay(model: nn.Module, kept: Any, example: Any) -> None:
    """Give a fresh copy of the architecture the factors' shapes (weights load after)."""
    if not isinstance(kept, dict) or len(kept) > MAX_FACTORIZED:
        raise ValueError(f"not a mapping of layers to ranks: {type(kept).__name__}")
    layers = prunable_layers(model)
    for name, entry in kept.items():
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"it names layer {name!r}, which the model does not have")
        ranks = tuple(entry.get("ranks", ())) if isinstance(entry, dict) else ()
        full = full_ranks(layer)
        kind = kind_of(full)
        if entry.get("kind") != kind or len(ranks) != len(full):
            raise ValueError(f"layer {name!r}: a {kind} needs {len(full)} rank(s), got {entry}")
        for r, most in zip(ranks, full, strict=True):
            if type(r) is not int or not 1 <= r <= most:  # never allocate what cannot be
                raise ValueError(f"layer {name!r}: rank {r!r} is not in 1..{most}")
        _replace(model, name, factor_modules(layer, ranks))


REBUILD = Rebuild("factorization", "low-rank factorization", _store, _replay)

register("lowrank", Stage.STRUCTURE, report=layer_report, rebuild=REBUILD)(lowrank)
