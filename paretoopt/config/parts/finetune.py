"""Fine-tuning: the epochs and learning rate that recover accuracy after compression.
Its epochs are drawn before every other part (``search/sampling``), since most knobs
matter only with fine-tuning; run by ``compress/train``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paretoopt.config.knobs import Fixed, Knob, Range, setting, suggest
from paretoopt.config.parts import Drawing, Part, register, require


@dataclass(frozen=True)
class FinetuneSpace:
    epochs: Knob = setting(
        Fixed(2), "fine-tuning epochs after pruning", kind=int, low=0, high=10_000, knob=True
    )
    lr: Knob = setting(
        Range(1e-4, 3e-3, log=True),
        "Adam learning rate of fine-tuning",
        kind=float,
        low=1e-8,
        high=1.0,
        knob=True,
    )
    batch_size: int = setting(64, "fine-tuning batch size", kind=int, low=1, high=65_536)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.epochs >= 0, f"finetune.epochs: must be >= 0, got {self.epochs}")
        require(self.lr > 0, f"finetune.lr: must be > 0, got {self.lr}")
        require(self.batch_size >= 1, f"finetune.batch_size: must be >= 1, got {self.batch_size}")


def draw(d: Drawing) -> FinetuneConfig:
    f = d.section("finetune")
    lr = float(suggest(d.trial, "finetune.lr", f.lr)) if d.epochs else 1e-3
    return FinetuneConfig(d.epochs, lr, f.batch_size)


def describe(plan: Mapping[str, Any]) -> str:
    """e.g. "ft 2ep", "ft 2ep, KD T=4.0 a=0.50" (distillation only acts in fine-tuning)."""
    epochs, kd = plan["finetune"].epochs, plan["distill"]
    if not epochs:
        return ""
    text = f"ft {epochs}ep"
    return text + (f", KD T={kd.temperature:.1f} a={kd.alpha:.2f}" if kd.alpha > 0 else "")


PART = register(
    Part(
        name="finetune",
        section="finetune",
        doc="fine-tuning knobs",
        settings=FinetuneSpace,
        config=FinetuneConfig,
        draw=draw,
        draw_order=3,
        changes_model=lambda cfg: cfg.epochs > 0,
        describe=describe,
    )
)
