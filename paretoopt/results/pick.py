"""Picking a candidate from a study's front: the knee, or a rule the user writes.

    knee                                              the balanced point of the front
    max accuracy where size <= 200kB and latency <= 0.3ms
    min latency where accuracy >= 98.5
    min size where accuracy_drop <= 0.5

Units: sizes in B, kB, MB (powers of 1000, as the tables print them) or bare bytes;
latency in ms (or us, s); accuracy and accuracy_drop in percent points; macs bare or in
k, M, G. The metrics and their units come from ``paretoopt.config.metrics``. Part of the pure
data layer (no torch): the CLI's export and the explorer app use the same rules.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from paretoopt.config.metrics import DEFAULT_OBJECTIVES, METRICS, Metric
from paretoopt.errors import StudyError

DROP = "accuracy_drop"  # points below the baseline: the accuracy limit's own reading
_ACCURACY = METRICS["accuracy"]
COLUMNS = {**{m.name: m.field for m in METRICS.values()}, DROP: DROP}
UNITS = {**{m.name: dict(m.units) for m in METRICS.values()}, DROP: {"": 1.0, "%": 1.0, "pts": 1.0}}
_NAMES = "|".join(METRICS)
GRAMMAR = (
    f"'knee', or '(max|min) ({_NAMES}) [where <metric> (<=|<|>=|>) <value>"
    "[unit] [and ...]]', e.g. 'max accuracy where size <= 200kB and latency <= 0.3ms'"
)
_RULE = re.compile(rf"^\s*(max|min)\s+({_NAMES})\s*(?:where\s+(.+))?$", re.I)
_CONDITION = re.compile(
    rf"^\s*({DROP}|{_NAMES})\s*(<=|>=|<|>)\s*([0-9.]+(?:e-?[0-9]+)?)"
    r"\s*([a-z%]*)\s*$",
    re.I,
)


CONFIRMED = "confirm_latency_ms"  # the end-of-search re-measurement (results.py)
SEARCH_LATENCY = "search_latency_ms"  # the search-time figure, kept beside it
CONFIRMED_QUIET = "confirm_quiet"  # whether the re-measurement found the machine quiet
SEARCH_QUIET = "latency_quiet"  # whether the search-time figure did


def confirmed(frame: pd.DataFrame, baseline: dict[str, Any] | None = None) -> pd.DataFrame:
    """The frame with each trial's latency as re-measured at the end of the search,
    wherever it was (the search-time figure moves to SEARCH_LATENCY): a pick made on the
    search-time figure would favour the trials whose one measurement was lucky. A
    re-measurement that never found the machine quiet (CONFIRMED_QUIET False) measured
    another state of the machine, and is left aside where the search-time figure was
    read at the quiet level (SEARCH_QUIET True)."""
    if CONFIRMED not in frame or frame.empty:
        return frame
    m = METRICS["latency"]
    out = frame.copy()
    again = pd.to_numeric(out[CONFIRMED], errors="coerce")
    if CONFIRMED_QUIET in out and SEARCH_QUIET in out:
        busy = out[CONFIRMED_QUIET].map(lambda q: flag(q) is False).astype(bool)
        quiet_before = out[SEARCH_QUIET].map(lambda q: flag(q) is True).astype(bool)
        again = again.where(~(busy & quiet_before))
    out[SEARCH_LATENCY] = out[m.field]
    out[m.field] = again.where(again.notna(), out[m.field])
    base = (baseline or {}).get(m.field)
    if base and m.ratio_column in out:
        out[m.ratio_column] = [m.ratio(float(v), float(base)) for v in out[m.field]]
    return out


def flag(value: object) -> bool | None:
    """A stored flag (a bool of JSON or of numpy) as a bool; None, NaN: not known."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else None


def pick(
    front: pd.DataFrame,
    rule: str,
    baseline_accuracy: float | None = None,
    objectives: tuple[str, ...] | list[str] = DEFAULT_OBJECTIVES,
) -> int:
    """The trial number the rule picks from the front (the knee over `objectives`), on
    confirmed latencies where the front has them (see ``confirmed``)."""
    if front.empty:
        raise StudyError("the study has no feasible Pareto front to pick from")
    front = confirmed(front)
    if rule.strip().lower() == "knee":
        return knee(front, objectives)
    match = _RULE.match(rule)
    if not match:
        raise StudyError(f"--pick: cannot read {rule!r}; write {GRAMMAR}")
    direction, metric, conditions = match.groups()
    frame = front.copy()
    if baseline_accuracy is not None:
        frame[DROP] = baseline_accuracy - frame[_ACCURACY.field]
    for text in re.split(r"\s+and\s+", conditions or "", flags=re.I) if conditions else []:
        frame = frame[_condition(frame, text, baseline_accuracy is not None)]
    if frame.empty:
        raise StudyError(f"--pick: no trial on the front satisfies {rule!r}")
    column = COLUMNS[metric.lower()]
    ordered = frame.sort_values(column, ascending=direction.lower() == "min", kind="stable")
    return int(ordered.iloc[0]["number"])


def _condition(frame: pd.DataFrame, text: str, has_drop: bool) -> pd.Series:
    match = _CONDITION.match(text)
    if not match:
        raise StudyError(f"--pick: cannot read the condition {text.strip()!r}; write {GRAMMAR}")
    metric, op, number, unit = match.groups()
    metric = metric.lower()
    if metric == DROP and not has_drop:
        raise StudyError("--pick: accuracy_drop needs the study's baseline, which is missing")
    scale = UNITS[metric].get(unit.lower())
    if scale is None:
        raise StudyError(
            f"--pick: unit {unit!r} does not fit {metric}; use one of "
            f"{', '.join(u for u in UNITS[metric] if u) or 'none'}"
        )
    value, column = float(number) * scale, frame[COLUMNS[metric]]
    return {"<=": column <= value, "<": column < value, ">=": column >= value, ">": column > value}[
        op
    ]


def knee(front: pd.DataFrame, objectives: tuple[str, ...] | list[str] = DEFAULT_OBJECTIVES) -> int:
    """The front point closest to the ideal one once every objective is scaled to [0, 1]
    over the front (best = 0): the candidate that gives up least on every axis at once.
    Figures that span orders of magnitude (size) are compared in log."""
    chosen: list[Metric] = [METRICS[m] for m in objectives if METRICS[m].field in front]
    columns = [m.field for m in chosen]
    values = np.array(front[columns], dtype=float)  # a copy: it is changed below
    for i, m in enumerate(chosen):
        if m.maximize:  # every axis now: smaller is better
            values[:, i] *= -1
        if m.knee_log:
            values[:, i] = np.log(values[:, i])
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    distance = np.linalg.norm((values - low) / span, axis=1)
    return int(front.iloc[int(np.argmin(distance))]["number"])
