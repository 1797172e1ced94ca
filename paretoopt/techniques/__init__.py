"""Compression techniques, one module each, applied in a fixed order.

A technique is a function ``apply(bench, plan)`` registered under a name. The pipeline
runs them in ``ORDER``: structure changes first (pruning), then fine-tuning with
distillation (which repairs what pruning broke while masks hold; with quantization-aware
training the forward pass sees quantized weights, installed by ``qat`` just before), then
weight quantization (on the fine-tuned weights).
"""

from __future__ import annotations

from collections.abc import Callable

from ..plan import CompressionPlan
from .bench import Workbench

Technique = Callable[[Workbench, CompressionPlan], None]
TECHNIQUES: dict[str, Technique] = {}
ORDER = ("prune", "qat", "distill", "quantize")


def register(name: str) -> Callable[[Technique], Technique]:
    def decorator(fn: Technique) -> Technique:
        if name in TECHNIQUES:
            raise ValueError(f"technique {name!r} is registered twice")
        TECHNIQUES[name] = fn
        return fn

    return decorator


def apply_plan(bench: Workbench, plan: CompressionPlan) -> None:
    """Run every technique of the plan on the bench's model, in order."""
    from . import distill, prune, qat, quantize  # noqa: F401  (registration side effect)

    for name in ORDER:
        bench.timed(name, TECHNIQUES[name], bench, plan)
    prune.layer_report(bench, plan)


__all__ = ["ORDER", "TECHNIQUES", "Workbench", "apply_plan", "register"]
