"""Quantization-aware fine-tuning: the fine-tuning forward pass sees quantized weights.

Each quantized layer's weight enters the forward pass as ``w + (q(w) - w).detach()``: the
value is the quantized weight the deployed model will have, the gradient flows to the
float weight unchanged (the straight-through estimator), and the optimizer keeps
updating the float weights. The grid is recomputed from the current weights at every
step, so it follows them, and channel removal during gradual pruning needs no special
care. The final codes are taken by the quantize technique after fine-tuning, with the
same rule. Activations are not fake-quantized: their int8 scales are calibrated on the
deployed graph afterwards, and the trial measures the gap that leaves.
"""

from __future__ import annotations

import torch
from torch import nn

from paretoopt.compress.techniques import Stage, register
from paretoopt.compress.techniques.bench import Workbench, prunable_layers
from paretoopt.compress.techniques.quantize import fake_quantize
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan


def straight_through(model: nn.Module, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Every quantized layer's weight, quantized in value and identity in gradient."""
    out = {}
    for name, layer in prunable_layers(model).items():
        bits = cfg.layer(name)
        if bits < 32:
            w = layer.weight
            out[f"{name}.weight"] = w + (fake_quantize(w.detach(), cfg, bits) - w.detach())
    return out


@register("qat", Stage.TRAINING_SETUP)
def qat(bench: Workbench, plan: CompressionPlan) -> None:
    if plan.quant.method != "qat" or plan.quant.grid == "kmeans":  # kmeans: see cluster
        return  # the plan has checked that fine-tuning follows
    bench.weight_view = lambda model: straight_through(model, plan.quant)
