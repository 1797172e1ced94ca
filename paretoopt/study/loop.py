"""The trial loop: claim a trial, run it, tell the study; the same loop for the search
process and for every worker, on one machine or many.

A claim happens under the study's claim lock (see ``sharing``), so the study ends with
exactly its requested number of trials. Trial 0 is the uncompressed baseline; candidates
wait while it runs elsewhere, since every figure is read against it. Constraints go
through Optuna 5's ``trial.set_constraint``, so infeasible trials never enter the front.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from paretoopt.config.metrics import METRICS, not_finite
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import Space
from paretoopt.errors import StudyError, one_line
from paretoopt.results.frames import BASELINE_ATTR, COMPUTE_ATTR, STOP_ATTR, TRIALS_DIR
from paretoopt.results.pooling import pooled
from paretoopt.results.record import TrialRecord, stored_record
from paretoopt.results.report import Reporter
from paretoopt.study.anchors import queue_anchors
from paretoopt.study.fidelity import Stopped, StudyGauge, fidelity_of
from paretoopt.study.sampling import sample_plan
from paretoopt.study.session import (
    Session,
    baseline,
    counted,
    ensure_baseline,
    finished,
    store_baseline,
)
from paretoopt.study.sharing import GRACE_BEATS, claim, claim_lock, fail_stale, heartbeat

if TYPE_CHECKING:
    from paretoopt.study.trial import StudyContext

REASON_LIMIT = 500  # characters of a failure reason kept in the study
CLAIM_POLL_S = 1.0  # how often a worker looks again while the baseline runs elsewhere


def run_trials(
    session: Session,
    ctx: StudyContext,
    reporter: Reporter,
    max_failures: int | None = None,
    limit: int | None = None,
) -> None:
    """Claim and run trials until the study holds its total (or `limit` trials ran here)."""
    study = session.study
    reasons: list[str] = []
    reporter.start(session.space, finished(study))
    ran = 0
    while limit is None or ran < limit:
        trial = _claim(session, ctx)
        if trial is None:
            break
        ran += 1
        try:
            _run_one(session, ctx, trial, reporter, reasons, max_failures)
        except UpdateFinishedTrialError:  # declared dead by another worker, plan queued again
            reporter.log(
                f"[yellow]warning[/]: trial {trial.number} was taken over: its heartbeats "
                f"did not reach the database for {GRACE_BEATS} intervals"
            )
        reporter.advance(finished(study))


def _run_one(
    session: Session,
    ctx: StudyContext,
    trial: optuna.Trial,
    reporter: Reporter,
    reasons: list[str],
    max_failures: int | None,
) -> None:
    study, space = session.study, session.space
    start = time.perf_counter()
    try:
        with heartbeat(session.storage, trial):
            record, base, feasible = _evaluate(session, ctx, trial)
            trial.set_user_attr(COMPUTE_ATTR, round(time.perf_counter() - start, 3))
    except UpdateFinishedTrialError:
        raise
    except Stopped as stop:  # rejected before fine-tuning, or stopped at a rung: data too
        trial.set_user_attr(STOP_ATTR, stop.to_attr())
        trial.set_user_attr(COMPUTE_ATTR, round(time.perf_counter() - start, 3))
        study.tell(trial, state=TrialState.PRUNED)
        reporter.trial_stopped(trial.number, stop.kind, stop.reason)
    except Exception as exc:  # a failed trial is data: record the reason, go on
        if _disk_full(exc):  # not the plan's fault: the session stops, the trial reruns
            _interrupt(study, trial, DISK_FULL)
            raise StudyError(
                f"no space left on device while trial {trial.number} ran (in "
                f"{session.directory}): the search stops, and the trial runs again when "
                "the study resumes; free some space and run the same command again"
            ) from exc
        reason = f"{type(exc).__name__}: {one_line(str(exc))}"[:REASON_LIMIT]
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        reporter.trial_failed(trial.number, reason)
        if trial.user_attrs.get(BASELINE_ATTR):
            raise StudyError(
                f"the baseline trial failed, so no figure can be read against it: {reason}"
            ) from exc
        reasons.append(reason)
        if max_failures is not None and len(reasons) >= max_failures:
            raise StudyError(_failure_summary(reasons, max_failures)) from exc
    else:
        study.tell(trial, told_values(space, record, base))
        reporter.trial_done(trial.number, record, time.perf_counter() - start, base, feasible)


DISK_FULL = "interrupted: no space left on device"  # replaced on resume, not counted


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC or a full quota, raw or wrapped by a library that kept only the message."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain of causes, bounded (a chain can loop)
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _interrupt(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Mark the trial interrupted, if the storage still takes a write (a full disk may
    refuse it: the trial then stays RUNNING and the next start fails it as interrupted)."""
    with contextlib.suppress(Exception):
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)


def told_values(
    space: Space, record: TrialRecord | Mapping[str, Any], base: dict[str, Any]
) -> list[float]:
    """The objective values the sampler learns from. Accuracy above the baseline's counts
    as the baseline's: compression is the goal, and on a validation set of a few hundred
    samples a gain of a point or less is mostly noise. Uncapped, an uncompressed trial that
    scored two images better stays among the sampler's best for the rest of the study.
    The record, and the front built from it, keep the measured figure."""
    values = []
    for name in space.metrics:
        m = METRICS[name]
        value = float(record[m.field])
        values.append(min(value, float(base[m.field])) if m.maximize else value)
    return values


def _claim(session: Session, ctx: StudyContext) -> optuna.Trial | None:
    """The next trial, unless the finished and running ones already make the total. Under
    a lock, so that workers (on any machine) never start one trial too many. Candidates
    wait while the baseline runs elsewhere: every figure is read against it. The anchors
    are queued once the baseline is done, so that a baseline queued again (its worker
    died) is never behind them."""
    study, name = session.study, session.space.study
    while True:
        with claim_lock(session.storage, session.directory, name):
            fail_stale(study, session.storage)
            trials = study.get_trials(deepcopy=False)  # one snapshot: no trial counted twice
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if counted(trials) + running >= session.space.search.trials:
                return None
            if not _baseline_elsewhere(trials):
                ensure_baseline(study, trials)  # queued again if its worker died for good
                if _baseline_done(trials):
                    queue_anchors(study, session.space, ctx.layer_names, ctx.quant_layers, trials)
                return claim(session.storage, study)
        time.sleep(CLAIM_POLL_S)


def _baseline_done(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return any(t.user_attrs.get(BASELINE_ATTR) and t.state == TrialState.COMPLETE for t in trials)


def _baseline_elsewhere(trials: list[optuna.trial.FrozenTrial]) -> bool:
    """The baseline is not done yet and another process is running it."""
    states = {t.state for t in trials if t.user_attrs.get(BASELINE_ATTR)}
    return TrialState.RUNNING in states and TrialState.COMPLETE not in states


def drain(
    session: Session, ctx: StudyContext, reporter: Reporter, max_failures: int | None
) -> None:
    """Wait for the trials other workers still run, and run the retry of any whose worker
    died, so that the front is assembled from the whole study. The end is decided under
    the claim lock: no worker is then between failing a dead trial and starting its retry."""
    study, told = session.study, -1
    while True:
        run_trials(session, ctx, reporter, max_failures)
        with claim_lock(session.storage, session.directory, session.space.study):
            fail_stale(study, session.storage)
            trials = study.get_trials(deepcopy=False)
            busy = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
            if not busy and counted(trials) >= session.space.search.trials:
                return
        if busy != told:
            reporter.log(f"waiting for {busy} trial(s) running in other workers")
            told = busy
        time.sleep(CLAIM_POLL_S)


def _failure_summary(reasons: list[str], limit: int) -> str:
    """One line: how many failed, and the commonest reasons (the part before any detail)."""
    from collections import Counter

    kinds = Counter(r.split(":", 1)[0] + ": " + r.split(":", 1)[-1].strip()[:80] for r in reasons)
    top = "; ".join(f"{n}x {kind}" for kind, n in kinds.most_common(3))
    return (
        f"--max-failures: {len(reasons)} trials of this session failed (limit {limit}); "
        f"finished trials are kept. Reasons: {top}"
    )


def _evaluate(
    session: Session,
    ctx: StudyContext,
    trial: optuna.Trial,
) -> tuple[TrialRecord, dict[str, Any], bool]:
    """Run one trial; return its record, the baseline's, and whether it is feasible."""
    from paretoopt.study.trial import run_trial

    is_baseline = bool(trial.user_attrs.get(BASELINE_ATTR))
    plan = (
        CompressionPlan()
        if is_baseline
        else sample_plan(trial, session.space, ctx.layer_names, ctx.quant_layers)
    )
    trial.set_user_attr("plan_summary", plan.summary())
    out_dir = session.directory / TRIALS_DIR / str(trial.number)
    fidelity = fidelity_of(session.space)
    gauge = None
    if not is_baseline and not fidelity.full:
        gauge = StudyGauge(session.space, session.study, trial, baseline(session), fidelity)
    record = run_trial(ctx, plan, out_dir, session.space.search.seed + trial.number, gauge)
    bad = not_finite(record, session.space.metrics)
    if bad:  # Optuna would fail the trial silently, with no reason
        raise ValueError(f"objective(s) {', '.join(bad)} not finite")
    artifact = str(out_dir.relative_to(session.directory))
    record = record.replace(artifact=artifact, plan_summary=plan.summary())
    record = pooled(record, _completed_records(session.study))  # one latency per structure
    if is_baseline:
        store_baseline(session, record)
    base = baseline(session)  # read once: the constraints and the report both need it
    for key, value in record.to_attrs().items():
        trial.set_user_attr(key, value)
    violations = _set_constraints(trial, session.space, record, base)
    return record, base, all(v <= 0 for v in violations.values())


def _completed_records(study: optuna.Study) -> list[TrialRecord]:
    states = (TrialState.COMPLETE,)
    found = (stored_record(t.user_attrs) for t in study.get_trials(False, states=states))
    return [r for r in found if r is not None]


def _set_constraints(
    trial: optuna.Trial,
    space: Space,
    record: TrialRecord,
    base: dict[str, Any],
) -> dict[str, float]:
    """Optuna 5 constraints: a value <= 0 is feasible. One per metric whose limit the
    space sets, under the metric's constraint name."""
    out = {}
    for m in METRICS.values():
        limit = getattr(space.constraints, m.limit.key)
        if limit is not None:
            out[m.limit.name] = m.violation(float(record[m.field]), base.get(m.field), limit)
    for key, value in out.items():
        trial.set_constraint(key, float(value))
    return out
