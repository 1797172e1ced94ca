"""Cost-aware search: spend fine-tuning only where it can pay off (`search.fidelity`).

Two of a plan's three usual objectives do not depend on fine-tuning: the compressed
file's size and its deployed graph's latency are fixed once the plan's structure and
bit-widths are. So, before any fine-tuning:

- **prescreen**: the plan is built without fine-tuning, written, deployed and timed with
  the study's protocol (pooled per structure). A plan whose size or latency already
  breaks a constraint, or that a completed trial at the baseline's accuracy beats on
  every one of those objectives, is rejected: the sampler's accuracy is capped at the
  baseline's (see ``loop.told_values``), so no accuracy could put it on the front.
- **halving**: successive halving over fine-tuning. At each rung (1/eta^k of the
  fine-tuning steps, then 1/eta^(k-1), ...) the trial's partial accuracy is compared
  with every trial that reached that rung, on (partial accuracy, size, latency): it goes
  on only while it is non-dominated there and among the best 1/eta by Pareto rank, with
  crowding distance breaking ties (``held_back``). Decisions are asynchronous (ASHA): a
  trial is judged against those seen so far, so workers never wait for a rung to fill.

A rejected or stopped trial is told to Optuna as PRUNED, with its measured size and
latency, the rung it reached, its partial accuracy and the reason; it counts towards
the study's trials and never enters the front.

No torch here: the decisions are arithmetic on recorded figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from paretoopt.config.metrics import METRICS, Metric
from paretoopt.config.space import Space
from paretoopt.results.frames import PRESCREEN_ATTR, RUNGS_ATTR
from paretoopt.results.pooling import pool
from paretoopt.results.record import Latency, TrialRecord, stored_record

AUTO_EPOCHS = 4  # `auto` halves where a full fine-tune runs at least this many epochs
SIZE_MARGIN = 0.01  # a prescreened size may still move a little (codes that round to zero)
LATENCY_MARGIN = 0.03  # of another structure's latency: the protocol's noise, kept clear of


class Stopped(Exception):  # noqa: N818 (a trial's outcome, not a fault)
    """A trial ends before its full fine-tune: rejected before training (rung None) or
    stopped at a rung. Raised from the trial's pipeline, told to Optuna as PRUNED."""

    def __init__(
        self, kind: str, reason: str, rung: int | None = None, accuracy: float | None = None
    ) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.rung, self.accuracy = kind, reason, rung, accuracy

    def to_attr(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rung": self.rung,
            "accuracy": self.accuracy,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Fidelity:
    """A study's fidelity policy, resolved from `search.fidelity`."""

    prescreen: bool = False
    rungs: tuple[float, ...] = ()  # fractions of the fine-tuning steps, rising
    eta: int = 3

    @property
    def full(self) -> bool:
        return not self.prescreen and not self.rungs

    def describe(self) -> str:
        if self.full:
            return "every plan fine-tuned in full"
        parts = ["size and latency measured before fine-tuning"]
        if self.rungs:
            at = ", ".join(f"1/{round(1 / f)}" for f in self.rungs)
            parts.append(f"successive halving at {at} of fine-tuning (keep 1 in {self.eta})")
        return "; ".join(parts)


def fidelity_of(space: Space) -> Fidelity:
    """The policy `search.fidelity` names; `auto` halves where fine-tuning is long."""
    s = space.search
    mode = s.fidelity
    if mode == "auto":
        mode = "halving" if max_epochs(space) >= AUTO_EPOCHS else "full"
    if mode == "full":
        return Fidelity()
    if mode == "prescreen" or max_epochs(space) == 0:
        return Fidelity(prescreen=True, eta=s.halving_eta)
    rungs = tuple(s.halving_eta**-k for k in range(s.halving_rungs, 0, -1))
    return Fidelity(prescreen=True, rungs=rungs, eta=s.halving_eta)


def max_epochs(space: Space) -> int:
    """The most fine-tuning epochs a plan of the space can get."""
    knob = space.space.finetune.epochs
    for attr in ("high", "value"):
        if hasattr(knob, attr):
            return int(getattr(knob, attr))
    return int(max(knob.options))


def rung_steps(fidelity: Fidelity, total: int) -> dict[int, int]:
    """{fine-tuning step: rung index} for a fine-tune of `total` steps; rungs that would
    fall on the same step, on step 0 or on the last one are dropped."""
    out: dict[int, int] = {}
    for index, fraction in enumerate(fidelity.rungs):
        step = math.floor(total * fraction)
        if 0 < step < total and step not in out:
            out[step] = index
    return out


# --------------------------------------------------------------------------- prescreen


def structural(space: Space) -> list[Metric]:
    """The objectives fixed by a plan's structure alone (every one but the quality)."""
    return [METRICS[name] for name in space.metrics if not METRICS[name].maximize]


def prescreen_reason(
    space: Space,
    figures: Mapping[str, Any],
    base: Mapping[str, Any],
    completed: Sequence[tuple[int, Mapping[str, Any]]],
) -> str | None:
    """Why a plan measured untrained (`figures`: its structural fields) cannot reach the
    front, or None. `completed`: (trial number, record) of the study's feasible trials."""
    metrics = structural(space)
    for m in metrics:
        limit = getattr(space.constraints, m.limit.key)
        if limit is None:
            continue
        value = float(figures[m.field])
        if m.violation(value, base.get(m.field), limit) > 0:
            return f"its {m.field} {value:g} is over constraints.{m.limit.key}: {limit:g}"
    if not metrics:
        return None
    quality = METRICS["accuracy"].field
    for number, record in completed:
        if float(record[quality]) < float(base[quality]):
            continue  # below the cap: a better accuracy could still beat it
        if all(_no_worse(m, record, figures) for m in metrics):
            return (
                f"trial {number} reached the baseline's accuracy at no more "
                + " and ".join(_shown(m) for m in metrics)
                + ", so no accuracy puts this plan on the front"
            )
    return None


def _no_worse(m: Metric, record: Mapping[str, Any], figures: Mapping[str, Any]) -> bool:
    """`record` at most `figures` on metric m, clear of the measurement's noise (none on
    latency between trials of one deployed structure: they share one pooled figure)."""
    theirs, ours = float(record[m.field]), float(figures[m.field])
    if m.name == "latency":
        same = _structure(record) is not None and _structure(record) == figures.get("structure")
        return theirs <= ours if same else theirs <= ours * (1 - LATENCY_MARGIN)
    if m.name == "size":
        return theirs <= ours * (1 - SIZE_MARGIN)
    return theirs <= ours


def _structure(record: Mapping[str, Any]) -> str | None:
    latency = record.get("latency")
    return latency.get("structure") if isinstance(latency, Mapping) else None


def _shown(m: Metric) -> str:
    return {"size": "file size", "latency": "latency"}.get(m.name, m.name)


# --------------------------------------------------------------------------- rungs


def held_back(point: Sequence[float], peers: Sequence[Sequence[float]], eta: int) -> str | None:
    """Why a trial does not go on from a rung, or None where it does. `point` and
    `peers` (the other trials seen at that rung) are losses, every column minimised. It
    must be non-dominated among them and among the best ceil(n/eta) of the n, by Pareto
    rank and then crowding distance (wider first; ties go on)."""
    everyone = [tuple(float(v) for v in point), *(tuple(float(v) for v in p) for p in peers)]
    n = len(everyone)
    beaten = sum(_dominates(p, everyone[0]) for p in everyone[1:])
    if beaten:
        return f"dominated by {beaten} of the {n - 1} other trials seen there"
    ranks = pareto_ranks(everyone)
    keep = math.ceil(n / eta)
    crowd = crowding(everyone, ranks)
    ahead = sum(
        1
        for i in range(1, n)
        if ranks[i] < ranks[0] or (ranks[i] == ranks[0] and crowd[i] > crowd[0])
    )
    if ahead < keep:
        return None
    return (
        f"not among the best {keep} of the {n} trials seen there ({ahead} are ahead by "
        "Pareto rank and crowding distance)"
    )


def pareto_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Non-dominated sorting: 0 for the front, 1 for the front without it, ..."""
    ranks = [-1] * len(points)
    left, rank = set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(_dominates(points[j], points[i]) for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def crowding(points: Sequence[Sequence[float]], ranks: Sequence[int]) -> list[float]:
    """NSGA-II's crowding distance within each rank (boundary points: infinite)."""
    out = [0.0] * len(points)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for k in range(len(points[0]) if points else 0):
            ordered = sorted(members, key=lambda i: points[i][k])
            low, high = points[ordered[0]][k], points[ordered[-1]][k]
            out[ordered[0]] = out[ordered[-1]] = math.inf
            if high == low:
                continue
            for a, i, b in zip(ordered, ordered[1:], ordered[2:], strict=False):
                out[i] += (points[b][k] - points[a][k]) / (high - low)
    return out


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def rung_loss(space: Space, accuracy: float, figures: Mapping[str, Any]) -> list[float]:
    """A trial at a rung as losses (only their order counts): its partial accuracy
    negated, then the structural objectives as measured before training."""
    return [-accuracy, *(float(figures[m.field]) for m in structural(space))]


# --------------------------------------------------------------------------- the study's side


class StudyGauge:
    """trial.Gauge for one Optuna trial: records what the trial measured before and
    during fine-tuning in its user attributes, and judges it against the study's other
    trials (read from the storage, so workers on any machine see each other)."""

    def __init__(
        self,
        space: Space,
        study: optuna.Study,
        trial: optuna.Trial,
        base: Mapping[str, Any],
        fidelity: Fidelity,
    ) -> None:
        self.space, self.study, self.trial, self.base = space, study, trial, base
        self.fidelity = fidelity
        self.figures: dict[str, Any] = {}

    def measured(self, figures: dict[str, Any]) -> None:
        trials = self.study.get_trials(deepcopy=False)
        own = Latency(**figures["latency"])
        peers = (r.latency for r in _records(trials, feasible=False))
        found = pool(own, peers)
        latency_ms = found[0] if found else float(figures["latency_ms"])
        self.figures = {
            "size_bytes": int(figures["size_bytes"]),
            "latency_ms": latency_ms,
            "latency_own_ms": float(figures["latency_ms"]),
            "macs": int(figures["macs"]),
            "structure": figures.get("structure"),
        }
        self.trial.set_user_attr(PRESCREEN_ATTR, self.figures)
        done = [
            (t.number, t.user_attrs)
            for t in trials
            if t.state == TrialState.COMPLETE and _feasible(t) and stored_record(t.user_attrs)
        ]
        reason = prescreen_reason(self.space, self.figures, self.base, done)
        if reason is not None:
            raise Stopped("rejected", f"rejected before fine-tuning: {reason}")

    def rung(self, index: int, accuracy: float) -> None:
        reached = {**self.trial.user_attrs.get(RUNGS_ATTR, {}), str(index): accuracy}
        self.trial.set_user_attr(RUNGS_ATTR, reached)
        a = RUNGS_ATTR
        peers = [
            rung_loss(self.space, t.user_attrs[a][str(index)], t.user_attrs[PRESCREEN_ATTR])
            for t in self.study.get_trials(deepcopy=False)
            if t.number != self.trial.number
            and str(index) in t.user_attrs.get(a, {})
            and PRESCREEN_ATTR in t.user_attrs
        ]
        point = rung_loss(self.space, accuracy, self.figures)
        reason = held_back(point, peers, self.fidelity.eta)
        if reason is not None:
            share = f"1/{round(1 / self.fidelity.rungs[index])}"
            raise Stopped(
                "stopped",
                f"stopped at rung {index + 1} ({share} of fine-tuning, partial "
                f"{self.space.metric} {accuracy:.2f}): {reason}",
                rung=index,
                accuracy=accuracy,
            )


def _feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in (t.constraints or {}).values())


def _records(trials: Sequence[FrozenTrial], feasible: bool) -> list[TrialRecord]:
    found = (
        stored_record(t.user_attrs)
        for t in trials
        if t.state == TrialState.COMPLETE and (_feasible(t) or not feasible)
    )
    return [r for r in found if r is not None]
