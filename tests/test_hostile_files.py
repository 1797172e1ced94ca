"""Files a user may be handed are data: opening a results folder, a card or a model file
imports nothing they name and unpickles nothing they hold, and creates nothing."""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from pathlib import Path

import optuna
import pytest
import torch

from paretoopt.cli import main
from paretoopt.config.space import dump_space, parse_space
from paretoopt.errors import StudyError
from paretoopt.export import export_trial, load
from paretoopt.results.frames import journal_storage

from .conftest import TINY

HELPER = """
from pathlib import Path
Path(__file__).with_name("imported").write_text("helper.py ran")
def build():
    raise SystemExit("never")
"""


def _folder(tmp_path: Path, **search: object) -> Path:
    """A study folder handed over by someone else, its space naming `helper.py:build`."""
    folder = tmp_path / "results" / "handed"
    folder.mkdir(parents=True)
    (folder / "helper.py").write_text(HELPER)
    doc = copy.deepcopy(TINY) | {"study": "handed"}
    doc["model"] = {"factory": str(folder / "helper.py") + ":build"}
    doc["search"] = {**doc["search"], **search}
    (folder / "space.yaml").write_text(dump_space(parse_space(doc, source=folder / "x.yaml")))
    if not search:
        optuna.create_study(study_name="handed", storage=journal_storage(folder))
    return folder


def test_export_does_not_import_the_factory_a_results_folder_names(tmp_path, capsys):
    folder = _folder(tmp_path)
    with pytest.raises(StudyError, match=r"names model\.factory .*helper\.py:build.*--space"):
        export_trial(folder, tmp_path / "out", trial=1)
    code = main(["export", "--study", "handed", "--results", str(folder.parent), "--trial",
                 "1", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and "pass --space" in capsys.readouterr().err
    assert not (folder / "imported").exists() and not (tmp_path / "out").exists()


def test_show_opens_no_storage_a_results_folder_names(tmp_path, capsys):
    db = tmp_path / "elsewhere" / "made.db"
    db.parent.mkdir()
    folder = _folder(tmp_path, storage=f"sqlite:///{db}")
    code = main(["show", "--study", "handed", "--results", str(folder.parent)])
    err = capsys.readouterr().err
    assert code == 2 and "keeps its trials in a database" in err and "--storage" in err, err
    assert not db.exists()


def test_a_card_naming_a_factory_is_not_imported(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not read")
    marker = tmp_path / "ran"
    card = {"model": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}}
    (tmp_path / "m.card.json").write_text(__import__("json").dumps(card))
    with pytest.raises(StudyError, match="card names model.factory 'os:system'.*build="):
        load(model)
    assert not marker.exists()


class _Payload:
    """Unpickling it writes a file: a stand-in for any code a crafted pickle runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def _crafted_pt2(tmp_path: Path, marker: Path) -> Path:
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(2, 4),))
    good, bad = tmp_path / "good.pt2", tmp_path / "bad.pt2"
    torch.export.save(program, str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(_Payload(marker))
            dst.writestr(item, data)
    return bad


def test_a_pt2_with_a_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    bad = _crafted_pt2(tmp_path, marker)
    assert load(tmp_path / "good.pt2").format == "pt2"  # a plain archive loads
    with pytest.raises(StudyError, match="holds pickled objects that are not plain tensors"):
        load(bad)
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_pt2_with_an_opaque_pickled_constant_is_refused_before_torch_reads_it(tmp_path):
    import json

    marker = tmp_path / "ran"
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(2, 4),))
    good, bad = tmp_path / "good.pt2", tmp_path / "opaque.pt2"
    torch.export.save(program, str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_constants_config.json"):
                entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}
                data = json.dumps({"config": {"x": entry}}).encode()
                folder = item.filename.rsplit("/", 1)[0]
                dst.writestr(f"{folder}/opaque_obj_0", pickle.dumps(_Payload(marker)))
            dst.writestr(item, data)
    with pytest.raises(StudyError, match="opaque_obj_0"):
        load(bad)
    assert not marker.exists()
