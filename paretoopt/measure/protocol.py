"""The latency protocol, the same for every runtime and target.

Warm-up runs, then ``repeats`` rounds of ``iterations`` timed runs each; the median and
p90 are taken over every timed run, the spread is the ratio of the slowest to the fastest
round median. Candidates are timed in alternation with the baseline (``time_paired``), so
that drift of the machine cancels out of the ratio between them.

At the machine's quiet level (``time_sessions``, ``target.quiet_rounds``): on an AVX2-only
EPYC VM the machine ran in two states, quiet 12-25 % of the time in stretches of 0.5-1.5 s,
and an int8 model slowed by more than the float baseline in the other one (ratio
0.203-0.209 quiet, 0.24-0.30 disturbed). The state is the machine's, not a session's: six
sessions of one file, open at once and timed in turn, moved together. So the ratio is the
median over round pairs whose reference round ran at the reference's quiet level, and
rounds go on (for at most ``target.quiet_s``) until there are enough of them and their
median is known to ``target.quiet_precision``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from paretoopt.config.space import TargetSpec


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
    ratio: float  # candidate / reference (see time_sessions)
    session_ratios: tuple[float, ...]  # one per session, in the order they ran
    pairs: int = 0  # round pairs timed
    quiet_pairs: int = 0  # of them, with both rounds at the machine's quiet level
    quiet: bool | None = None  # read from quiet pairs alone (None: quiet_rounds 0, nobody looked)
    quiet_level_ms: float | None = None  # the reference's fastest round on this machine
    candidate_level_ms: float | None = None  # ... and the candidate's (see time_sessions)
    error: float | None = None  # the quiet ratio's standard error, relative (ratio_error)


Timers = tuple[Callable[[], Any], Callable[[], Any]]  # (candidate, reference)


@dataclass(frozen=True)
class _Pair:
    """A round of the candidate and the adjacent round of the reference (medians, ms)."""

    ours: float
    theirs: float
    session: int

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs


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
    timers: Callable[[int], Timers | None],
    target: TargetSpec,
    sessions: int,
    quiet_level_ms: float | None = None,
    candidate_level_ms: float | None = None,
) -> PairedTiming:
    """``time_paired`` in `sessions` sessions: `timers(k)` gives the candidate's and the
    reference's timers in session k (fresh sessions for k > 0), or None where there are
    no fresh sessions to be had (the timing ends there).

    Read at the machine's quiet level (``target.quiet_rounds`` > 0): a pair is quiet when
    its reference round is within ``target.quiet_tolerance`` of the fastest reference
    round known (`quiet_level_ms`, or the fastest of these rounds), and its candidate
    round within as much of the candidate's fastest (`candidate_level_ms`, its structure's
    fastest round in earlier timings on this machine, or the fastest of these rounds: a
    timing that never saw the quiet state then does not take its own slow rounds for
    quiet ones). Rounds go on, for at
    most ``target.quiet_s`` seconds, until ``quiet_rounds`` pairs are quiet and their
    median ratio's standard error is at most ``quiet_precision`` of it; the ratio is then
    the median of the quiet pairs' ratios. A machine that never got quiet is read
    from all its pairs (``quiet`` False). With ``quiet_rounds`` 0 (``quiet`` None): the
    median of the sessions' ratios, each the median of its pairs'."""
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    pairs: list[_Pair] = []
    last: Timers | None = None  # the latest session's, which goes on for quiet pairs
    for k in range(max(sessions, 1)):
        pair = timers(k)
        if pair is None:
            break
        last = pair
        a, b = _paired_rounds(*pair, target)
        ours += a
        theirs += b
        medians = zip(map(statistics.median, a), map(statistics.median, b), strict=True)
        pairs += [_Pair(x, y, k) for x, y in medians]
    level = _quiet_level(quiet_level_ms, pairs)
    fastest = min([p.ours for p in pairs] + ([candidate_level_ms] if candidate_level_ms else []))
    quiet = _quiet(pairs, level, fastest, target)
    session = pairs[-1].session
    index = len(_of(pairs, session))  # the ABBA order goes on within the last session
    deadline = time.perf_counter() + target.quiet_s
    while last is not None and _wanting(quiet, target) and time.perf_counter() < deadline:
        new = _timed_pair(last, index, session, ours, theirs, target)
        pairs.append(new)
        index += 1
        if new.theirs < level or new.ours < fastest:  # a new quiet level: count again
            level, fastest = min(level, new.theirs), min(fastest, new.ours)
            quiet = _quiet(pairs, level, fastest, target)
        else:
            quiet += _quiet([new], level, fastest, target)
    stats = _stats(ours, target.batch_size), _stats(theirs, target.batch_size)
    return _reading(pairs, level, fastest, target, *stats)


def _timed_pair(
    timers: Timers,
    i: int,
    session: int,
    ours: list[list[float]],
    theirs: list[list[float]],
    target: TargetSpec,
) -> _Pair:
    """One round of each in ABBA order (the reference first on even rounds)."""
    run, reference = timers
    if i % 2 == 0:
        theirs.append(_round(reference, target.iterations))
        ours.append(_round(run, target.iterations))
    else:
        ours.append(_round(run, target.iterations))
        theirs.append(_round(reference, target.iterations))
    return _Pair(statistics.median(ours[-1]), statistics.median(theirs[-1]), session)


def _wanting(quiet: list[_Pair], target: TargetSpec) -> bool:
    """Whether the reading needs more quiet pairs: fewer than ``quiet_rounds``, or a
    median ratio not yet known to ``quiet_precision``. One quiet pair's ratio varied by
    about 2 % (standard deviation) on the 2-core EPYC VMs, so 5 pairs left readings of
    one file 3-7 % apart; the precision is what makes a reading repeatable."""
    if target.quiet_rounds == 0:
        return False
    if len(quiet) < target.quiet_rounds:
        return True
    return target.quiet_precision > 0 and ratio_error(quiet) > target.quiet_precision


def ratio_error(pairs: list[_Pair]) -> float:
    """The standard error of the pairs' median ratio, as a fraction of it: 1.2533 (the
    median's asymptotic efficiency against the mean, for normal errors) x SD / sqrt(n).
    Infinite with fewer than two pairs."""
    if len(pairs) < 2:
        return math.inf
    ratios = [p.ratio for p in pairs]
    return 1.2533 * statistics.stdev(ratios) / math.sqrt(len(ratios)) / statistics.median(ratios)


def _quiet_level(known: float | None, pairs: list[_Pair]) -> float:
    fastest = min(p.theirs for p in pairs)
    return fastest if known is None else min(known, fastest)


def _quiet(pairs: list[_Pair], level: float, fastest: float, target: TargetSpec) -> list[_Pair]:
    """The pairs with both rounds at their quiet level: the reference's within tolerance
    of `level`, the candidate's of its `fastest` round. The state can change between the
    two rounds of a pair; a pair whose candidate round was disturbed is left out."""
    bound = 1.0 + target.quiet_tolerance
    return [p for p in pairs if p.theirs <= level * bound and p.ours <= fastest * bound]


def _reading(
    pairs: list[_Pair],
    level: float,
    fastest: float,
    target: TargetSpec,
    ours: LatencyStats,
    theirs: LatencyStats,
) -> PairedTiming:
    """The ratio, each session's (of a quiet reading: the sessions with quiet pairs, over
    those; pooling reads them), and how quiet the machine was."""
    quiet_pairs = _quiet(pairs, level, fastest, target)
    quiet = len(quiet_pairs) >= target.quiet_rounds if target.quiet_rounds > 0 else None
    chosen = quiet_pairs if quiet else pairs
    sessions = sorted({p.session for p in chosen})
    per_session = tuple(statistics.median(p.ratio for p in _of(chosen, k)) for k in sessions)
    ratio = statistics.median(p.ratio for p in chosen) if quiet else statistics.median(per_session)
    counts = len(pairs), len(quiet_pairs)
    error = ratio_error(quiet_pairs) if quiet and len(quiet_pairs) > 1 else None
    return PairedTiming(ours, theirs, ratio, per_session, *counts, quiet, level, fastest, error)


def _of(pairs: list[_Pair], session: int) -> list[_Pair]:
    return [p for p in pairs if p.session == session]


def round_medians(run: Callable[[], Any], target: TargetSpec, seconds: float) -> list[float]:
    """Round medians of one model, timed for `seconds` (at least `repeats` rounds): the
    fastest is its quiet level on this machine."""
    _warm_up([run], target)
    deadline = time.perf_counter() + seconds
    medians: list[float] = []
    while len(medians) < target.repeats or time.perf_counter() < deadline:
        medians.append(statistics.median(_round(run, target.iterations)))
    return medians


def quiet_reference(medians: list[float], target: TargetSpec) -> tuple[float, float]:
    """The quiet level of round medians (the fastest) and the median of the quiet ones."""
    level = min(medians)
    quiet = [m for m in medians if m <= level * (1.0 + target.quiet_tolerance)]
    return level, statistics.median(quiet)


def _paired_rounds(
    run: Callable[[], Any], reference: Callable[[], Any], target: TargetSpec
) -> tuple[list[list[float]], list[list[float]]]:
    _warm_up([reference, run], target)
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    for i in range(target.repeats):
        _timed_pair((run, reference), i, 0, ours, theirs, target)
    return ours, theirs


def _ratio(ours: list[list[float]], theirs: list[list[float]]) -> float:
    """The median of the per-pair ratios of round medians."""
    return statistics.median(
        statistics.median(a) / statistics.median(b) for a, b in zip(ours, theirs, strict=True)
    )
