"""Studies shared by several workers: heartbeats, retries of a dead worker's trial, the
claim lock and ``paretoopt worker``.

The heartbeat tests run on SQLite (no server needed). The multi-worker tests need a
real PostgreSQL server: ``.ci/run`` starts one and names it in PARETOOPT_TEST_POSTGRES
(``.ci/postgres`` prints the URL on a Debian machine); without it they are skipped.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from paretoopt.cli import main
from paretoopt.results.frames import BASELINE_ATTR, STALE, fail_reason, reading_study, redact
from paretoopt.study import sharing
from paretoopt.study.session import finished

from .conftest import write_space

POSTGRES_ENV = "PARETOOPT_TEST_POSTGRES"


def _sqlite_study(tmp_path: Path, heartbeat_s: int = 1) -> tuple[optuna.Study, Any]:
    storage = sharing.writer_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path, heartbeat_s)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    return study, storage


def _claim(study: optuna.Study, storage: Any) -> optuna.Trial:
    trial = sharing.claim(storage, study)
    trial.suggest_float("sparsity", 0.0, 0.9)
    trial.suggest_categorical("bits", [4, 8])
    return trial


def test_a_silent_trial_is_failed_as_interrupted_and_queued_again(tmp_path, monkeypatch):
    monkeypatch.setattr(sharing, "GRACE_BEATS", 1)
    study, storage = _sqlite_study(tmp_path)
    dead = _claim(study, storage)  # claimed, one heartbeat, then its worker "dies"
    time.sleep(2.2)
    sharing.fail_stale(study, storage)
    lost = study.get_trials(deepcopy=False)[dead.number]
    assert lost.state == TrialState.FAIL
    assert fail_reason(lost) == STALE and "fail_reason" not in lost.user_attrs
    assert finished(study) == 0  # replaced, so it does not count towards the total
    (waiting,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert waiting.params == dead.params
    assert waiting.system_attrs["failed_trial"] == dead.number
    assert "fail_reason" not in waiting.user_attrs
    assert "worker" not in waiting.user_attrs  # nobody has claimed the retry yet
    retry = sharing.claim(storage, study)  # the next claim takes the same plan
    assert retry.number == waiting.number
    assert retry.suggest_float("sparsity", 0.0, 0.9) == dead.params["sparsity"]


def test_a_plan_whose_worker_keeps_dying_is_dropped_after_the_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(sharing, "GRACE_BEATS", 1)
    study, storage = _sqlite_study(tmp_path)
    first = _claim(study, storage)
    for _ in range(sharing.RETRIES + 1):
        time.sleep(2.2)
        sharing.fail_stale(study, storage)
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break
        sharing.claim(storage, study)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] * (sharing.RETRIES + 1)
    assert all(t.params == first.params for t in trials)
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_claim_that_died_inside_ask_is_failed_at_the_next_claim(tmp_path):
    """A worker killed inside study.ask leaves a running trial with no heartbeat, which
    Optuna never fails; claims finish under the lock, so one without a worker is dead."""
    study, storage = _sqlite_study(tmp_path, heartbeat_s=60)
    study.ask()  # the claim's process dies here, before its first heartbeat
    alive = _claim(study, storage)
    sharing.fail_stale(study, storage)
    lost, running = study.get_trials(deepcopy=False)
    assert lost.state == TrialState.FAIL and fail_reason(lost).startswith("interrupted:")
    assert running.number == alive.number and running.state == TrialState.RUNNING


def test_heartbeats_keep_a_long_trial_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(sharing, "GRACE_BEATS", 2)
    study, storage = _sqlite_study(tmp_path)
    trial = _claim(study, storage)
    with sharing.heartbeat(storage, trial):
        time.sleep(4.5)  # more than twice the grace period
        sharing.fail_stale(study, storage)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING
    study.tell(trial, 1.0)


def test_the_journal_file_has_no_heartbeats(tmp_path):
    storage = sharing.writer_storage(None, tmp_path, 1)
    study = optuna.create_study(study_name="j", storage=storage)
    trial = sharing.claim(storage, study)
    with sharing.heartbeat(storage, trial):
        pass
    assert trial.user_attrs["worker"] == os.getpid() and trial.user_attrs["host"]


def test_storage_urls_in_messages_hide_the_password():
    assert redact("postgresql://me:s3cr@t@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert redact("postgresql://me@db/x") == "postgresql://me@db/x"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"
    assert redact("postgresql://db/x?user=me&password=pw") == (
        "postgresql://db/x?user=me&password=***"
    )


def test_a_worker_refuses_a_storage_other_than_postgresql(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["worker", "--storage", url, "--study", "s", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "share a PostgreSQL database" in err and "'sqlite'" in err
    assert "--workers N" in err
    assert not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/postgres starts a server)")
    return url


@pytest.fixture
def shared_doc(postgres: str, tiny_doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The tiny study on the PostgreSQL server, under a name of its own (deleted after)."""
    name = f"shared-{uuid.uuid4().hex[:10]}"
    tiny_doc["study"] = name
    tiny_doc["search"].update(storage=postgres, heartbeat_s=1)
    yield tiny_doc
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=postgres)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "paretoopt.cli", *args]


def _running_trial_of(
    storage: optuna.storages.BaseStorage, name: str, pid: int
) -> optuna.trial.FrozenTrial | None:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == pid and "plan_summary" in t.user_attrs:
            return t
    return None


def test_four_workers_share_a_study_and_a_killed_workers_trial_is_retried(
    tmp_path, postgres, shared_doc
):
    """A search and four `paretoopt worker`s on one PostgreSQL study. One worker is
    SIGKILLed in the middle of a trial: that trial is failed as interrupted and run
    again, with the same plan, by another worker; the study holds exactly the requested
    number of trials, and its front is assembled in the shared results folder."""
    name, total = shared_doc["study"], 12
    shared_doc["search"]["trials"] = total
    space = write_space(tmp_path / "shared.yaml", shared_doc)
    results = tmp_path / "shared-results"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    search = subprocess.Popen(_cli("search", "--space", str(space), "--results", str(results)))
    worker = _cli("worker", "--storage", postgres, "--study", name, "--results", str(results))
    while not (results / name / "space.yaml").is_file():  # the study exists: workers may join
        assert search.poll() is None, "the search stopped before it started the study"
        time.sleep(0.2)
    workers = [subprocess.Popen(worker, **quiet) for _ in range(4)]
    victim, killed = workers[0], None
    deadline = time.monotonic() + 240
    polled = optuna.storages.RDBStorage(postgres)  # one engine: a URL per poll is one each
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        killed = _running_trial_of(polled, name, victim.pid)
        time.sleep(0.05)
    assert killed is not None, "the victim never ran a trial"
    polled.engine.dispose()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for process in [search, *workers[1:]]:
        assert process.wait(timeout=300) == 0, process.args

    study = optuna.load_study(study_name=name, storage=postgres)
    trials = study.get_trials(deepcopy=False)
    assert finished(study) == total
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == total
    (lost,) = [t for t in trials if t.state != TrialState.COMPLETE]
    assert lost.number == killed.number and lost.state == TrialState.FAIL
    assert fail_reason(lost) == STALE
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params
    assert retry.user_attrs["plan_summary"] == killed.user_attrs["plan_summary"]
    assert retry.user_attrs["worker"] != victim.pid
    ran_by = {t.user_attrs["worker"] for t in complete}
    assert len(ran_by) >= 3, f"the trials were not shared: {ran_by}"
    assert sum(t.user_attrs.get(BASELINE_ATTR, False) for t in complete) == 1

    table = pd.read_csv(results / name / "trials.csv")
    assert (table["state"] == "COMPLETE").sum() == total
    kept = {p.name for p in (results / name / "trials").iterdir()}
    front = set(pd.read_csv(results / name / "pareto.csv")["number"].astype(str))
    assert kept == front | {"0"}  # no partial folder of the killed trial is left
    for number in kept:
        assert (results / name / "trials" / number / "model.safetensors").is_file()


def test_a_worker_names_what_is_missing(tmp_path, postgres, shared_doc, capsys):
    name = shared_doc["study"]
    args = ["worker", "--storage", postgres, "--study", name, "--results", str(tmp_path / "r")]
    assert main(args) == 2
    assert f"no study {name!r} in the database" in capsys.readouterr().err

    space = write_space(tmp_path / "shared.yaml", shared_doc)
    storage = sharing.writer_storage(postgres, tmp_path, 1)
    study = optuna.create_study(study_name=name, storage=storage)
    assert main(args) == 2  # a study of that name, but not one paretoopt started
    assert "holds no space" in capsys.readouterr().err

    from paretoopt.config.space import dump_space, load_space
    from paretoopt.study.session import SPACE_ATTR

    study.set_user_attr(SPACE_ATTR, dump_space(load_space(space)))
    assert main(args) == 2  # this machine does not see the study's results folder
    err = capsys.readouterr().err
    assert "shared folder on every machine" in err and err.count("\n") == 1


def test_a_second_folder_cannot_reuse_a_study_name_with_another_space(
    tmp_path, postgres, shared_doc, capsys
):
    name = shared_doc["study"]
    space = write_space(tmp_path / "a.yaml", shared_doc)
    storage = sharing.writer_storage(postgres, tmp_path, 1)
    study = optuna.create_study(study_name=name, storage=storage)
    from paretoopt.config.space import dump_space, load_space
    from paretoopt.study.session import SPACE_ATTR

    study.set_user_attr(SPACE_ATTR, dump_space(load_space(space)))
    shared_doc["space"]["quantization"]["bits"] = [2, 4]
    other = write_space(tmp_path / "b.yaml", shared_doc)
    assert main(["search", "--space", str(other), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "space.quantization.bits: [4, 8, 32] then, [2, 4] now" in err
    assert not (tmp_path / "r" / name / "trials").exists()


def _connections(url: str) -> int:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:  # itself one of them; the same in every count
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        return int(connection.execute(text(query)).scalar_one())


def test_reading_a_shared_study_leaves_no_connection_open(tmp_path, postgres, shared_doc):
    """A process that reads a database study again and again (a search's tables after
    each trial, the explorer) holds no connection after each read: engines left to the
    garbage collector kept theirs and ran the server out of slots."""
    name = shared_doc["study"]
    optuna.create_study(study_name=name, storage=postgres).optimize(lambda t: 1.0, n_trials=1)
    before = _connections(postgres)
    gc.disable()  # a leak must not be hidden by a collection that happens to run
    try:
        for _ in range(5):
            with reading_study(name, postgres, tmp_path) as study:
                assert len(study.get_trials(deepcopy=False)) == 1
        assert _connections(postgres) == before
    finally:
        gc.enable()
