"""Fine-tuning: the epochs and learning rate that recover accuracy after compression, and
the batch-level augmentation it trains with (mixup, cutmix). Its epochs are drawn before
every other part (``search/sampling``), since most knobs matter only with fine-tuning;
run by ``compress/train``."""

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
        "learning rate of fine-tuning (Adam, or the recipe's optimizer; cosine decay)",
        kind=float,
        low=1e-8,
        high=1.0,
        knob=True,
    )
    batch_size: int = setting(64, "fine-tuning batch size", kind=int, low=1, high=65_536)
    device: str = setting(
        "auto",
        "device trials fine-tune on: auto (a CUDA GPU where there is one), cpu, cuda, cuda:N; "
        "latency is measured on the target whatever this is",
        kind=str,
    )
    mixup: Knob = setting(
        Fixed(0.0),
        "mixup: each batch blended with a shuffled copy of itself, labels alike, by a weight "
        "drawn from Beta(mixup, mixup); 0 = off (real-valued inputs only)",
        kind=float,
        low=0.0,
        high=10.0,
        knob=True,
    )
    cutmix: Knob = setting(
        Fixed(0.0),
        "cutmix: a box (a segment of a 1-D signal) of a shuffled copy pasted into each "
        "batch, labels weighted by its area, drawn from Beta(cutmix, cutmix); 0 = off "
        "(one real-valued input with spatial dimensions)",
        kind=float,
        low=0.0,
        high=10.0,
        knob=True,
    )


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    mixup: float = 0.0  # Beta parameter; 0 = off
    cutmix: float = 0.0  # Beta parameter; 0 = off (with both on, each batch takes one)

    def __post_init__(self) -> None:
        require(self.epochs >= 0, f"finetune.epochs: must be >= 0, got {self.epochs}")
        require(self.lr > 0, f"finetune.lr: must be > 0, got {self.lr}")
        require(self.batch_size >= 1, f"finetune.batch_size: must be >= 1, got {self.batch_size}")
        for key in ("mixup", "cutmix"):
            value = getattr(self, key)
            require(value >= 0, f"finetune.{key}: must be >= 0 (0 = off), got {value}")


def draw(d: Drawing) -> FinetuneConfig:
    f = d.section("finetune")
    if not d.epochs:
        return FinetuneConfig(0, 1e-3, f.batch_size)
    lr = float(suggest(d.trial, "finetune.lr", f.lr))
    mixup = float(suggest(d.trial, "finetune.mixup", f.mixup))
    cutmix = float(suggest(d.trial, "finetune.cutmix", f.cutmix))
    return FinetuneConfig(d.epochs, lr, f.batch_size, mixup, cutmix)


def describe(plan: Mapping[str, Any]) -> str:
    """e.g. "ft 2ep", "ft 2ep mixup 0.2, KD T=4.0 a=0.50" (distillation and augmentation
    only act in fine-tuning)."""
    ft, kd = plan["finetune"], plan["distill"]
    if not ft.epochs:
        return ""
    text = f"ft {ft.epochs}ep" + "".join(
        f" {key} {getattr(ft, key):g}" for key in ("mixup", "cutmix") if getattr(ft, key) > 0
    )
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
