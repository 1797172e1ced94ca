"""Picking a candidate from a study's front: the knee, or a rule the user writes.

    knee                                              the balanced point of the front
    max accuracy where size <= 200kB and latency <= 0.3ms
    min latency where accuracy >= 98.5
    min size where accuracy_drop <= 0.5

Units: sizes in B, kB, MB (powers of 1000, as the tables print them) or bare bytes;
latency in ms (or us, s); accuracy and accuracy_drop in percent points. Part of the pure
data layer (no torch): the CLI's export and the explorer app use the same rules.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .errors import StudyError

COLUMNS = {
    "accuracy": "accuracy",
    "size": "size_bytes",
    "latency": "latency_ms",
    "accuracy_drop": "accuracy_drop",
}
UNITS = {
    "size": {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9},
    "latency": {"": 1.0, "ms": 1.0, "us": 1e-3, "s": 1e3},
    "accuracy": {"": 1.0, "%": 1.0},
    "accuracy_drop": {"": 1.0, "%": 1.0, "pts": 1.0},
}
GRAMMAR = (
    "'knee', or '(max|min) (accuracy|size|latency) [where <metric> (<=|<|>=|>) <value>"
    "[unit] [and ...]]', e.g. 'max accuracy where size <= 200kB and latency <= 0.3ms'"
)
_RULE = re.compile(r"^\s*(max|min)\s+(accuracy|size|latency)\s*(?:where\s+(.+))?$", re.I)
_CONDITION = re.compile(
    r"^\s*(accuracy_drop|accuracy|size|latency)\s*(<=|>=|<|>)\s*([0-9.]+(?:e-?[0-9]+)?)"
    r"\s*([a-z%]*)\s*$",
    re.I,
)


def pick(front: pd.DataFrame, rule: str, baseline_accuracy: float | None = None) -> int:
    """The trial number the rule picks from the front."""
    if front.empty:
        raise StudyError("the study has no feasible Pareto front to pick from")
    if rule.strip().lower() == "knee":
        return knee(front)
    match = _RULE.match(rule)
    if not match:
        raise StudyError(f"--pick: cannot read {rule!r}; write {GRAMMAR}")
    direction, metric, conditions = match.groups()
    frame = front.copy()
    if baseline_accuracy is not None:
        frame["accuracy_drop"] = baseline_accuracy - frame["accuracy"]
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
    if metric == "accuracy_drop" and not has_drop:
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


def knee(front: pd.DataFrame) -> int:
    """The front point closest to the ideal one once every objective is scaled to [0, 1]
    over the front (best = 0): the candidate that gives up least on every axis at once."""
    columns = [c for c in ("accuracy", "size_bytes", "latency_ms") if c in front]
    values = np.array(front[columns], dtype=float)  # a copy: it is changed below
    values[:, columns.index("accuracy")] *= -1  # every axis now: smaller is better
    if "size_bytes" in columns:  # sizes span orders of magnitude: compare them in log
        values[:, columns.index("size_bytes")] = np.log(values[:, columns.index("size_bytes")])
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    distance = np.linalg.norm((values - low) / span, axis=1)
    return int(front.iloc[int(np.argmin(distance))]["number"])
