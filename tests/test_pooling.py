"""One latency per deployed structure: sessions of every trial of a structure pool."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from paretoopt.results.pooling import pool_study, pooled

from .test_record import LATENCY, record


def timed(structure: str | None, ratios: list[float], reference: float = 2.0):
    latency = dataclasses.replace(
        LATENCY,
        structure=structure,
        session_ratios=ratios,
        reference_ms=reference,
        ratio_to_baseline=statistics.median(ratios) if ratios else None,
        latency_ms=reference * statistics.median(ratios) if ratios else None,
    )
    return record(latency=latency, latency_ms=latency.latency_ms)


def test_a_trial_reads_the_pool_of_its_structure_and_keeps_its_own_figure():
    a, b = timed("s1", [0.30, 0.31, 0.46]), timed("s1", [0.29, 0.30, 0.45])
    other = timed("s2", [0.9, 0.9, 0.9])
    got = pooled(a, [b, other])
    ratios = [0.30, 0.31, 0.46, 0.29, 0.30, 0.45]
    assert got.latency_ms == pytest.approx(2.0 * statistics.median(ratios))
    assert got.latency.latency_ms == a.latency.latency_ms  # its own sessions alone
    assert (got.latency.pooled_trials, got.latency.pooled_sessions) == (2, 6)
    assert pooled(other, [a, b]).latency_ms == pytest.approx(1.8)  # nothing to pool with


def test_records_without_a_structure_or_sessions_are_left_alone():
    old = timed(None, [0.5, 0.6])
    assert pooled(old, [timed(None, [0.1])]) == old
    unsessioned = timed("s1", [])
    assert pooled(unsessioned, [timed("s1", [0.1])]) == unsessioned
    # a different latency scale (another reference) is another study's figure
    far = timed("s1", [0.5], reference=3.0)
    assert pooled(timed("s1", [0.3]), [far]).latency.pooled_trials == 1


def test_the_study_frame_gives_one_figure_per_structure():
    records = [timed("s1", [0.30, 0.46]), None, timed("s1", [0.31]), timed("s2", [0.7])]
    out = pool_study(records)
    assert out[1] is None
    assert out[0].latency_ms == out[2].latency_ms == pytest.approx(2.0 * 0.31)
    assert out[3].latency_ms == pytest.approx(1.4)


def test_a_structure_pools_its_quiet_trials_where_it_has_any():
    def read(ratios: list[float], quiet: bool | None):
        r = timed("s1", ratios)
        return r.replace(latency=dataclasses.replace(r.latency, quiet=quiet))

    quiet, other_quiet = read([0.20], True), read([0.21], True)
    disturbed = read([0.38], False)  # the machine never got quiet while it was timed
    got = pooled(disturbed, [quiet, other_quiet])
    assert got.latency_ms == pytest.approx(2.0 * 0.205)  # the quiet ones' figure
    assert (got.latency.pooled_trials, got.latency.pooled_sessions) == (2, 2)
    assert got.latency.latency_ms == pytest.approx(2.0 * 0.38)  # its own stays
    assert pooled(disturbed, [read([0.40], False)]).latency_ms == pytest.approx(2.0 * 0.39)
    older = read([0.30], None)  # timed before quiet rounds: pooled as before
    assert pooled(older, [quiet]).latency_ms == pytest.approx(2.0 * 0.25)
