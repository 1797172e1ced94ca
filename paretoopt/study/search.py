"""The search: thin glue between the space file, Optuna and the trial pipeline.

``search`` validates the space, prepares the baseline, calibrates, opens (or resumes)
the study in ``results/<study>/``, runs the trial loop (``trials``) with any workers until
the study holds the requested number, then keeps and re-measures the front (``finish``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paretoopt.config.space import Space, load_space
from paretoopt.errors import StudyError
from paretoopt.results.frames import (
    TRIALS_DIR,
    StudyResults,
    for_target,
    load_results,
    write_tables,
)
from paretoopt.results.report import Reporter, SilentReporter
from paretoopt.study.fidelity import fidelity_of
from paretoopt.study.loop import drain, run_trials
from paretoopt.study.session import (
    Session,
    check_folder,
    check_resumable,
    check_storage,
    ensure_baseline,
    existing_trials,
    fail_interrupted,
    open_session,
    store_confirmations,
    write_metadata,
)
from paretoopt.study.sharing import claim_lock
from paretoopt.study.startup import start
from paretoopt.study.workers import join_workers, share_cores, start_workers

if TYPE_CHECKING:
    from paretoopt.study.trial import StudyContext


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
    # a resumed study's sampler is seeded past its trials, so it draws new points
    started = start(space, results_root, existing_trials(space, results_root), reporter)
    ctx = started.ctx
    session = open_session(space, results_root, started.sampler)
    try:
        if session.repaired:
            reporter.log(f"[yellow]warning[/]: {session.repaired}")
        lost = fail_interrupted(session)
        if lost:
            reporter.log(
                f"resume: {lost} trial(s) interrupted earlier are marked failed and "
                "will be replaced"
            )
        with claim_lock(session.storage, session.directory, space.study):
            ensure_baseline(session.study)  # a worker may be queueing it too
        write_metadata(session, ctx)
        fidelity = fidelity_of(space)
        if not fidelity.full:
            reporter.log(f"fidelity ({space.search.fidelity}): {fidelity.describe()}")
        helpers: list[Any] = []
        try:
            if workers > 1:  # helpers wait for the baseline in their claims (see trials)
                helpers = start_workers(space, results_root, workers - 1, max_failures)
                share_cores(workers)
            run_trials(session, ctx, reporter, max_failures)
            join_workers(helpers, reporter)
            dead = {h.pid for h in helpers if h.exitcode}
            if dead and fail_interrupted(session, dead):  # replace what they left running
                run_trials(session, ctx, reporter, max_failures)
            if not session.embedded:
                drain(session, ctx, reporter, max_failures)
        finally:  # an interrupt must not leave a live progress display or helpers behind
            reporter.stop()
            for helper in helpers:
                if helper.is_alive():
                    helper.terminate()
                    helper.join()
        return finish(session, reporter, ctx)
    finally:
        session.close()


def finish(session: Session, reporter: Reporter, ctx: StudyContext | None = None) -> StudyResults:
    """Keep only the front's (and the baseline's) artifacts, re-measure the front's
    latency against the baseline (given the study context), then write the tables."""
    results = load_results(session.directory, session.space.search.storage)
    frame = results.trials
    baseline_ids, live = set(), set()
    if len(frame):
        baseline_ids = set(frame.loc[frame["baseline"], "number"])
        live = set(frame.loc[frame["state"].isin(["RUNNING", "WAITING"]), "number"])
    keep = set(results.pareto.get("number", [])) | baseline_ids
    for runtime in results.compared:  # each compared runtime's front stays exportable
        with contextlib.suppress(StudyError):  # one whose baseline failed there has none
            keep |= set(for_target(results, runtime).pareto.get("number", []))
    trials_dir = session.directory / TRIALS_DIR
    check_folder(session.directory)  # never delete through a link
    if trials_dir.is_dir():
        for child in trials_dir.iterdir():
            stem = child.name.removesuffix(".partial")
            if not re.fullmatch(r"[0-9]+", stem) or child.is_symlink() or not child.is_dir():
                continue  # not a trial folder paretoopt wrote: not ours to delete
            number = int(stem)
            if number in live:  # another worker is still writing it
                continue
            if number not in keep or child.name != stem:
                shutil.rmtree(child, ignore_errors=True)
    if ctx is not None:
        pareto = results.pareto
        structures = dict(
            zip(pareto.get("number", []), pareto.get("latency_structure", []), strict=False)
        )
        front = [int(n) for n in pareto.get("number", []) if int(n) not in baseline_ids]
        _confirm(session, ctx, front, structures, reporter)
    results = load_results(session.directory, session.space.search.storage)
    write_tables(results)
    reporter.finish(results)
    return results


def _confirm(
    session: Session,
    ctx: StudyContext,
    numbers: list[int],
    structures: dict[int, Any],
    reporter: Reporter,
) -> None:
    """Time each front trial's deployed files again, against the baseline, once the search
    is over: a point that owes its place to one lucky measurement shows here."""
    from paretoopt.study.trial import confirm

    out = {}
    for n in numbers:
        try:
            structure = structures.get(n)  # the trial's own, so it reads at its quiet level
            structure = structure if isinstance(structure, str) and structure else None
            out[n] = confirm(ctx, session.directory / TRIALS_DIR / str(n), structure)
        except Exception as exc:  # a confirmation that fails leaves the search's figures
            reporter.log(f"confirmation of trial {n} failed: {type(exc).__name__}: {exc}")
    if out:
        store_confirmations(session, out)
        reporter.log(f"confirmation: re-measured the latency of {len(out)} front trial(s)")
