"""Knobs: a setting of the search space that is either fixed or searched.

In the space file a knob is written as
  * a bare value          -> :class:`Fixed`  (``bits: 8``)
  * a list of values      -> :class:`Choice` (``bits: [4, 8, 32]``)
  * a mapping low/high    -> :class:`Range`  (``sparsity: {low: 0.0, high: 0.9}``,
                              optional ``log: true`` and ``step: 0.05``)

This module does not import torch or optuna: it is pure, validated data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from paretoopt.errors import SpaceError, shown

Scalar = int | float | str | bool


@dataclass(frozen=True)
class Fixed:
    value: Scalar

    def to_yaml(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Choice:
    options: tuple[Scalar, ...]

    def to_yaml(self) -> Any:
        return list(self.options)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def to_yaml(self) -> Any:
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def values(self) -> list[int]:
        """Every value an integer range can produce (used to validate each of them)."""
        step = int(self.step or 1)
        return list(range(int(self.low), int(self.high) + 1, step))


Knob = Fixed | Choice | Range


@dataclass(frozen=True)
class KnobRule:
    """What one knob accepts: the value type, inclusive bounds or an allowed set."""

    kind: type
    low: float | None = None
    high: float | None = None
    options: tuple[Scalar, ...] | None = None
    searchable: bool = True

    def check(self, value: Any, where: str) -> Scalar:
        value = _coerce(value, self.kind, where)
        if self.options is not None and value not in self.options:
            allowed = ", ".join(str(o) for o in self.options)
            raise SpaceError(f"{where}: {shown(value)} is not supported; choose from {allowed}")
        if self.low is not None and value < self.low:
            raise SpaceError(f"{where}: must be >= {self.low}, but got {shown(value)}")
        if self.high is not None and value > self.high:
            raise SpaceError(f"{where}: must be <= {self.high}, but got {shown(value)}")
        return value


def _coerce(value: Any, kind: type, where: str) -> Scalar:
    """Accept YAML's natural spellings (an int where a float is wanted), nothing looser:
    no NaN or infinity (``.nan`` passed every bound check, and every trial then failed)."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise SpaceError(f"{where}: expected a finite number, but got {shown(value)}")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise SpaceError(f"{where}: expected {_kind_name(kind)}, but got {shown(value)}")


def _kind_name(kind: type) -> str:
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}[kind]


def parse_knob(raw: Any, rule: KnobRule, where: str) -> Knob:
    """Turn the YAML form of a knob into a validated Fixed, Choice or Range."""
    if isinstance(raw, list):
        return _parse_choice(raw, rule, where)
    if isinstance(raw, dict):
        return _parse_range(raw, rule, where)
    return Fixed(rule.check(raw, where))


def _parse_choice(raw: Sequence[Any], rule: KnobRule, where: str) -> Knob:
    if not rule.searchable:
        raise SpaceError(f"{where}: this setting cannot be searched; give a single value")
    if not raw:
        raise SpaceError(f"{where}: a list of choices must not be empty")
    options = tuple(rule.check(v, f"{where}[{i}]") for i, v in enumerate(raw))
    if len(set(options)) != len(options):
        raise SpaceError(f"{where}: choices must be distinct, but got {shown(list(raw))}")
    return Fixed(options[0]) if len(options) == 1 else Choice(options)


_RANGE_KEYS = ("low", "high", "log", "step")


def _parse_range(raw: dict[str, Any], rule: KnobRule, where: str) -> Knob:
    if not rule.searchable:
        raise SpaceError(f"{where}: this setting cannot be searched; give a single value")
    if rule.kind not in (int, float):
        raise SpaceError(f"{where}: a low/high range needs a numeric setting; use a list")
    unknown = sorted(set(raw) - set(_RANGE_KEYS))
    if unknown:
        raise SpaceError(
            f"{where}: unknown key {shown(unknown[0])}; allowed keys: low, high, log, step"
        )
    for key in ("low", "high"):
        if key not in raw:
            raise SpaceError(f"{where}: a range needs both 'low' and 'high' (missing {key!r})")
    low = rule.check(raw["low"], f"{where}.low")
    high = rule.check(raw["high"], f"{where}.high")
    if low > high:  # type: ignore[operator]
        raise SpaceError(f"{where}: low <= high must hold, but got low={low}, high={high}")
    log = _coerce(raw.get("log", False), bool, f"{where}.log")
    step = raw.get("step")
    if step is not None:
        step = _coerce(step, rule.kind, f"{where}.step")
        if step <= 0:  # type: ignore[operator]
            raise SpaceError(f"{where}.step: must be > 0, but got {shown(step)}")
    if log and low <= 0:  # type: ignore[operator]
        raise SpaceError(f"{where}: a log range needs low > 0, but got low={low}")
    if log and step is not None:
        raise SpaceError(f"{where}: 'log' and 'step' cannot be combined")
    knob = Range(float(low), float(high), bool(log), step, rule.kind is int)  # type: ignore[arg-type]
    if knob.integer and rule.options is not None:
        for v in knob.values():  # every integer the range can produce must be allowed
            rule.check(v, where)
    return Fixed(low) if low == high else knob


# --------------------------------------------------------------------------- declaring


def setting(
    default: Any,
    doc: str,
    *,
    kind: type,
    low: float | None = None,
    high: float | None = None,
    options: tuple[Any, ...] | None = None,
    knob: bool = False,
    nullable: bool = False,
    many: bool = False,
) -> Any:
    """Declare one setting of a section: its type, bounds, default and documentation.
    `many`: a list of distinct such values (a tuple), not a searched knob."""
    rule = KnobRule(kind, low, high, options, searchable=knob)
    meta = {"rule": rule, "knob": knob, "nullable": nullable, "doc": doc, "many": many}
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"section": cls, "doc": doc})


def knob_values(knob: Knob) -> tuple[Any, ...]:
    """Every value a discrete knob can take (an integer range counts as discrete)."""
    if isinstance(knob, Fixed):
        return (knob.value,)
    if isinstance(knob, Choice):
        return knob.options
    return tuple(knob.values()) if knob.integer else ()


def suggest(trial: Any, name: str, knob: Knob) -> Scalar:
    """The knob's value for one trial: a fixed knob's own, a searched one drawn as
    parameter `name` (the trial is an optuna.Trial; no import of Optuna here)."""
    if isinstance(knob, Fixed):
        return knob.value
    if isinstance(knob, Choice):
        return trial.suggest_categorical(name, list(knob.options))
    return _suggest_range(trial, name, knob)


def _suggest_range(trial: Any, name: str, knob: Range) -> Scalar:
    if knob.integer:
        return trial.suggest_int(
            name, int(knob.low), int(knob.high), step=int(knob.step or 1), log=knob.log
        )
    return trial.suggest_float(name, knob.low, knob.high, step=knob.step, log=knob.log)
