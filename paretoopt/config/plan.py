"""A compression plan: the frozen, validated recipe one trial applies to the baseline.

One config per technique; the plan is their composition. Plans hold names and numbers
only, round-trip through JSON (``to_dict``/``from_dict``, versioned) and are stored with
every trial and every artifact. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from paretoopt.config.space import (
    ACTIVATIONS,
    DISTRIBUTIONS,
    GRANULARITIES,
    HALF_TYPES,
    QUANT_METHODS,
    SALIENCIES,
    SCHEDULES,
    SCHEMES,
    STRUCTURES,
    SUPPORTED_BITS,
)
from paretoopt.errors import PlanError

PLAN_VERSION = 3  # 2: saliency, distribution, schedule, regrowth; 3: activations, qat, mixed


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


@dataclass(frozen=True)
class PruneConfig:
    structure: str = "unstructured"
    sparsity: float = 0.0
    saliency: str = "l2"
    distribution: str = "uniform"
    # per-layer multipliers (distribution per_layer); out of the hash so a plan stays hashable
    layer_scale: Mapping[str, float] = field(default_factory=dict, hash=False)
    schedule: str = "one_shot"
    gradual_steps: int = 4
    regrowth: bool = False
    regrowth_interval: int = 10
    saliency_batches: int = 4
    round_to: int = 1

    def __post_init__(self) -> None:
        for name, value, options in (
            ("structure", self.structure, STRUCTURES),
            ("saliency", self.saliency, SALIENCIES),
            ("distribution", self.distribution, DISTRIBUTIONS),
            ("schedule", self.schedule, SCHEDULES),
        ):
            _require(
                value in options,
                f"prune.{name}: {value!r} is not supported; choose from {', '.join(options)}",
            )
        _require(
            0.0 <= self.sparsity < 1.0,
            f"prune.sparsity: 0 <= sparsity < 1 must hold, but got {self.sparsity}",
        )
        for name in ("round_to", "gradual_steps", "regrowth_interval", "saliency_batches"):
            _require(
                getattr(self, name) >= 1, f"prune.{name}: must be >= 1, got {getattr(self, name)}"
            )
        _require(
            not self.regrowth or (self.structure == "unstructured" and self.schedule == "one_shot"),
            "prune.regrowth: needs structure 'unstructured' and schedule 'one_shot' "
            f"(sparsity stays constant), but got {self.structure!r}, {self.schedule!r}",
        )
        _require(
            bool(self.layer_scale) == (self.distribution == "per_layer" and self.active)
            or not self.active,
            "prune.layer_scale: given exactly when the distribution "
            f"is per_layer, but got {self.distribution!r} with "
            f"{len(self.layer_scale)} multipliers",
        )
        for name, scale in self.layer_scale.items():
            _require(scale >= 0.0, f"prune.layer_scale[{name!r}]: must be >= 0, got {scale}")

    def layer_sparsity(self, layer: str) -> float:
        """The budget of one layer: the global level scaled by its multiplier, capped."""
        return min(self.sparsity * self.layer_scale.get(layer, 1.0), 0.99)

    @property
    def active(self) -> bool:
        return self.sparsity > 0.0


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 32  # every layer's bit-width, unless layer_bits names the layer
    granularity: str = "per_channel"
    scheme: str = "affine"
    half_type: str = "float16"  # the format of 16-bit weights
    activations: str = "float"  # or "int8": static, calibrated, run in int8 kernels
    method: str = "ptq"  # or "qat": fake-quantized weights during fine-tuning
    # mixed precision: layer name -> bit-width; out of the hash so a plan stays hashable
    layer_bits: Mapping[str, int] = field(default_factory=dict, hash=False)
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        for where, bits in [("bits", self.bits)] + [
            (f"layer_bits[{n!r}]", b) for n, b in self.layer_bits.items()
        ]:
            _require(
                bits in SUPPORTED_BITS,
                f"quant.{where}: {bits} is not supported; "
                f"choose from {', '.join(map(str, SUPPORTED_BITS))}",
            )
        for name, value, options in (
            ("granularity", self.granularity, GRANULARITIES),
            ("scheme", self.scheme, SCHEMES),
            ("half_type", self.half_type, HALF_TYPES),
            ("activations", self.activations, ACTIVATIONS),
            ("method", self.method, QUANT_METHODS),
        ):
            _require(
                value in options,
                f"quant.{name}: {value!r} is not supported; choose from {', '.join(options)}",
            )
        _require(
            isinstance(self.calibration_samples, int) and self.calibration_samples >= 1,
            f"quant.calibration_samples: must be >= 1, got {self.calibration_samples}",
        )
        for name, value in (("activations", self.activations), ("method", self.method)):
            _require(
                value in ("float", "ptq") or self.integer,
                f"quant.{name}: {value!r} needs integer weights (2-8 bits), "
                f"but every layer has {sorted(self.widths)} bits",
            )

    def layer(self, name: str) -> int:
        """The bit-width of one layer."""
        return self.layer_bits.get(name, self.bits)

    @property
    def widths(self) -> set[int]:
        """Every bit-width the plan uses."""
        # `bits` counts too: it is the width of every layer that layer_bits does not name
        return set(self.layer_bits.values()) | {self.bits}

    @property
    def integer(self) -> bool:
        """Some layer is on an integer grid (2-8 bits)."""
        return min(self.widths) <= 8

    @property
    def active(self) -> bool:
        return min(self.widths) < 32

    def describe(self) -> str:
        """e.g. "fp32", "bf16", "int4 per-tensor sym", "int2-8 mixed int8-act qat"."""
        widths = sorted(self.widths)
        names = {32: "fp32", 16: "bf16" if self.half_type == "bfloat16" else "fp16"}
        if len(widths) > 1 and widths[0] > 8:
            text = "fp16/fp32 mixed"
        elif len(widths) > 1:
            text = f"int{widths[0]}-{widths[-1]} mixed"
        else:
            text = names.get(widths[0], f"int{widths[0]}")
        if self.integer:
            text += " per-tensor" if self.granularity != "per_channel" else ""
            text += " sym" if self.scheme != "affine" else ""
            text += " int8-act" if self.activations == "int8" else ""
            text += " qat" if self.method == "qat" else ""
        return text


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        _require(self.temperature > 0, f"distill.temperature: must be > 0, got {self.temperature}")
        _require(
            0.0 <= self.alpha <= 1.0, f"distill.alpha: 0 <= alpha <= 1 must hold, got {self.alpha}"
        )


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        _require(self.epochs >= 0, f"finetune.epochs: must be >= 0, got {self.epochs}")
        _require(self.lr > 0, f"finetune.lr: must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, f"finetune.batch_size: must be >= 1, got {self.batch_size}")


# plan key -> config type: what a plan holds and what its stored form names. A technique
# adds its config (a frozen dataclass whose defaults do nothing) here.
PARTS: dict[str, type] = {
    "prune": PruneConfig,
    "quant": QuantConfig,
    "distill": DistillConfig,
    "finetune": FinetuneConfig,
}


def _from_version_1(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1 had no distribution: per-layer multipliers meant per_layer, and
    unstructured pruning ranked weights globally."""
    prune = dict(raw.get("prune", {}))
    if prune.get("layer_scale"):
        prune["distribution"] = "per_layer"
    elif prune.get("structure", "unstructured") == "unstructured":
        prune["distribution"] = "global"
    return {**raw, "prune": prune}


class CompressionPlan(Mapping[str, Any]):
    """The plan: a mapping of technique name to its frozen config (``PARTS``), every
    registered part present (one not given is at its default, which does nothing).

    Built like a dataclass: ``CompressionPlan(quant=QuantConfig(8))``, or with configs in
    any order (``CompressionPlan(PruneConfig(...), QuantConfig(...))``, matched by type).
    The built-in parts read as attributes (``plan.prune``), any part as ``plan["name"]``.
    """

    __slots__ = ("_parts",)

    def __init__(self, *configs: Any, **named: Any) -> None:
        by_type = {cls: name for name, cls in PARTS.items()}
        given = dict(named)
        for config in configs:
            name = by_type.get(type(config))
            _require(name is not None, f"plan: {type(config).__name__} is not a plan part")
            _require(name not in given, f"plan: {name} is given twice")
            given[str(name)] = config
        unknown = sorted(set(given) - set(PARTS))
        _require(not unknown, f"plan: unknown key {unknown[:1]}; allowed: {', '.join(PARTS)}")
        for name, config in given.items():
            _require(
                isinstance(config, PARTS[name]),
                f"plan: {name} must be a {PARTS[name].__name__}, got {type(config).__name__}",
            )
        parts = {name: given.get(name) or cls() for name, cls in PARTS.items()}
        object.__setattr__(self, "_parts", MappingProxyType(parts))
        _require(
            self.quant.method != "qat" or self.finetune.epochs > 0,
            "quant.method: 'qat' trains with fake-quantized weights, so it needs "
            "finetune.epochs > 0, but got 0",
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a CompressionPlan is frozen; use replace()")

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and deepcopy rebuild it from its parts
        return (_from_parts, (dict(self._parts),))

    # the mapping: technique name -> config
    def __getitem__(self, name: str) -> Any:
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressionPlan) and dict(self._parts) == dict(other._parts)

    def __hash__(self) -> int:
        return hash(tuple(self._parts.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._parts.items())
        return f"CompressionPlan({inner})"

    def replace(self, **changes: Any) -> CompressionPlan:
        """The plan with some parts swapped: ``plan.replace(quant=QuantConfig(8))``."""
        return CompressionPlan(**{**self._parts, **changes})

    @property
    def prune(self) -> PruneConfig:
        return self._parts["prune"]

    @property
    def quant(self) -> QuantConfig:
        return self._parts["quant"]

    @property
    def distill(self) -> DistillConfig:
        return self._parts["distill"]

    @property
    def finetune(self) -> FinetuneConfig:
        return self._parts["finetune"]

    @property
    def is_identity(self) -> bool:
        """The uncompressed baseline: nothing pruned, quantized or fine-tuned."""
        return not self.prune.active and not self.quant.active and self.finetune.epochs == 0

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the version, then each part's fields (mappings as dicts)."""
        out: dict[str, Any] = {"version": PLAN_VERSION}
        for name, config in self._parts.items():
            out[name] = {
                f.name: dict(v) if isinstance(v := getattr(config, f.name), Mapping) else v
                for f in fields(config)
            }
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CompressionPlan:
        version = raw.get("version")
        _require(
            version in (1, 2, PLAN_VERSION),
            f"plan: version {version!r} is not supported "
            f"(this paretoopt reads versions 1 to {PLAN_VERSION})",
        )
        if version == 1:
            raw = _from_version_1(raw)
        unknown = sorted(set(raw) - set(PARTS) - {"version"})
        _require(not unknown, f"plan: unknown key {unknown[:1]}; allowed: {', '.join(PARTS)}")
        try:
            return cls(**{k: c(**dict(raw.get(k, {}))) for k, c in PARTS.items()})
        except (TypeError, AttributeError, ValueError) as exc:
            raise PlanError(f"plan: {exc}") from None

    def summary(self) -> str:
        """One short line for tables and progress output."""
        bits = self.quant.describe()
        p = self.prune
        prune = "dense"
        if p.active:  # e.g. "channel 0.50 l2 uniform", "unstructured 0.80 taylor global gradual"
            parts = [p.structure, f"{p.sparsity:.2f}", p.saliency, p.distribution.replace("_", "-")]
            parts += ["gradual"] if p.schedule == "gradual" else []
            parts += ["regrow"] if p.regrowth else []
            prune = " ".join(parts)
        kd = (
            f"KD T={self.distill.temperature:.1f} a={self.distill.alpha:.2f}"
            if self.distill.alpha > 0 and self.finetune.epochs
            else ""
        )
        ft = f"ft {self.finetune.epochs}ep" if self.finetune.epochs else ""
        return ", ".join(p for p in (prune, bits, ft, kd) if p)


def _from_parts(parts: dict[str, Any]) -> CompressionPlan:
    return CompressionPlan(**parts)
