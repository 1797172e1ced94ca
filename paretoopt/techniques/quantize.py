"""Weight quantization of every Conv and Linear layer (post-training, after fine-tuning).

2-8 bits: integer codes on a min-max grid, per output channel or per tensor, affine (a zero
point, so that 0.0 stays exactly 0.0 and pruned weights stay pruned) or symmetric. The
model keeps the dequantized values, which are bit-for-bit what the artifact decodes to;
the codes go to the artifact, packed. 16 bits: float16 rounding. 32 bits: untouched.
"""

from __future__ import annotations

import torch

from ..plan import CompressionPlan, QuantConfig
from . import register
from .bench import Workbench, prunable_layers
from .qtensor import QTensor


def quantize_tensor(w: torch.Tensor, cfg: QuantConfig) -> QTensor:
    levels = 2**cfg.bits - 1
    flat = (
        w.detach().reshape(w.shape[0], -1)
        if cfg.granularity == "per_channel"
        else w.detach().reshape(1, -1)
    )
    if cfg.scheme == "affine":
        lo = flat.min(dim=1).values.clamp(max=0.0)
        hi = flat.max(dim=1).values.clamp(min=0.0)
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-lo / scale).clamp(0, levels)
        codes = (torch.round(flat / scale[:, None]) + zp[:, None]).clamp(0, levels)
    else:
        qmax = 2 ** (cfg.bits - 1) - 1
        amax = flat.abs().max(dim=1).values
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zp = torch.full_like(scale, float(2 ** (cfg.bits - 1)))
        codes = torch.round(flat / scale[:, None]).clamp(-qmax, qmax) + zp[:, None]
    return QTensor(
        codes.reshape(w.shape).long(), scale.float().contiguous(), zp.long().contiguous(), cfg.bits
    )


@register("quantize")
def quantize(bench: Workbench, plan: CompressionPlan) -> None:
    cfg = plan.quant
    if cfg.bits == 32:
        return
    with torch.no_grad():
        for name, layer in prunable_layers(bench.model).items():
            param = f"{name}.weight"
            if cfg.bits == 16:
                layer.weight.copy_(layer.weight.half().float())
                continue
            q = quantize_tensor(layer.weight, cfg)
            bench.quantized[param] = q
            layer.weight.copy_(q.dequantize())
    bench.records["layer_bits"] = {n: cfg.bits for n in prunable_layers(bench.model)}
