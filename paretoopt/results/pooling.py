"""One latency per deployed structure.

Trials whose deployed graphs are structurally identical (``Latency.structure``: same
operators, shapes, types and kernels, weights aside) run the same kernels on the same
data, so their measurements are samples of one latency. Each trial's sessions
(``Latency.session_ratios``, candidate/baseline) join one pool per structure, and the
trial's ``latency_ms`` is the study's reference times the pool's median ratio. The
trial's own figure stays in ``latency.latency_ms``.

A trial is told to the sampler with the pool as it stands when it ends; the frames pool
over the whole study, so trials of one structure report one figure.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

from paretoopt.results.record import TrialRecord


def pooled(record: TrialRecord, peers: Iterable[TrialRecord]) -> TrialRecord:
    """`record` with its latency read from the pool of its structure (`peers`: other
    completed trials; those of another structure are left out)."""
    own = record.latency
    if own.structure is None or not own.session_ratios or not own.reference_ms:
        return record  # an older record, or a runtime that reports no structure
    group = [record, *(p for p in peers if _same(p, record))]
    group = [p for p in group if p.latency.quiet is not False] or group
    ratios = [r for p in group for r in p.latency.session_ratios]
    latency = dataclasses.replace(own, pooled_trials=len(group), pooled_sessions=len(ratios))
    return record.replace(latency_ms=own.reference_ms * statistics.median(ratios), latency=latency)


def pool_study(records: Sequence[TrialRecord | None]) -> list[TrialRecord | None]:
    """Every record read from the pool of all the study's trials of its structure."""
    groups: dict[str, list[TrialRecord]] = defaultdict(list)
    for r in records:
        if r is not None and r.latency.structure is not None:
            groups[r.latency.structure].append(r)
    return [
        None
        if r is None
        else pooled(r, [p for p in groups.get(str(r.latency.structure), []) if p is not r])
        for r in records
    ]


def _same(a: TrialRecord, b: TrialRecord) -> bool:
    return (
        a.latency.structure == b.latency.structure
        and a.latency.reference_ms == b.latency.reference_ms
        and bool(a.latency.session_ratios)
    )
