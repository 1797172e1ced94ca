"""paretoopt deletes trial folders at the end of a search: never through a link, and
never a name it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from paretoopt.cli import main
from paretoopt.config.space import dump_space, parse_space
from paretoopt.errors import StudyError
from paretoopt.study.session import check_folder

from .conftest import TINY, write_space


def _study_folder(results: Path) -> Path:
    """A started study's folder as a search leaves it (its space, no trials yet)."""
    folder = results / TINY["study"]
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(dump_space(parse_space(TINY)))
    return folder


def _elsewhere(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    (other / "5").mkdir(parents=True)
    (other / "notes").mkdir()
    (other / "5" / "keep.txt").write_text("not paretoopt's")
    return other


def test_a_linked_trials_folder_is_refused_and_left_alone(tmp_path, capsys):
    results, other = tmp_path / "results", _elsewhere(tmp_path)
    (_study_folder(results) / "trials").symlink_to(other, target_is_directory=True)
    space = write_space(tmp_path / "tiny.yaml", TINY)
    code = main(["search", "--space", str(space), "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2 and "trials is a symbolic link" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in other.iterdir()) == ["5", "notes"]
    assert (other / "5" / "keep.txt").read_text() == "not paretoopt's"


def test_a_study_folder_that_is_a_link_or_leads_outside_is_refused(tmp_path):
    results, other = tmp_path / "results", _elsewhere(tmp_path)
    results.mkdir()
    (results / "tiny").symlink_to(other, target_is_directory=True)
    with pytest.raises(StudyError, match="tiny is a symbolic link"):
        check_folder(results / "tiny")
    check_folder(results / "absent")  # a folder not made yet is fine
