"""The metrics a study can optimise and constrain: one descriptor each.

Every consumer iterates over ``METRICS``: the space file's objectives and constraints,
the Optuna values and constraints of a trial, the trial frames and their ratio columns,
the pick grammar and its units, the explorer's axes, budgets and hypervolume, the
terminal tables and the model card. A new objective is one more ``Metric`` below, read
from a field the trial record already holds.

No torch, no pandas: the space file is checked against this before anything heavy loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Limit:
    """The constraint a metric offers in the space file's ``constraints`` section.

    ``relative``: the limit bounds the loss against the baseline (points of accuracy
    below it) rather than the value itself.
    """

    key: str  # the setting under constraints:, e.g. max_size_bytes
    name: str  # the Optuna constraint's name (stored with every trial: never rename)
    doc: str
    kind: type = float
    low: float = 0.0
    high: float | None = None
    default: float | None = None
    relative: bool = False


@dataclass(frozen=True)
class Metric:
    """One measured figure of a trial that can be an objective.

    ``field`` is both the trial record's field and the trials frame's column. Relative
    to the baseline a metric reads as a difference (accuracy: points gained or lost) or
    as a quotient (size, latency: how many times smaller or faster), in ``ratio_column``.
    """

    name: str  # the objective's name in the space file and in pick rules
    field: str
    direction: str  # "maximize" or "minimize"
    label: str  # axis label of absolute values
    ratio_column: str
    ratio_label: str  # axis label relative to the baseline
    limit: Limit
    units: Mapping[str, float]  # unit suffix in pick rules -> factor to the field's unit
    display_unit: str = ""  # the unit tables and sliders show values in ...
    display_scale: float = 1.0  # ... and the field's values per display unit
    decimals: int = 2  # shown in tables, in the display unit
    ratio_decimals: int = 2  # "x smaller" and the like
    prefixed: bool = False  # printed with the SI prefix that fits (B, kB, MB)
    heading: str = ""  # the terminal table's column, when not "<name> <unit>"
    log: bool = False  # values span orders of magnitude: a log axis
    knee_log: bool = False  # ... and the knee compares them in log
    integer: bool = False  # whole numbers (a budget gets half a unit of slack)
    budget_span: float = 2.0  # the explorer's budget slider runs to this many baselines
    dense: bool = False  # dense kernels decide it: zeros in a weight do not move it
    default: bool = False  # an objective when the space file names none

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def quotient(self) -> bool:
        """Read against the baseline as "x times" (minimised metrics) rather than points."""
        return not self.maximize

    def ratio(self, value: float, base: float) -> float:
        """The value relative to the baseline's: points changed, or times better."""
        return value - base if self.maximize else base / value

    def loss(self, value: float, base: float) -> float:
        """Smaller is better, in baseline units (hypervolume): points lost, or the
        fraction of the baseline's figure."""
        return base - value if self.maximize else value / base

    def violation(self, value: float, base: float | None, limit: float) -> float:
        """Optuna 5's constraint value for a limit: feasible when <= 0."""
        if self.limit.relative:
            if base is None:
                raise ValueError(f"constraints.{self.limit.key} needs the baseline's {self.name}")
            return (base - value) - limit
        return value - limit

    def within(self, value: float, base: float | None, limit: float) -> bool:
        """A budget in the explorer: the limit with a hair of slack, since slider values
        come back rounded."""
        slack = 0.5 if self.integer else 1e-9
        return self.violation(value, base, limit) <= slack

    def show(self, value: float) -> str:
        """The value as tables print it, in the display unit."""
        return f"{value / self.display_scale:.{self.decimals}f}"

    def text(self, value: float) -> str:
        """The value with its unit, e.g. "10.2 kB", "0.0171 ms", "1.23 M"."""
        if self.prefixed:
            return si_bytes(value)
        unit = f" {self.display_unit}" if self.display_unit else ""
        return f"{self.show(value)}{unit}"

    @property
    def column(self) -> str:
        return self.heading or f"{self.name} {self.display_unit}".strip()


def si_bytes(n: float) -> str:
    """Bytes in powers of 1000, as the pick grammar reads them back: "812 B", "10.2 kB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


ACCURACY = Metric(
    name="accuracy",
    field="accuracy",
    direction="maximize",
    label="validation accuracy (%)",
    ratio_column="accuracy_change",
    ratio_label="accuracy change (points)",
    limit=Limit(
        "max_accuracy_drop",
        "accuracy_drop",
        "largest allowed drop in the quality metric (`metric`) against the baseline, in its "
        "units: percentage points for the built-in metrics",
        high=100.0,
        default=1.0,
        relative=True,
    ),
    units={"": 1.0, "%": 1.0},
    display_unit="%",
    default=True,
)
SIZE = Metric(
    name="size",
    field="size_bytes",
    direction="minimize",
    label="size (bytes)",
    ratio_column="size_ratio",
    ratio_label="x smaller",
    limit=Limit(
        "max_size_bytes",
        "size",
        "largest allowed size of the compressed file, in bytes",
        kind=int,
        low=1,
    ),
    units={"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9},
    display_unit="kB",
    display_scale=1e3,
    decimals=1,
    ratio_decimals=1,
    prefixed=True,
    heading="size",
    log=True,
    knee_log=True,
    integer=True,
    budget_span=2.0,
    default=True,
)
LATENCY = Metric(
    name="latency",
    field="latency_ms",
    direction="minimize",
    label="latency (ms)",
    ratio_column="speedup",
    ratio_label="x faster",
    limit=Limit("max_latency_ms", "latency", "largest allowed median latency, in milliseconds"),
    units={"": 1.0, "ms": 1.0, "us": 1e-3, "s": 1e3},
    display_unit="ms",
    decimals=4,
    heading="latency ms",
    log=True,
    budget_span=4.0,
    dense=True,
    default=True,
)
MACS = Metric(
    name="macs",
    field="macs",
    direction="minimize",
    label="multiply-accumulates per sample",
    ratio_column="macs_ratio",
    ratio_label="x fewer MACs",
    limit=Limit(
        "max_macs",
        "macs",
        "largest allowed multiply-accumulates per sample of the deployed model",
        kind=int,
        low=1,
    ),
    units={"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9},
    display_unit="M",
    display_scale=1e6,
    decimals=2,
    log=True,
    knee_log=True,
    integer=True,
    budget_span=1.0,
    dense=True,
)

METRICS: dict[str, Metric] = {m.name: m for m in (ACCURACY, SIZE, LATENCY, MACS)}
DEFAULT_OBJECTIVES = tuple(m.name for m in METRICS.values() if m.default)


# What the space file's `metric:` can name beside a user's 'module:callable' (computed in
# workload/quality). The quality objective keeps its name, "accuracy", and its record
# field whatever it measures, so studies from before `metric:` existed resume as top1.
QUALITY = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "macro_f1": "macro F1",
    "balanced_accuracy": "balanced accuracy",
}
DEFAULT_QUALITY = "top1"
QUALITY_SHORT = {"top1": "acc", "top5": "top5", "macro_f1": "F1", "balanced_accuracy": "bal acc"}


def is_user_quality(name: str) -> bool:
    return ":" in name


def quality_name(name: str = DEFAULT_QUALITY) -> str:
    """What the quality objective is called in text: "accuracy" (top-1, as it always
    was), "macro F1", or a user metric's callable name."""
    if name == DEFAULT_QUALITY:
        return "accuracy"
    return name.rsplit(":", 1)[1] if is_user_quality(name) else QUALITY.get(name, name)


def quality_short(name: str = DEFAULT_QUALITY) -> str:
    """Its name in narrow places (a progress line, a table heading): "acc", "F1", ..."""
    return QUALITY_SHORT.get(name) or quality_name(name)


def quality_metric(name: str = DEFAULT_QUALITY) -> Metric:
    """The quality objective labelled by what it measures: built-ins in percent, a user
    metric by its callable's name, in its own units."""
    if name == DEFAULT_QUALITY:
        return ACCURACY  # labelled as it always was
    user, text = is_user_quality(name), quality_name(name)
    return replace(
        ACCURACY,
        label=f"validation {text}" + ("" if user else " (%)"),
        ratio_label=f"{text} change" + ("" if user else " (points)"),
        units={"": 1.0} if user else ACCURACY.units,
        display_unit="" if user else "%",
        decimals=4 if user else ACCURACY.decimals,
    )


def shown(objectives: tuple[str, ...] | list[str], quality: str = DEFAULT_QUALITY) -> list[Metric]:
    """The metrics a table, a progress line, a budget or the knee reads: the default
    three, then any other objective of the study; the quality one labelled by the
    study's `metric`."""
    names = list(DEFAULT_OBJECTIVES) + [m for m in objectives if m not in DEFAULT_OBJECTIVES]
    own = {**METRICS, ACCURACY.name: quality_metric(quality)}
    return [own[n] for n in names if n in own]


def ratios(record: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float]:
    """Each metric relative to the baseline's, where both figures exist and are usable."""
    out = {}
    for m in METRICS.values():
        value, reference = record.get(m.field), base.get(m.field)
        if value is None or reference is None or (m.quotient and not value):
            continue
        out[m.ratio_column] = m.ratio(float(value), float(reference))
    return out


def not_finite(record: Mapping[str, Any], objectives: list[str]) -> list[str]:
    """The objectives whose figure is missing or not finite in a record."""
    bad = []
    for name in objectives:
        value = record.get(METRICS[name].field)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(name)
    return bad
