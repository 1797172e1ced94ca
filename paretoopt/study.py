"""The search: thin glue between the space file, Optuna and the trial pipeline.

``search`` validates the space, prepares the baseline, opens (or resumes) the study in
``results/<study>/`` and runs trials until the study holds the requested number. Trial 0
is the uncompressed baseline, so every figure can be read relative to it. Constraints go
through Optuna 5's ``trial.set_constraint``, so infeasible trials never enter the front.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from .errors import StudyError, one_line
from .plan import CompressionPlan
from .report import Reporter, SilentReporter
from .results import (
    BASELINE_ATTR,
    METRIC_COLUMNS,
    TRIALS_DIR,
    StudyResults,
    load_results,
    write_tables,
)
from .sampling import make_sampler, sample_plan
from .session import (
    Session,
    baseline,
    check_resumable,
    check_storage,
    counted,
    ensure_baseline,
    existing_trials,
    fail_interrupted,
    finished,
    open_session,
    store_baseline,
    store_confirmations,
    study_reference,
    write_metadata,
)
from .sharing import GRACE_BEATS, claim, claim_lock, fail_stale, heartbeat
from .space import Space, load_space
from .workers import join_workers, share_cores, start_workers

if TYPE_CHECKING:
    from .pipeline import StudyContext

REASON_LIMIT = 500  # characters of a failure reason kept in the study
CLAIM_POLL_S = 1.0  # how often a worker looks again while the baseline runs elsewhere


# --------------------------------------------------------------------------- the loop


def search(
    space: Space | str | Path,
    *,
    trials: int | None = None,
    results_root: str | Path = "results",
    reporter: Reporter | None = None,
    max_failures: int | None = None,
    workers: int = 1,
) -> StudyResults:
    """Run (or resume) the study a space describes; return its results.

    ``trials`` overrides ``search.trials`` (the total, baseline included), so a finished
    study can be continued: ``search("conv.yaml", trials=60)``. ``max_failures`` stops the
    session once that many of its trials have failed, with a summary of the reasons.
    ``workers`` runs that many trial processes on this machine, sharing the study; their
    timing is kept apart from each other's training by the measurement gate.
    """
    if not isinstance(space, Space):
        space = load_space(space)
    if trials is not None:
        space = space.with_trials(trials)
    reporter = reporter or SilentReporter()
    results_root = Path(results_root)
    check_resumable(space, results_root / space.study)  # refuse before training anything
    check_storage(space, results_root / space.study)
    from .pipeline import prepare  # torch is imported only once the space is valid

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = prepare(space, results_root / ".cache", log=reporter.log)
    # measured before the study folder is touched: a model the runtime cannot take fails
    # here with one line and leaves nothing behind
    _calibrate(space, results_root / space.study, ctx, reporter)
    offset = existing_trials(space, results_root)
    sampler = make_sampler(space, offset, ctx.layer_names, ctx.quant_layers)
    session = open_session(space, results_root, sampler)
    try:
        lost = fail_interrupted(session)
        if lost:
            reporter.log(
                f"resume: {lost} trial(s) interrupted earlier are marked failed and "
                "will be replaced"
            )
        with claim_lock(session.storage, session.directory, space.study):
            ensure_baseline(session.study)  # a worker may be queueing it too
        write_metadata(session, ctx)
        helpers: list[Any] = []
        try:
            if workers > 1:  # the baseline first: no candidate runs without it
                run_trials(session, ctx, reporter, max_failures, limit=_baseline_pending(session))
                helpers = start_workers(space, results_root, workers - 1, max_failures)
                share_cores(workers)
            run_trials(session, ctx, reporter, max_failures)
            join_workers(helpers, reporter)
            if not session.embedded:
                _drain(session, ctx, reporter, max_failures)
        finally:  # an interrupt must not leave a live progress display or helpers behind
            reporter.stop()
            for helper in helpers:
                if helper.is_alive():
                    helper.terminate()
                    helper.join()
        return finish(session, reporter, ctx)
    finally:
        session.close()


def _calibrate(space: Space, directory: Path, ctx: StudyContext, reporter: Reporter) -> None:
    from .pipeline import calibrate

    try:
        with tempfile.TemporaryDirectory(prefix="paretoopt-") as tmp:
            cal = calibrate(ctx, Path(tmp), study_reference(directory))
    except Exception as exc:
        raise StudyError(
            f"the baseline cannot be measured in the target runtime "
            f"({space.target.runtime}): {type(exc).__name__}: "
            f"{one_line(str(exc))[:REASON_LIMIT]}"
        ) from exc
    rounds = ", ".join(f"{m:.4f}" for m in cal["medians_ms"])
    if cal["reference_ms"] != cal["measured_ms"]:
        reporter.log(
            f"calibration: baseline latency now {rounds} ms; the study's reference "
            f"stays {cal['reference_ms']:.4f} ms (candidates are timed against the "
            "baseline)"
        )
    else:
        reporter.log(
            f"calibration: baseline latency {cal['reference_ms']:.4f} ms "
            f"(rounds {rounds}; spread {cal['spread']:.2f})"
        )
    if cal["spread"] > 1.0 + space.target.max_spread:  # too noisy to rank candidates
        reporter.log(
            f"[yellow]warning[/]: the baseline's latency varies by "
            f"{(cal['spread'] - 1) * 100:.0f} % between rounds; latency ranks will be "
            "noisy. Stop other work on this machine for a fair comparison."
        )


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
        trial = _claim(session)
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
        with heartbeat(session.storage, space.study, trial):
            record, base, feasible = _evaluate(session, ctx, trial)
    except UpdateFinishedTrialError:
        raise
    except Exception as exc:  # a failed trial is data: record the reason, go on
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
        study.tell(trial, [record[METRIC_COLUMNS[m]] for m in space.metrics])
        reporter.trial_done(trial.number, record, time.perf_counter() - start, base, feasible)


def _claim(session: Session) -> optuna.Trial | None:
    """The next trial, unless the finished and running ones already make the total. Under
    a lock, so that workers (on any machine) never start one trial too many. Candidates
    wait while the baseline runs elsewhere: every figure is read against it."""
    study, name = session.study, session.space.study
    while True:
        with claim_lock(session.storage, session.directory, name):
            fail_stale(study)
            trials = study.get_trials(deepcopy=False)  # one snapshot: no trial counted twice
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if counted(trials) + running >= session.space.search.trials:
                return None
            if not _baseline_elsewhere(trials):
                ensure_baseline(study)  # queued again if its worker died for good
                return claim(session.storage, study)
        time.sleep(CLAIM_POLL_S)


def _baseline_elsewhere(trials: list[optuna.trial.FrozenTrial]) -> bool:
    """The baseline is not done yet and another process is running it."""
    states = {t.state for t in trials if t.user_attrs.get(BASELINE_ATTR)}
    return TrialState.RUNNING in states and TrialState.COMPLETE not in states


def _drain(
    session: Session, ctx: StudyContext, reporter: Reporter, max_failures: int | None
) -> None:
    """Wait for the trials other workers still run, and run the retry of any whose worker
    died, so that the front is assembled from the whole study. The end is decided under
    the claim lock: no worker is then between failing a dead trial and starting its retry."""
    study, told = session.study, -1
    while True:
        run_trials(session, ctx, reporter, max_failures)
        with claim_lock(session.storage, session.directory, session.space.study):
            fail_stale(study)
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
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Run one trial; return its record, the baseline's, and whether it is feasible."""
    from .pipeline import run_trial

    is_baseline = bool(trial.user_attrs.get(BASELINE_ATTR))
    plan = (
        CompressionPlan()
        if is_baseline
        else sample_plan(trial, session.space, ctx.layer_names, ctx.quant_layers)
    )
    trial.set_user_attr("plan_summary", plan.summary())
    out_dir = session.directory / TRIALS_DIR / str(trial.number)
    record = run_trial(ctx, plan, out_dir, session.space.search.seed + trial.number)
    bad = [m for m in session.space.metrics if not math.isfinite(record[METRIC_COLUMNS[m]])]
    if bad:  # Optuna would fail the trial silently, with no reason
        raise ValueError(f"objective(s) {', '.join(bad)} not finite")
    record["artifact"] = str(out_dir.relative_to(session.directory))
    record["plan_summary"] = plan.summary()
    if is_baseline:
        store_baseline(session, record)
    base = baseline(session)  # read once: the constraints and the report both need it
    for key, value in record.items():
        trial.set_user_attr(key, value)
    violations = _set_constraints(trial, session.space, record, base)
    return record, base, all(v <= 0 for v in violations.values())


def _set_constraints(
    trial: optuna.Trial,
    space: Space,
    record: dict[str, Any],
    base: dict[str, Any],
) -> dict[str, float]:
    """Optuna 5 constraints: a value <= 0 is feasible."""
    c = space.constraints
    out = {}
    if c.max_accuracy_drop is not None:
        drop = base["accuracy"] - record["accuracy"]
        out["accuracy_drop"] = drop - c.max_accuracy_drop
    if c.max_size_bytes is not None:
        out["size"] = record["size_bytes"] - c.max_size_bytes
    if c.max_latency_ms is not None:
        out["latency"] = record["latency_ms"] - c.max_latency_ms
    for key, value in out.items():
        trial.set_constraint(key, float(value))
    return out


def finish(session: Session, reporter: Reporter, ctx: StudyContext | None = None) -> StudyResults:
    """Keep only the front's (and the baseline's) artifacts, re-measure the front's
    latency against the baseline (given the study context), then write the tables."""
    results = load_results(session.directory, session.space.search.storage)
    frame = results.trials
    baseline_ids = set(frame.loc[frame["baseline"], "number"] if len(frame) else [])
    states = frame["state"] if len(frame) else pd.Series(dtype=str)
    live = set(frame.loc[states.isin(["RUNNING", "WAITING"]), "number"] if len(frame) else [])
    keep = set(results.pareto.get("number", [])) | baseline_ids
    trials_dir = session.directory / TRIALS_DIR
    if trials_dir.is_dir():
        for child in trials_dir.iterdir():
            stem = child.name.removesuffix(".partial")
            number = int(stem) if stem.isdigit() else None
            if number in live:  # another worker is still writing it
                continue
            if number not in keep or child.name != stem:
                shutil.rmtree(child, ignore_errors=True)
    if ctx is not None:
        front = [int(n) for n in results.pareto.get("number", []) if int(n) not in baseline_ids]
        _confirm(session, ctx, front, reporter)
    results = load_results(session.directory, session.space.search.storage)
    write_tables(results)
    reporter.finish(results)
    return results


def _confirm(session: Session, ctx: StudyContext, numbers: list[int], reporter: Reporter) -> None:
    """Time each front trial's deployed files again, against the baseline, once the search
    is over: a point that owes its place to one lucky measurement shows here."""
    from .pipeline import confirm

    out = {}
    for n in numbers:
        try:
            out[n] = confirm(ctx, session.directory / TRIALS_DIR / str(n))
        except Exception as exc:  # a confirmation that fails leaves the search's figures
            reporter.log(f"confirmation of trial {n} failed: {type(exc).__name__}: {exc}")
    if out:
        store_confirmations(session, out)
        reporter.log(f"confirmation: re-measured the latency of {len(out)} front trial(s)")


# --------------------------------------------------------------------------- workers


def _baseline_pending(session: Session) -> int:
    """1 while the study's baseline has not completed (it is then the next trial)."""
    done = session.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return 0 if any(t.user_attrs.get(BASELINE_ATTR) for t in done) else 1
