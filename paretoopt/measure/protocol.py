"""The latency protocol, the same for every runtime and target.

Warm-up runs, then ``repeats`` rounds of ``iterations`` timed runs each; the median and
p90 are taken over every timed run, the spread is the ratio of the slowest to the fastest
round median. Candidates are timed in alternation with the baseline (``time_paired``), so
that drift of the machine cancels out of the ratio between them.

And in several fresh runtime sessions (``time_sessions``, ``target.sessions``): one int8
ONNX file, timed against the baseline in fresh ONNX Runtime sessions on an AVX2-only EPYC,
gave speed-ups of 3.1, 3.2, 3.9, 5.0 and 5.5x, each session steady across its own rounds
(the float files varied far less). The state is drawn when a session is made (it did not
go away with the memory arena, memory patterns or weight pre-packing switched off, nor with
address randomisation off and the process pinned to one core), so no number of rounds in
one session averages it out. The median over sessions narrows it only a little: the slow
state also lasts for seconds, across consecutive sessions (README, latency benchmark).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from ..space import TargetSpec


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    spread: float  # slowest round median / fastest round median
    runs: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner(Protocol):
    """One deployed model in one runtime."""

    name: str  # the runtime
    mode: str  # how it is timed: "cpu", "eager", "cuda-graph", "remote"

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def fresh(self) -> Runner | None:
        """The same model in a new session of its runtime (its memory placed anew); None
        where the runtime keeps no session state of its own (one session is then all)."""
        ...

    def timer(self, batch: np.ndarray) -> Callable[[], Any]:
        """A no-argument call that runs the batch once, for the latency protocol."""
        ...

    def peak_memory(self, batch: np.ndarray) -> int | None:
        """Bytes one inference allocates at its peak, where the runtime reports it."""
        ...


@dataclass(frozen=True)
class DeviceTime:
    """A run's duration as the device measured it (CUDA events), in milliseconds. A run
    that returns one is timed by it; any other run is timed by the host clock."""

    ms: float


def _round(run: Callable[[], Any], iterations: int) -> list[float]:
    clock = time.perf_counter_ns
    times = []
    for _ in range(iterations):
        start = clock()
        result = run()
        wall = (clock() - start) / 1e6
        times.append(result.ms if isinstance(result, DeviceTime) else wall)
    return times


def _stats(rounds: list[list[float]], batch_size: int) -> LatencyStats:
    every = sorted(t for r in rounds for t in r)
    medians = [statistics.median(r) for r in rounds]
    return LatencyStats(
        median_ms=statistics.median(every),
        p90_ms=every[min(len(every) - 1, int(0.9 * len(every)))],
        min_ms=every[0],
        spread=max(medians) / min(medians),
        runs=len(every),
        batch_size=batch_size,
    )


def _warm_up(runs: list[Callable[[], Any]], target: TargetSpec) -> None:
    """Untimed runs until they stop changing: blocks of `warmup` runs of each, until every
    model's block median is within `warmup_tolerance` of its previous block's, or for at
    most `warmup_s` seconds. A fresh runtime session (and a process that just allocated
    much memory) runs slow at first, for a few runs; a fixed 0.25 s was a tenth of a conv
    trial here. Tolerance 0: always the full `warmup_s`.
    `warmup` 0 means blocks of one run, and no warm-up at all if `warmup_s` is 0 too."""
    if target.warmup == 0 and target.warmup_s == 0:
        return
    clock = time.perf_counter_ns
    deadline = clock() + int(target.warmup_s * 1e9)
    previous: list[float] | None = None
    while True:
        medians = [statistics.median(_round(run, max(target.warmup, 1))) for run in runs]
        if clock() >= deadline or (previous is not None and _settled(medians, previous, target)):
            return
        previous = medians


def _settled(medians: list[float], previous: list[float], target: TargetSpec) -> bool:
    return target.warmup_tolerance > 0 and all(
        abs(now / before - 1.0) <= target.warmup_tolerance
        for now, before in zip(medians, previous, strict=True)
        if before > 0
    )


def time_runner(run: Callable[[], Any], target: TargetSpec) -> LatencyStats:
    """The protocol for one model: warm-up, then `repeats` rounds of `iterations` runs."""
    _warm_up([run], target)
    rounds = [_round(run, target.iterations) for _ in range(target.repeats)]
    return _stats(rounds, target.batch_size)


@dataclass(frozen=True)
class PairedTiming:
    """A candidate timed against the reference, in one or more sessions."""

    ours: LatencyStats  # over every timed run of every session
    theirs: LatencyStats
    ratio: float  # candidate / reference: the median of the sessions' ratios
    session_ratios: tuple[float, ...]  # one per session, in the order they ran


Timers = tuple[Callable[[], Any], Callable[[], Any]]  # (candidate, reference)


def time_paired(
    run: Callable[[], Any],
    reference: Callable[[], Any],
    target: TargetSpec,
) -> tuple[LatencyStats, LatencyStats, float]:
    """The same protocol with the reference model timed in alternating rounds.

    Returns both models' statistics and the candidate/reference latency ratio. The machine
    drifts (clock, caches, neighbours) by 10-30 % over minutes, and now and then one round
    runs several times slower. So each round of the candidate is paired with the adjacent
    round of the reference (in ABBA order, which cancels a linear drift), and the ratio is
    the median of the per-pair ratios: one disturbed round cannot move it.
    """
    ours, theirs = _paired_rounds(run, reference, target)
    return _stats(ours, target.batch_size), _stats(theirs, target.batch_size), _ratio(ours, theirs)


def time_sessions(
    timers: Callable[[int], Timers | None], target: TargetSpec, sessions: int
) -> PairedTiming:
    """``time_paired`` in `sessions` sessions: `timers(k)` gives the candidate's and the
    reference's timers in session k (fresh sessions for k > 0), or None where there are
    no fresh sessions to be had (the timing ends there). The ratio is the median of the
    sessions' ratios, so one session's draw cannot set it."""
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    ratios = []
    for k in range(max(sessions, 1)):
        pair = timers(k)
        if pair is None:
            break
        run, reference = pair
        a, b = _paired_rounds(run, reference, target)
        ours += a
        theirs += b
        ratios.append(_ratio(a, b))
    return PairedTiming(
        _stats(ours, target.batch_size),
        _stats(theirs, target.batch_size),
        statistics.median(ratios),
        tuple(ratios),
    )


def _paired_rounds(
    run: Callable[[], Any], reference: Callable[[], Any], target: TargetSpec
) -> tuple[list[list[float]], list[list[float]]]:
    _warm_up([reference, run], target)
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    for i in range(target.repeats):
        if i % 2 == 0:
            theirs.append(_round(reference, target.iterations))
            ours.append(_round(run, target.iterations))
        else:
            ours.append(_round(run, target.iterations))
            theirs.append(_round(reference, target.iterations))
    return ours, theirs


def _ratio(ours: list[list[float]], theirs: list[list[float]]) -> float:
    """The median of the per-pair ratios of round medians."""
    return statistics.median(
        statistics.median(a) / statistics.median(b) for a, b in zip(ours, theirs, strict=True)
    )
