"""A compression plan: the frozen, validated recipe one trial applies to the baseline.

The plan is a mapping of plan part name to its frozen config, one per registered part
(``config/parts``: prune, lowrank, quant, distill, finetune); it round-trips through JSON
(``to_dict``/``from_dict``, versioned) and is stored with every trial and every
artifact. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from paretoopt.config.parts import registered, require
from paretoopt.errors import PlanError

# 2: saliency, distribution, schedule, regrowth; 3: activations, qat, mixed; 4: lowrank,
# coding, quant.grid
PLAN_VERSION = 4


# plan key -> config type: what a plan holds and what its stored form names, one per
# registered part (config/parts), in plan order
PARTS: dict[str, type] = {name: part.config for name, part in registered().items()}


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
    Every part reads as an attribute (``plan.prune``) and as a key (``plan["prune"]``).
    """

    __slots__ = ("_parts",)

    def __init__(self, *configs: Any, **named: Any) -> None:
        by_type = {cls: name for name, cls in PARTS.items()}
        given = dict(named)
        for config in configs:
            name = by_type.get(type(config))
            require(name is not None, f"plan: {type(config).__name__} is not a plan part")
            require(name not in given, f"plan: {name} is given twice")
            given[str(name)] = config
        unknown = sorted(set(given) - set(PARTS))
        require(not unknown, f"plan: unknown key {unknown[:1]}; allowed: {', '.join(PARTS)}")
        for name, config in given.items():
            require(
                isinstance(config, PARTS[name]),
                f"plan: {name} must be a {PARTS[name].__name__}, got {type(config).__name__}",
            )
        parts = {name: given.get(name) or cls() for name, cls in PARTS.items()}
        object.__setattr__(self, "_parts", MappingProxyType(parts))
        for part in registered().values():  # rules across parts, each part's own
            broken = part.check_plan(self)
            require(broken is None, str(broken))

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

    def __getattr__(self, name: str) -> Any:
        """Every part reads as an attribute too: ``plan.prune``, ``plan.quant``."""
        parts = object.__getattribute__(self, "_parts")
        if name in parts:
            return parts[name]
        raise AttributeError(f"a CompressionPlan has no part {name!r}; parts: {', '.join(parts)}")

    @property
    def is_identity(self) -> bool:
        """The uncompressed baseline: no part changes the model (nothing pruned,
        quantized or fine-tuned)."""
        return not any(p.changes_model(self[n]) for n, p in registered().items())

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
        require(
            version in (1, 2, 3, PLAN_VERSION),
            f"plan: version {version!r} is not supported "
            f"(this paretoopt reads versions 1 to {PLAN_VERSION})",
        )
        if version == 1:
            raw = _from_version_1(raw)
        unknown = sorted(set(raw) - set(PARTS) - {"version"})
        require(not unknown, f"plan: unknown key {unknown[:1]}; allowed: {', '.join(PARTS)}")
        try:
            return cls(**{k: c(**dict(raw.get(k, {}))) for k, c in PARTS.items()})
        except (TypeError, AttributeError, ValueError) as exc:
            raise PlanError(f"plan: {exc}") from None

    def summary(self) -> str:
        """One short line for tables and progress output: each part's words, in plan
        order (e.g. "channel 0.50 l2 uniform, int8, ft 2ep, KD T=4.0 a=0.50")."""
        return ", ".join(w for p in registered().values() if (w := p.describe(self)))


def _from_parts(parts: dict[str, Any]) -> CompressionPlan:
    return CompressionPlan(**parts)
