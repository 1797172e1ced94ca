"""The latency ratio read at the machine's quiet level (measure/protocol.time_sessions).

A scripted machine: runs return their duration as a DeviceTime, disturbed (slower, and
the int8 candidate slower by more than the float baseline, as measured on an AVX2 EPYC)
for the first runs and quiet after them, so every figure below is exact."""

from __future__ import annotations

import dataclasses
import statistics
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from paretoopt.config.space import TargetSpec
from paretoopt.measure.protocol import (
    DeviceTime,
    _Pair,
    quiet_reference,
    ratio_error,
    round_medians,
    time_sessions,
)
from paretoopt.study.trial import QUIET_TRIES, confirm

SPEC = TargetSpec(warmup=0, warmup_s=0.0, repeats=4, iterations=3, quiet_rounds=5, quiet_s=60.0)
QUIET = (0.2, 1.0)  # candidate, reference (ms)
DISTURBED = (0.5, 1.3)
PAIR = 2 * SPEC.iterations  # runs in one round pair


class Machine:
    """Disturbed for its first `disturbed` runs, of either model; quiet after them."""

    def __init__(self, disturbed: int) -> None:
        self.runs = 0
        self.disturbed = disturbed

    def _timer(self, which: int):
        def run() -> DeviceTime:
            self.runs += 1
            state = DISTURBED if self.runs <= self.disturbed else QUIET
            return DeviceTime(state[which])

        return run

    def timers(self, k: int):
        return self._timer(0), self._timer(1)


def test_extra_rounds_keep_the_abba_order_of_their_session():
    spec = dataclasses.replace(SPEC, repeats=3, quiet_s=0.05)
    order: list[str] = []

    def timers(k: int):
        def run(name: str):
            return lambda: (order.append(name), DeviceTime(1.0 if name == "r" else 0.5))[1]

        return (run("c"), run("r")) if k < 2 else None

    spec = dataclasses.replace(spec, iterations=1, quiet_rounds=100)  # never enough
    time_sessions(timers, spec, 2, quiet_level_ms=0.1)
    rounds = "".join(order)
    # session 0: rc cr rc; session 1: rc cr rc, then on: cr rc cr ...
    assert rounds.startswith("rccrrc" + "rccrrc" + "crrccr")


def test_rounds_go_on_until_enough_pairs_are_quiet_and_the_ratio_is_theirs():
    machine = Machine(disturbed=4 * PAIR)  # the fixed rounds all disturbed
    got = time_sessions(machine.timers, SPEC, 1)
    assert got.ratio == pytest.approx(0.2)  # the quiet state's, not 0.385 nor a mixture
    assert (got.pairs, got.quiet_pairs, got.quiet) == (9, 5, True)
    assert got.quiet_level_ms == pytest.approx(1.0)
    assert got.session_ratios == (pytest.approx(0.2),)
    assert got.ours.runs == 9 * SPEC.iterations  # every timed run is in the statistics


def _wavering(iterations: int):
    """Quiet all along, the candidate's rounds alternating 0.195 and 0.205 ms (a pair's
    ratio varies by 2.5 %, as one quiet pair's did on the EPYC VMs)."""
    runs = [0]

    def candidate() -> DeviceTime:
        runs[0] += 1
        return DeviceTime(0.195 if (runs[0] - 1) // iterations % 2 == 0 else 0.205)

    return lambda k: (candidate, lambda: DeviceTime(1.0))


def test_a_quiet_reading_goes_on_until_its_ratio_is_known_to_the_precision_asked():
    spec = dataclasses.replace(SPEC, repeats=2, quiet_precision=0.01)
    got = time_sessions(_wavering(spec.iterations), spec, 1)
    assert got.quiet and got.quiet_pairs == got.pairs > spec.quiet_rounds
    ratios = [0.195 if i % 2 == 0 else 0.205 for i in range(got.pairs)]
    pairs = [_Pair(r, 1.0, 0) for r in ratios]
    assert got.error == pytest.approx(ratio_error(pairs)) and got.error <= 0.01
    assert ratio_error(pairs[:-1]) > 0.01  # it stopped at the first pair that got there
    assert got.ratio == pytest.approx(statistics.median(ratios))
    exact = time_sessions(_wavering(spec.iterations), spec, 1)
    assert exact.pairs == got.pairs  # the same machine, the same reading


def test_precision_0_stops_at_quiet_rounds_and_no_time_left_still_reads_quiet():
    spec = dataclasses.replace(SPEC, repeats=2, quiet_precision=0.0)
    got = time_sessions(_wavering(spec.iterations), spec, 1)
    assert (got.pairs, got.quiet_pairs) == (spec.quiet_rounds, spec.quiet_rounds)
    hurried = dataclasses.replace(spec, repeats=6, quiet_precision=0.001, quiet_s=0.0)
    got = time_sessions(_wavering(spec.iterations), hurried, 1)
    # enough quiet pairs, not the precision: quiet, with the error it reached
    assert got.quiet and got.pairs == 6 and got.error > 0.001


def test_the_ratio_error_is_the_medians_standard_error_relative_to_it():
    pairs = [_Pair(x, 1.0, 0) for x in (0.9, 1.0, 1.1, 1.0)]
    assert ratio_error(pairs) == pytest.approx(1.2533 * statistics.stdev([0.9, 1.0, 1.1, 1.0]) / 2)
    assert ratio_error(pairs[:1]) == float("inf")


def test_a_machine_that_never_gets_quiet_is_read_from_every_pair_and_flagged():
    spec = dataclasses.replace(SPEC, quiet_s=0.0)
    got = time_sessions(Machine(disturbed=10**9).timers, spec, 1)
    assert got.ratio == pytest.approx(0.5 / 1.3)
    assert (got.pairs, got.quiet_pairs, got.quiet) == (4, 4, False)  # 4 < quiet_rounds


def test_a_known_quiet_level_rules_out_pairs_slower_than_it():
    spec = dataclasses.replace(SPEC, quiet_s=0.05)
    got = time_sessions(Machine(disturbed=10**9).timers, spec, 1, quiet_level_ms=1.0)
    assert got.quiet_pairs == 0 and got.quiet is False and got.quiet_level_ms == 1.0
    assert got.pairs > spec.repeats  # it went on looking, for quiet_s at most
    assert got.ratio == pytest.approx(0.5 / 1.3)


def test_a_structures_known_level_keeps_a_timing_stuck_slow_from_reading_as_quiet():
    """The candidate slow (int8 in the disturbed state) while the baseline is quiet: on
    its own, the timing takes the slow rounds for the candidate's quiet level and reads
    0.3; told its structure's fastest round from an earlier timing (0.2), it finds no
    quiet pair and says so, so that the figure is taken again."""
    spec = dataclasses.replace(SPEC, quiet_s=0.05)

    def timers(k: int):
        return (lambda: DeviceTime(0.3)), (lambda: DeviceTime(1.0))

    alone = time_sessions(timers, spec, 1, quiet_level_ms=1.0)
    assert alone.quiet and alone.ratio == pytest.approx(0.3)
    assert alone.candidate_level_ms == pytest.approx(0.3)
    told = time_sessions(timers, spec, 1, quiet_level_ms=1.0, candidate_level_ms=0.2)
    assert told.quiet is False and told.quiet_pairs == 0
    assert told.candidate_level_ms == pytest.approx(0.2)  # kept for the next timing


def test_quiet_pairs_of_any_session_count_and_only_their_sessions_are_pooled():
    spec = dataclasses.replace(SPEC, repeats=5)
    machine = Machine(disturbed=5 * PAIR)  # session 0 disturbed, session 1 quiet
    got = time_sessions(machine.timers, spec, 2)
    assert got.ratio == pytest.approx(0.2) and got.quiet
    assert got.session_ratios == (pytest.approx(0.2),)  # the disturbed session is left out
    assert (got.pairs, got.quiet_pairs) == (10, 5)


def test_quiet_rounds_0_is_the_median_of_the_sessions_whatever_the_state():
    spec = dataclasses.replace(SPEC, repeats=5, quiet_rounds=0)
    got = time_sessions(Machine(disturbed=5 * PAIR).timers, spec, 2)
    assert got.ratio == pytest.approx((0.5 / 1.3 + 0.2) / 2)
    assert got.pairs == 10 and got.quiet is None  # nobody looked


def test_no_fresh_session_ends_the_sessions_but_not_the_search_for_quiet_pairs():
    machine = Machine(disturbed=4 * PAIR)

    def timers(k: int):
        return machine.timers(k) if k == 0 else None

    got = time_sessions(timers, SPEC, 3)
    assert got.ratio == pytest.approx(0.2) and got.pairs == 9 and len(got.session_ratios) == 1


def test_the_quiet_reference_is_the_median_of_rounds_near_the_fastest():
    assert quiet_reference([1.3, 1.0, 1.05, 1.2], SPEC) == (1.0, pytest.approx(1.025))
    machine = Machine(disturbed=3 * SPEC.iterations)
    medians = round_medians(machine.timers(0)[1], SPEC, seconds=0.0)
    assert medians == [1.3, 1.3, 1.3, 1.0]  # `repeats` rounds at least


def _confirming(quiet: list[bool], quiet_s: float) -> tuple[SimpleNamespace, list[int]]:
    """A study context whose target answers with `quiet`, one figure per timing."""
    calls: list[int] = []

    def latency(runner: object, file: object, structure: object = None) -> dict:
        calls.append(1)
        return {"latency_ms": float(len(calls)), "quiet": quiet[len(calls) - 1]}

    backend = SimpleNamespace(reload=lambda directory, build: "runner", file="model.onnx")
    target = SimpleNamespace(
        backend=backend, gate=SimpleNamespace(computing=nullcontext), latency=latency
    )
    space = SimpleNamespace(target=dataclasses.replace(SPEC, quiet_s=quiet_s))
    return SimpleNamespace(target=target, build_model=None, space=space), calls


def test_a_confirmation_is_taken_again_until_the_machine_is_quiet(tmp_path):
    ctx, calls = _confirming([False, True, True], quiet_s=5.0)
    assert confirm(ctx, tmp_path) == {"latency_ms": 2.0, "quiet": True, "tries": 2}
    ctx, calls = _confirming([False] * QUIET_TRIES, quiet_s=5.0)
    assert confirm(ctx, tmp_path)["tries"] == QUIET_TRIES == len(calls)  # then it gives up
    ctx, calls = _confirming([False, True], quiet_s=0.0)
    assert confirm(ctx, tmp_path)["tries"] == 1  # no time to look for a quiet machine
