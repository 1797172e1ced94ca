"""Low-rank factorization: each Linear and convolution becomes thinner layers in sequence.

A Linear layer W (out x in) of rank r becomes ``Linear(in, r) -> Linear(r, out)`` with the
truncated SVD split evenly, ``W ~ (U sqrt(S)) (sqrt(S) V^T)``; a convolution with a 1x1
(or length-1) kernel the same, as two 1x1 convolutions. A KxK convolution becomes
``1x1 (in -> r_in) -> KxK (r_in -> r_out) -> 1x1 (r_out -> out)``: Tucker-2 by the higher-
order SVD, the input and output modes projected on their leading singular vectors and the
core kept in between (Kim et al. 2016). With ``conv: spatial`` a KxK convolution becomes
``Kx1 (in -> r) -> 1xK (r -> out)`` instead: the weight as a (in*K) x (out*K) matrix of
its rows against its columns, split by its truncated SVD (Jaderberg et al. 2014); the
first takes the vertical stride, padding and dilation, the second the horizontal ones.
At full rank each reproduces the layer exactly (up to float rounding). Grouped and
depthwise convolutions, the output layer and a layer whose factors would hold as many
weights as itself are kept whole: those gain nothing.

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


def kind_for(layer: nn.Module, conv: str = "tucker2") -> str:
    """How `layer` is factorized: svd (a matrix-like layer), tucker2, or spatial (a 2-D
    convolution with zero padding given in numbers and a kernel of at least 2 both ways;
    others take tucker2)."""
    k = kernel(layer)
    if math.prod(k) == 1:
        return "svd"
    spatial = (
        conv == "spatial"
        and len(k) == 2
        and min(k) > 1
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
    )
    return "spatial" if spatial else "tucker2"


def full_ranks(layer: nn.Module, kind: str | None = None) -> tuple[int, ...]:
    """The most rank each factor can keep: (min(out, in),) for a matrix-like layer, the
    ranks of the input and output unfoldings for Tucker-2, that of the rows-by-columns
    matrix for a spatial split."""
    out, inp, k = layer.weight.shape[0], layer.weight.shape[1], math.prod(kernel(layer))
    kind = kind or kind_for(layer)
    if kind == "svd":
        return (min(out, inp),)
    if kind == "spatial":
        height, width = kernel(layer)
        return (min(inp * height, out * width),)
    return (min(inp, out * k), min(out, inp * k))


def factored_size(layer: nn.Module, ranks: tuple[int, ...], kind: str | None = None) -> int:
    """Weights of the factors (biases aside)."""
    out, inp, k = layer.weight.shape[0], layer.weight.shape[1], math.prod(kernel(layer))
    kind = kind or kind_for(layer)
    if kind == "svd":
        return ranks[0] * (inp + out)
    if kind == "spatial":
        height, width = kernel(layer)
        return ranks[0] * (inp * height + out * width)
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


def _rows_by_columns(weight: torch.Tensor) -> torch.Tensor:
    """A 2-D convolution weight (out, in, kh, kw) as the (in*kh) x (out*kw) matrix whose
    rank-r split is a Kx1 then a 1xK convolution with r channels between."""
    return weight.permute(1, 2, 0, 3).reshape(weight.shape[1] * weight.shape[2], -1)


def plan_ranks(
    layer: nn.Module, cfg: LowRankConfig, share: float, kind: str | None = None
) -> tuple[int, ...]:
    """The ranks the plan gives `layer`: one for an SVD or a spatial split, (r_in, r_out)
    for Tucker-2."""
    w = layer.weight.detach().double()
    kind = kind or kind_for(layer)
    if kind == "svd":
        values = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        return (kept_rank(values, cfg, share),)
    if kind == "spatial":
        return (kept_rank(torch.linalg.svdvals(_rows_by_columns(w)), cfg, share),)
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


def _spatial_modules(layer: nn.Module, rank: int) -> nn.Sequential:
    """Kx1 (the layer's vertical stride, padding and dilation) then 1xK (the horizontal
    ones): zero padding in two steps pads as the layer did, since the first factor has
    no bias and so maps the padded zeros to zeros."""
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    (kh, kw), out, inp = kernel(layer), layer.weight.shape[0], layer.weight.shape[1]
    return nn.Sequential(
        nn.Conv2d(inp, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False),
        nn.Conv2d(rank, out, (1, kw), (1, sw), (0, pw), (1, dw), bias=layer.bias is not None),
    )


def factor_modules(
    layer: nn.Module, ranks: tuple[int, ...], kind: str | None = None
) -> nn.Sequential:
    """The factors' modules for `ranks`, weights not yet set (the file's replay)."""
    out, inp = layer.weight.shape[0], layer.weight.shape[1]
    bias = layer.bias is not None
    kind = kind or kind_for(layer)
    if kind == "spatial":
        return _spatial_modules(layer, ranks[0])
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


def factorize(layer: nn.Module, ranks: tuple[int, ...], kind: str | None = None) -> nn.Sequential:
    """`layer` as its rank-`ranks` factors, weights set from its own (SVD, Tucker-2 or
    the spatial split)."""
    kind = kind or kind_for(layer)
    factors = factor_modules(layer, ranks, kind)
    w = layer.weight.detach().double()
    ones = (1,) * (w.dim() - 2)
    with torch.no_grad():
        if kind == "spatial":
            (r,), (out, inp, kh, kw) = ranks, w.shape
            u, s, vh = torch.linalg.svd(_rows_by_columns(w), full_matrices=False)
            root = s[:r].sqrt()
            vertical = (u[:, :r] * root).T.reshape(r, inp, kh, 1)
            horizontal = (root[:, None] * vh[:r]).reshape(r, out, kw).permute(1, 0, 2)
            weights = [vertical, horizontal.reshape(out, r, 1, kw)]
        elif len(ranks) == 1:
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


# --------------------------------------------------------------------------- the technique


def lowrank(bench: Workbench, plan: CompressionPlan) -> None:
    """Replace every eligible layer by its factors where they are smaller than it."""
    cfg = plan.lowrank
    if not cfg.active:
        return
    kept: dict[str, dict[str, Any]] = {}
    for name, layer in eligible(bench.model, bench.classifier).items():
        kind = kind_for(layer, cfg.conv)
        ranks = plan_ranks(layer, cfg, cfg.share(name), kind)
        if factored_size(layer, ranks, kind) >= layer.weight.numel():
            continue  # no smaller than the layer: nothing to gain
        factors = factorize(layer, ranks, kind)
        _replace(bench.model, name, factors)
        for i, factor in enumerate(factors):
            bench.original[f"{name}.{i}"] = (int(factor.weight.shape[0]), factor.weight.numel())
        full = list(full_ranks(layer, kind))
        kept[name] = {"kind": kind, "ranks": list(ranks), "full": full}
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
        named = entry.get("kind") if isinstance(entry, dict) else None
        kinds = {kind_for(layer), kind_for(layer, "spatial")}  # what this layer can take
        if named not in kinds:
            raise ValueError(f"layer {name!r}: takes a {' or '.join(sorted(kinds))}, got {entry}")
        full = full_ranks(layer, named)
        if len(ranks) != len(full):
            raise ValueError(f"layer {name!r}: a {named} needs {len(full)} rank(s), got {entry}")
        for r, most in zip(ranks, full, strict=True):
            if type(r) is not int or not 1 <= r <= most:  # never allocate what cannot be
                raise ValueError(f"layer {name!r}: rank {r!r} is not in 1..{most}")
        _replace(model, name, factor_modules(layer, ranks, named))


REBUILD = Rebuild("factorization", "low-rank factorization", _store, _replay)

register("lowrank", Stage.STRUCTURE, report=layer_report, rebuild=REBUILD)(lowrank)
