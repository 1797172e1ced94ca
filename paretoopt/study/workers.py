"""Worker processes: several trial processes sharing one study, on one machine
(``search --workers N``) or on many (``paretoopt worker``).

The parent holds the study's lock; each helper loads the baseline from the cache,
calibrates on the study's latency scale, seeds its own sampler and claims trials until
the study is full, waiting while the baseline trial runs (see ``trials.run_trials``). Helpers are
spawned, not forked (torch does not fork safely), and train with their share of the
cores, or on a GPU of their own where the machine has several. The measurement gate keeps
their timing apart from each other's training.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from paretoopt.config.space import Space
from paretoopt.config.yamlfile import load_yaml
from paretoopt.errors import StudyError, one_line
from paretoopt.results.frames import SPACE_FILE
from paretoopt.results.report import Reporter, SilentReporter
from paretoopt.study.loop import run_trials
from paretoopt.study.session import (
    Session,
    existing_trials,
    space_difference,
    stored_space,
    study_reference,
)
from paretoopt.study.sharing import writer_storage
from paretoopt.study.startup import start

JOIN_POLL_S = 2.0  # how often a joining worker looks for the study's calibration


def start_workers(
    space: Space, results_root: Path, count: int, max_failures: int | None
) -> list[Any]:
    """Helper processes that run trials of the same study (spawned: torch does not fork)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    helpers = [
        context.Process(
            target=_worker,
            args=(space, str(results_root), index, count + 1, max_failures),
            name=f"paretoopt-worker-{index}",
            daemon=True,
        )
        for index in range(1, count + 1)
    ]
    for helper in helpers:
        helper.start()
    return helpers


def share_cores(workers: int) -> None:
    """Each worker trains with its share of the cores: N processes with all cores each
    would oversubscribe them (measured here: 2 workers on 2 cores ran 25 trials in 129 s,
    against 84 s for one)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _worker(
    space: Space, results_root: str, index: int, workers: int, max_failures: int | None
) -> None:
    """One helper on this machine: trials until the study is full."""
    from paretoopt.compress.recipe import pin_worker_gpu

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    share_cores(workers)
    pin_worker_gpu(index)  # several GPUs: one worker each ("auto" and "cuda" train there)
    root = Path(results_root)
    seed = existing_trials(space, root) + 10_007 * index
    run_as_worker(space, root, seed, SilentReporter(), max_failures)


def run_as_worker(
    space: Space, root: Path, seed: int, reporter: Reporter, max_failures: int | None
) -> None:
    """The study's context from the baseline cache, a calibration on the study's latency
    scale, a sampler of its own; then trials until the study is full. The process that
    started the study holds its folder lock, so a worker takes none."""
    directory = root / space.study
    started = start(space, root, seed, reporter)
    storage = writer_storage(space.search.storage, directory, space.search.heartbeat_s)
    study = optuna.load_study(study_name=space.study, storage=storage, sampler=started.sampler)
    try:
        run_trials(Session(space, directory, study, storage), started.ctx, reporter, max_failures)
    finally:
        reporter.stop()


def join_study(
    url: str, name: str, results_root: Path, reporter: Reporter, max_failures: int | None
) -> None:
    """``paretoopt worker``: run trials of a study that ``paretoopt search`` started, from
    any machine that reaches its PostgreSQL server and shares its results folder."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = _joinable_space(url, name, results_root)
    directory = results_root / name
    waited = 0.0
    while study_reference(directory) is None:  # calibration comes before any trial
        if waited % 60 == 0:
            reporter.log(f"waiting for study {name!r} to calibrate its baseline ({waited:.0f} s)")
        time.sleep(JOIN_POLL_S)
        waited += JOIN_POLL_S
    seed = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())  # one per worker
    run_as_worker(space, results_root, seed, reporter, max_failures)


def _joinable_space(url: str, name: str, results_root: Path) -> Space:
    """The study's space from its database, checked against the shared results folder."""
    if not url.startswith(("postgresql://", "postgresql+")):
        raise StudyError(
            f"--storage: workers on several machines share a PostgreSQL database "
            f"(postgresql://user@host/db), got {url.split(':', 1)[0]!r}; on one machine "
            "use paretoopt search --workers N"
        )
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise StudyError(
            f"--study: no study {name!r} in the database; start it with paretoopt search "
            "--space FILE, whose search.storage names this database"
        ) from None
    except Exception as exc:
        raise StudyError(
            f"--storage: cannot open the database: {type(exc).__name__}: {one_line(str(exc))}"
        ) from None
    space = stored_space(study, url)
    space = replace(space, search=replace(space.search, storage=url))
    folder = results_root / name / SPACE_FILE
    if not folder.is_file():
        raise StudyError(
            f"--results: {folder} does not exist; every worker writes its trials to the "
            "study's results folder, which must be the same shared folder on every machine"
        )
    difference = space_difference(load_yaml(folder.read_text(), stored=True), space, where=False)
    if difference:
        raise StudyError(
            f"--results: {folder} belongs to another study of that name ({difference})"
        )
    return space


def join_workers(helpers: list[Any], reporter: Reporter) -> None:
    for helper in helpers:
        helper.join()
        if helper.exitcode:
            reporter.log(
                f"[yellow]warning[/]: {helper.name} stopped with exit code {helper.exitcode}; "
                "the study holds every trial it finished"
            )
