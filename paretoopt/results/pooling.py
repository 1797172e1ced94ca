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

from paretoopt.results.record import Latency, TrialRecord


def pooled(record: TrialRecord, peers: Iterable[TrialRecord]) -> TrialRecord:
    """`record` with its latency read from the pool of its structure (`peers`: other
    completed trials; those of another structure are left out)."""
    found = pool(record.latency, (p.latency for p in peers))
    if found is None:
        return record  # an older record, or a runtime that reports no structure
    return record.replace(latency_ms=found[0], latency=found[1])


def pool(own: Latency, peers: Iterable[Latency]) -> tuple[float, Latency] | None:
    """The pooled latency of `own`'s structure, and `own` with the pool's counts (its
    own latency_ms kept); None where it cannot be pooled. Also for a plan timed before
    fine-tuning (study/fidelity), which has no record yet."""
    if own.structure is None or not own.session_ratios or not own.reference_ms:
        return None
    group = [own, *(p for p in peers if _same(p, own))]
    group = [p for p in group if p.quiet is not False] or group
    ratios = [r for p in group for r in p.session_ratios]
    counted = dataclasses.replace(own, pooled_trials=len(group), pooled_sessions=len(ratios))
    return own.reference_ms * statistics.median(ratios), counted


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


def _same(a: Latency, b: Latency) -> bool:
    return (
        a.structure == b.structure and a.reference_ms == b.reference_ms and bool(a.session_ratios)
    )
