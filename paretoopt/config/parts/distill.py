"""Knowledge distillation: the baseline teaches the compressed model during fine-tuning
(Hinton et al.: a temperature-softened teacher, mixed with the labels by alpha). Applied by
``compress/techniques/distill``."""

from __future__ import annotations

from dataclasses import dataclass

from paretoopt.config.knobs import Knob, Range, setting, suggest
from paretoopt.config.parts import Drawing, Part, register, require


@dataclass(frozen=True)
class DistillationSpace:
    temperature: Knob = setting(
        Range(1.0, 8.0),
        "softmax temperature of the teacher",
        kind=float,
        low=0.1,
        high=100.0,
        knob=True,
    )
    alpha: Knob = setting(
        Range(0.0, 0.9),
        "weight of the distillation loss; 0 = plain fine-tuning",
        kind=float,
        low=0.0,
        high=1.0,
        knob=True,
    )


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"distill.temperature: must be > 0, got {self.temperature}")
        require(
            0.0 <= self.alpha <= 1.0, f"distill.alpha: 0 <= alpha <= 1 must hold, got {self.alpha}"
        )


def draw(d: Drawing) -> DistillConfig:
    k = d.section("distill")
    alpha = float(suggest(d.trial, "distill.alpha", k.alpha)) if d.epochs else 0.0
    temperature = float(suggest(d.trial, "distill.temperature", k.temperature)) if alpha else 1.0
    return DistillConfig(temperature, alpha)


PART = register(
    Part(
        name="distill",
        section="distillation",
        doc="distillation knobs",
        settings=DistillationSpace,
        config=DistillConfig,
        draw=draw,
        draw_order=0,
        # a loss of fine-tuning, not a change of the model: its words are fine-tuning's
        changes_model=lambda cfg: False,
    )
)
