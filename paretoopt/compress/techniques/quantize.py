"""Weight quantization of every Conv and Linear layer (post-training, after fine-tuning).

2-8 bits: integer codes on a min-max grid, per output channel or per tensor, affine (a zero
point, so that 0.0 stays exactly 0.0 and pruned weights stay pruned) or symmetric, each
weight rounded to its nearest code, or (``method: gptq``) on the same grid with every
column's rounding error compensated in the columns after it (see ``surgeon``). The
model keeps the dequantized values, which are bit-for-bit what the artifact decodes to;
the codes go to the artifact, packed. 16 bits: float16 or bfloat16 rounding. 32 bits:
untouched. Each layer takes its own width under mixed precision (``layer_bits``).

Activations are not touched here: int8 activations are calibrated when the model is
converted for its runtime (``paretoopt.measure.int8``), because their scales belong to the
deployed graph, not to the weights.
"""

from __future__ import annotations

import torch

from paretoopt.compress.techniques import Stage, register
from paretoopt.compress.techniques.bench import Workbench, prunable_layers
from paretoopt.compress.techniques.cluster import cluster_tensor, keeps_zero
from paretoopt.compress.techniques.qtensor import QTensor
from paretoopt.compress.techniques.surgeon import input_hessians, operable, surgeon_codes
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.errors import PlanError

HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def quantize_tensor(w: torch.Tensor, cfg: QuantConfig, bits: int | None = None) -> QTensor:
    """Codes on the min-max grid of `bits` (the plan's width unless given)."""
    bits = cfg.bits if bits is None else bits
    levels = 2**bits - 1
    flat = (
        w.detach().reshape(w.shape[0], -1)
        if cfg.granularity == "per_channel"
        else w.detach().reshape(1, -1)
    )
    if is_symmetric(cfg, bits):
        qmax = 2 ** (bits - 1) - 1
        amax = flat.abs().max(dim=1).values
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zp = torch.full_like(scale, float(2 ** (bits - 1)))
        codes = torch.round(flat / scale[:, None]).clamp(-qmax, qmax) + zp[:, None]
    else:
        lo = flat.min(dim=1).values.clamp(max=0.0)
        hi = flat.max(dim=1).values.clamp(min=0.0)
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-lo / scale).clamp(0, levels)
        codes = (torch.round(flat / scale[:, None]) + zp[:, None]).clamp(0, levels)
    return QTensor(
        codes.reshape(w.shape).long(), scale.float().contiguous(), zp.long().contiguous(), bits
    )


def is_symmetric(cfg: QuantConfig, bits: int) -> bool:
    """Whether a layer of this width gets the symmetric grid."""
    # int8 kernels take weights without a zero point: 8-bit codes must sit around zero
    return cfg.scheme == "symmetric" or (cfg.activations == "int8" and bits == 8)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig, bits: int) -> torch.Tensor:
    """The weight as the deployed model will see it, without a gradient of its own."""
    if bits == 32:
        return w
    if bits == 16:
        return w.to(HALF_DTYPES[cfg.half_type]).float()
    return quantize_tensor(w, cfg, bits).dequantize()


def _surgeon_rounded(
    bench: Workbench, cfg: QuantConfig, name: str, layer: torch.nn.Module, grid: QTensor
) -> QTensor:
    """The layer's codes by GPTQ on `grid`, from the inputs it sees in the model as
    quantized so far (the layers before it already hold their codes), on the training
    split's first `calibration_samples`. A layer OBS cannot take (grouped, or never
    reached by a hook) keeps round-to-nearest."""
    hessian = input_hessians(
        bench.model, {name: layer}, bench.splits.train, cfg.calibration_samples
    )
    if not operable(layer, hessian[name]):
        return grid
    weight = layer.weight.reshape(len(layer.weight), -1)
    mask = bench.masks.get(f"{name}.weight")
    keep = None if mask is None else mask.reshape(weight.shape).bool().to(weight.device)
    bits = grid.bits
    symmetric = is_symmetric(cfg, bits)
    qmax = 2 ** (bits - 1) - 1
    span = (2 ** (bits - 1) - qmax, 2 ** (bits - 1) + qmax) if symmetric else (0, 2**bits - 1)
    codes = surgeon_codes(
        weight, hessian[name].to(weight.device), grid.scale, grid.zero_point, span, keep
    )
    codes = codes.reshape(layer.weight.shape).to(grid.codes.device)
    return QTensor(codes, grid.scale, grid.zero_point, bits)


def _within(layer: str, name: str) -> bool:
    return layer == name or layer.startswith(f"{name}.")


@register("quantize", Stage.WEIGHTS)
def quantize(bench: Workbench, plan: CompressionPlan) -> None:
    cfg = plan.quant
    if not cfg.active:
        return
    layers = prunable_layers(bench.model)
    # a factorized layer's name is the prefix of its factors' (fc1 of fc1.0 and fc1.1)
    unknown = sorted(n for n in cfg.layer_bits if not any(_within(m, n) for m in layers))
    if unknown:
        raise PlanError(
            f"quant.layer_bits: names {unknown} that the model does not have; its layers: "
            f"{', '.join(layers)}"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            param, bits = f"{name}.weight", cfg.layer(name)
            if bits <= 8 and cfg.grid == "kmeans":  # shared values (weight clustering)
                fixed = bench.clusters.get(param)
                fixed = None if fixed is None else fixed.cpu()  # fine-tuned on a GPU, maybe
                q = cluster_tensor(layer.weight, cfg, bits, keeps_zero(bench, param), fixed)
                bench.quantized[param] = q
                layer.weight.copy_(q.dequantize())
            elif bits <= 8:
                q = quantize_tensor(layer.weight, cfg, bits)
                if cfg.method == "gptq":  # the same grid, codes chosen by OBS
                    q = _surgeon_rounded(bench, cfg, name, layer, q)
                bench.quantized[param] = q
                layer.weight.copy_(q.dequantize())
            elif bits == 16:
                bench.halved[param] = cfg.half_type
                layer.weight.copy_(fake_quantize(layer.weight, cfg, bits))
    bench.records["layer_bits"] = {n: cfg.layer(n) for n in layers}
