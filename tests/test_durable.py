"""Torn storage: a journal cut mid-record or carrying garbage is cut back to its last
whole record when a search opens it, and a full disk stops the search without counting
the trial it hit as a failed plan."""

from __future__ import annotations

import errno
from pathlib import Path

import optuna
import pytest

from paretoopt.cli import main
from paretoopt.config.space import dump_space, parse_space
from paretoopt.errors import StudyError
from paretoopt.results.frames import JOURNAL_FILE, journal_storage, torn_tail
from paretoopt.study.search import search
from paretoopt.study.session import open_session

from .conftest import TINY

COMPLETE = optuna.trial.TrialState.COMPLETE


def _journal(folder: Path, trials: int) -> Path:
    """A study folder whose journal holds `trials` finished trials."""
    folder.mkdir(parents=True)
    space = parse_space(TINY)
    (folder / "space.yaml").write_text(dump_space(space))
    study = optuna.create_study(
        study_name=space.study, storage=journal_storage(folder), directions=space.directions
    )
    for i in range(trials):
        study.add_trial(
            optuna.trial.create_trial(
                values=[90.0 + i, 1000.0, 0.1], state=optuna.trial.TrialState.COMPLETE
            )
        )
    return folder / JOURNAL_FILE


def _states(folder: Path) -> list[str]:
    study = optuna.load_study(study_name=TINY["study"], storage=journal_storage(folder))
    return [t.state.name for t in study.trials]


def test_a_torn_last_record_is_cut_back_when_a_search_opens_the_study(tmp_path):
    path = _journal(tmp_path / "tiny", 2)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # the last record cut short, as by a crash mid-write
    assert torn_tail(path) > 0
    session = open_session(parse_space(TINY), tmp_path, optuna.samplers.RandomSampler(0))
    try:
        assert session.repaired and "not a whole record" in session.repaired
        backups = list(tmp_path.joinpath("tiny").glob(f"{JOURNAL_FILE}.torn-*"))
        assert len(backups) == 1 and backups[0].read_bytes() == whole[:-7]
        assert torn_tail(path) == 0 and path.read_bytes().endswith(b"\n")
        session.study.add_trial(  # the next record lands on a line of its own
            optuna.trial.create_trial(
                values=[1.0, 2.0, 3.0], state=optuna.trial.TrialState.COMPLETE
            )
        )
    finally:
        session.close()
    assert _states(tmp_path / "tiny").count("COMPLETE") == 2  # the torn trial's end was lost


def test_garbage_after_the_last_record_is_cut_and_nothing_else(tmp_path):
    path = _journal(tmp_path / "tiny", 2)
    whole = path.read_bytes()
    path.write_bytes(whole + b"\x00\x00garbage\nmore}\n")
    assert torn_tail(path) == len(b"\x00\x00garbage\nmore}\n")
    session = open_session(parse_space(TINY), tmp_path, optuna.samplers.RandomSampler(0))
    session.close()
    after = path.read_bytes()  # opening the study appends its own records after the cut
    assert after.startswith(whole) and after[len(whole) : len(whole) + 1] == b"{"
    assert torn_tail(path) == 0 and _states(tmp_path / "tiny") == ["COMPLETE"] * 2
    assert torn_tail(tmp_path / "absent.journal") == 0


def test_a_full_disk_stops_the_search_and_the_trial_runs_again(tmp_path, monkeypatch):
    import paretoopt.study.trial as trial_module

    real = trial_module.run_trial
    calls = []

    def full_once(ctx, plan, out_dir, seed, gauge=None):
        calls.append(out_dir.name)
        if out_dir.name == "1" and calls.count("1") == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))
        return real(ctx, plan, out_dir, seed, gauge)

    monkeypatch.setattr(trial_module, "run_trial", full_once)
    doc = parse_space(TINY)
    with pytest.raises(StudyError, match="no space left on device while trial 1 ran"):
        search(doc, results_root=tmp_path)
    study = optuna.load_study(study_name="tiny", storage=journal_storage(tmp_path / "tiny"))
    lost = [t for t in study.trials if t.number == 1][0]
    assert lost.state.name == "FAIL"
    assert lost.user_attrs["fail_reason"] == "interrupted: no space left on device"
    results = search(doc, results_root=tmp_path)  # space freed: the same command again
    done = results.trials[results.trials["state"] == "COMPLETE"]
    assert len(done) == TINY["search"]["trials"]  # the interrupted one did not count


def test_show_warns_of_a_torn_journal_and_changes_nothing(tmp_path, capsys):
    search(parse_space(TINY), results_root=tmp_path)
    journal = tmp_path / "tiny" / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-5])  # the last record, the end of a trial
    torn = journal.read_bytes()
    assert main(["show", "--study", "tiny", "--results", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "ends in" in err and "not a whole record" in err and "next `paretoopt search`" in err
    assert journal.read_bytes() == torn and not list(journal.parent.glob("*.torn-*"))


def test_a_journal_lock_left_by_a_killed_process_does_not_stall_the_next_start(tmp_path):
    import time

    _journal(tmp_path / "tiny", 1)
    (tmp_path / "tiny" / f"{JOURNAL_FILE}.lock").write_text("")  # its writer was killed
    start = time.perf_counter()
    session = open_session(parse_space(TINY), tmp_path, optuna.samplers.RandomSampler(0))
    session.close()
    assert time.perf_counter() - start < 10.0  # Optuna waited out a 30 s grace period
