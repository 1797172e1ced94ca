"""How several processes share one study: who starts the next trial, and how a trial
whose process died is noticed and retried. No torch here.

- The study's storage is a journal file in its folder (one machine) or an Optuna RDB
  URL. With a URL every running trial sends heartbeats; one silent for ``GRACE_BEATS``
  heartbeats belongs to a dead worker: Optuna fails it (without a reason, which is how
  ``results.is_interrupted`` tells it apart, so it does not count towards the total)
  and queues its plan again.
- Starting a trial is serialised, so that workers never run one trial too many: a
  PostgreSQL advisory lock across machines, a file lock on one machine otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from paretoopt.results.frames import INTERRUPTED, journal_storage

GRACE_BEATS = 4  # heartbeats a running trial may miss before it counts as dead
RETRIES = 2  # a plan whose worker died this often is dropped (it may be what kills them)
CLAIM_FILE = ".claim.lock"
CLAIMANT = ("worker", "host")  # recorded by the claim, under the claim lock


def writer_storage(url: str | None, directory: Path, heartbeat_s: int) -> BaseStorage:
    """The storage a search or worker writes to: heartbeats and retries on a database."""
    if url is None:
        return journal_storage(directory)
    engine: dict[str, Any] = {"pool_pre_ping": True}  # a connection dropped while training
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=heartbeat_s,
            grace_period=GRACE_BEATS * heartbeat_s,
            heartbeat_stale_trial_callback=_Retry(max_retry=RETRIES),
        )


def is_postgres(storage: BaseStorage) -> bool:
    return isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql"


def fail_stale(study: optuna.Study, storage: BaseStorage) -> None:
    """Fail the running trials whose worker died: those whose heartbeats stopped (queued
    again), and those whose claim never finished. Called under the claim lock, and a
    claim finishes (``worker`` recorded) before its lock is released, so a running trial
    without a worker seen here lost its process inside ``study.ask``, before its first
    heartbeat: a trial Optuna would never fail."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    fail_interrupted(
        storage, study.study_name, [t for t in running if "worker" not in t.user_attrs]
    )


def fail_interrupted(storage: BaseStorage, study_name: str, trials: list[FrozenTrial]) -> int:
    """Fail running trials whose process died, as interrupted: replaced, not counted.
    A trial another process failed meanwhile is left as it is."""
    if not trials:
        return 0
    study_id = storage.get_study_id_from_name(study_name)
    for t in trials:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(trial_id, "fail_reason", INTERRUPTED)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    return len(trials)


class _Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry, minus the dead trial's ``worker`` and ``host``: the retry has not
    been claimed by anyone yet (``fail_stale`` relies on it)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in CLAIMANT}
        super().__call__(study, trial)


@contextmanager
def claim_lock(storage: BaseStorage, directory: Path, study_name: str) -> Iterator[None]:
    """Held while a process decides whether the study needs another trial and starts it."""
    if is_postgres(storage):
        assert isinstance(storage, RDBStorage)
        from sqlalchemy import text

        # a transaction-level lock: released at commit, or when a killed worker's
        # connection drops, so it can never be left held
        key = int.from_bytes(hashlib.sha256(f"paretoopt:{study_name}".encode()).digest()[:8], "big")
        with storage.engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key - 2**63})
            yield
        return
    import fcntl

    with open(directory / CLAIM_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def claim(storage: BaseStorage, study: optuna.Study) -> optuna.Trial:
    """Start a trial and record its first heartbeat before anything else, so a worker that
    dies from here on leaves a trial the others find stale (Optuna never fails a running
    trial that has no heartbeat at all). If the claim itself fails, the trial is failed as
    interrupted and replaced. Optuna warns that heartbeats are meant for ``optimize``;
    this module sends them itself (see ``heartbeat``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        trial = study.ask()
    try:
        if _interval(storage):
            assert isinstance(storage, RDBStorage)
            storage.record_heartbeat(trial._trial_id)  # the id: no lookup before the beat
        trial.set_user_attr("worker", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
    except BaseException:
        with contextlib.suppress(Exception):
            trial.set_user_attr("fail_reason", INTERRUPTED)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    return trial


@contextmanager
def heartbeat(storage: BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Heartbeats from a thread while the trial runs (a no-op on the journal file)."""
    interval = _interval(storage)
    if not interval:
        yield
        return
    assert isinstance(storage, RDBStorage)
    trial_id = trial._trial_id  # as in claim: Optuna keeps no public handle on it
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a database hiccup: the next beat retries
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="paretoopt-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _interval(storage: BaseStorage) -> int | None:
    return storage.get_heartbeat_interval() if isinstance(storage, RDBStorage) else None
