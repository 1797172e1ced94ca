"""Lossless coding of the compressed file: Deep Compression's third stage. The stored
codes, masks and weights of each layer are entropy-coded (LZMA) where that makes them
smaller; the size objective counts the coded file, the one a user ships, and the loader
decodes it bit-exactly. Applied by ``compress/artifact``; it changes the file, never the
model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paretoopt.config.knobs import setting
from paretoopt.config.parts import Drawing, Part, register, require

METHODS = ("none", "lzma")


@dataclass(frozen=True)
class CodingSpace:
    method: str = setting(
        "none",
        "lossless coding of the compressed file's tensors: none, or lzma (each stored "
        "array coded where that makes it smaller; the size objective counts the coded file)",
        kind=str,
        options=METHODS,
    )


@dataclass(frozen=True)
class CodingConfig:
    method: str = "none"

    def __post_init__(self) -> None:
        require(
            self.method in METHODS,
            f"coding.method: {self.method!r} is not supported; choose from {', '.join(METHODS)}",
        )

    @property
    def active(self) -> bool:
        return self.method != "none"


def draw(d: Drawing) -> CodingConfig:
    # never searched: coding only ever makes the file smaller, at no cost to the model
    return CodingConfig(d.section("coding").method)


def describe(plan: Mapping[str, Any]) -> str:
    return plan["coding"].method if plan["coding"].active else ""


PART = register(
    Part(
        name="coding",
        section="coding",
        doc="lossless coding of the compressed file",
        settings=CodingSpace,
        config=CodingConfig,
        draw=draw,
        draw_order=5,
        # the file changes, the model does not; the baseline's file, the reference of
        # every size ratio, stays uncoded: the float32 model as the user has it
        changes_model=lambda cfg: False,
        describe=describe,
    )
)
