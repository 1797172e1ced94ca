"""Compression techniques, one module each, registered with the stage they run in.

A technique is a ``Technique``: a name, a stage, ``apply(bench, plan)`` and, where it
records something per layer once every technique has run, ``report(bench, plan)``. One
that changes the architecture (not just the weights) also says what the compressed file
must keep to rebuild it (``Rebuild``: ``store`` on writing, ``replay`` on a fresh copy of
the architecture before the weights are loaded). The pipeline runs the registered
techniques by stage: structure changes first (low-rank factorization, then pruning, which
acts on the factors), then what fine-tuning needs set up (quantization-aware training installs
the quantized weight view, weight clustering its shared values), then fine-tuning with
distillation (which repairs what pruning broke while masks hold), then weight
quantization (on the fine-tuned weights). A new technique is a module that registers
itself, plus its name in ``BUILTIN``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from torch import nn

from paretoopt.compress.techniques.bench import Workbench
from paretoopt.config.plan import CompressionPlan

Step = Callable[[Workbench, CompressionPlan], None]


@dataclass(frozen=True)
class Rebuild:
    """How the compressed file rebuilds a technique's architecture change."""

    key: str  # the file's metadata entry (JSON)
    what: str  # what it replays, for messages: "channel removal"
    store: Callable[[Workbench], Any]  # what to keep; empty: nothing to replay
    replay: Callable[[nn.Module, Any, Any], None]  # (model, kept, example inputs)


class Stage(IntEnum):
    """When a technique runs; techniques of one stage run in the order they registered."""

    STRUCTURE = 10  # shapes and masks: pruning
    TRAINING_SETUP = 20  # what fine-tuning sees: the QAT weight view
    FINETUNE = 30  # fine-tuning, with distillation
    WEIGHTS = 40  # the fine-tuned weights rewritten: quantization


@dataclass(frozen=True)
class Technique:
    name: str
    stage: Stage
    apply: Step
    report: Step | None = None  # per-layer records, once every technique has run
    rebuild: Rebuild | None = None  # architecture changes the compressed file replays

    def __call__(self, bench: Workbench, plan: CompressionPlan) -> None:
        self.apply(bench, plan)


TECHNIQUES: dict[str, Technique] = {}
BUILTIN = ("lowrank", "prune", "qat", "cluster", "distill", "quantize")  # modules of this package


def register(
    name: str, stage: Stage, report: Step | None = None, rebuild: Rebuild | None = None
) -> Callable[[Step], Technique]:
    """Register `apply` as the technique `name`, run at `stage`."""

    def decorator(fn: Step) -> Technique:
        if name in TECHNIQUES:
            raise ValueError(f"technique {name!r} is registered twice")
        keys = {t.rebuild.key for t in TECHNIQUES.values() if t.rebuild is not None}
        if rebuild is not None and rebuild.key in keys:
            raise ValueError(f"technique {name!r}: rebuild key {rebuild.key!r} is taken")
        TECHNIQUES[name] = Technique(name, stage, fn, report, rebuild)
        return TECHNIQUES[name]

    return decorator


def ordered() -> list[Technique]:
    """Every registered technique, in the order a plan applies them."""
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")  # registers it
    return sorted(TECHNIQUES.values(), key=lambda t: t.stage)  # stable: registration order


def apply_plan(bench: Workbench, plan: CompressionPlan) -> None:
    """Run every technique of the plan on the bench's model, in order, then let each
    record what it did per layer."""
    techniques = ordered()
    for technique in techniques:
        bench.timed(technique.name, technique, bench, plan)
    for technique in techniques:
        if technique.report is not None:
            technique.report(bench, plan)


ORDER = tuple(t.name for t in ordered())


def rebuilds() -> list[Rebuild]:
    """The architecture changes a compressed file keeps, in the order they replay."""
    return [t.rebuild for t in ordered() if t.rebuild is not None]


__all__ = [
    "ORDER",
    "TECHNIQUES",
    "Rebuild",
    "Stage",
    "Technique",
    "Workbench",
    "apply_plan",
    "rebuilds",
    "register",
]
