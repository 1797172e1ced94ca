from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from paretoopt.cli import build_parser, main
from paretoopt.workload.models import tiny_conv

from .conftest import write_space


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("search", "validate", "show"):
        assert command in out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "paretoopt.cli", "search", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--trials" in out.stdout and "--space" in out.stdout


def bad_input(tmp_path, capsys, doc_or_text, *extra):
    space = tmp_path / "bad.yaml"
    if isinstance(doc_or_text, str):
        space.write_text(doc_or_text)
    else:
        write_space(space, doc_or_text)
    results = tmp_path / "results"
    code = main(["search", "--space", str(space), "--results", str(results), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert not results.exists(), "bad input must not write into results/"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def test_unknown_key(tmp_path, capsys, tiny_doc):
    tiny_doc["space"]["quantization"]["bit"] = 4
    assert bad_input(tmp_path, capsys, tiny_doc) == (
        "space.quantization.bit: unknown key (did you mean 'bits'?); allowed keys: bits, "
        "grid, granularity, scheme, half_type, activations, method, distribution, "
        "layer_groups, calibration_samples"
    )


def test_malformed_yaml(tmp_path, capsys):
    message = bad_input(tmp_path, capsys, "model: conv\n  data: : digits\n")
    assert message.startswith(f"{tmp_path / 'bad.yaml'}: not valid YAML at line 2")


def test_missing_space_file(tmp_path, capsys):
    code = main(["search", "--space", str(tmp_path / "none.yaml")])
    assert code == 2
    expected = f"error: --space: file '{tmp_path / 'none.yaml'}' does not exist\n"
    assert capsys.readouterr().err == expected


def test_factory_that_does_not_import(tmp_path, capsys, tiny_doc):
    tiny_doc["model"] = {"factory": "no_such_package.nets:build"}
    assert bad_input(tmp_path, capsys, tiny_doc) == (
        "model.factory: cannot import 'no_such_package.nets': ModuleNotFoundError: "
        "No module named 'no_such_package'"
    )


def test_factory_file_with_an_error(tmp_path, capsys, tiny_doc):
    (tmp_path / "net.py").write_text("import torch\nraise RuntimeError('broken on purpose')\n")
    tiny_doc["model"] = {"factory": "net.py:build"}
    assert bad_input(tmp_path, capsys, tiny_doc) == (
        f"model.factory: cannot import '{tmp_path / 'net.py'}': RuntimeError: broken on purpose"
    )


def test_factory_with_bad_kwargs(tmp_path, capsys, tiny_doc):
    tiny_doc["model"] = {"name": "tiny_conv", "kwargs": {"depth": 3}}
    message = bad_input(tmp_path, capsys, tiny_doc)
    assert message.startswith(
        "model.name: calling the factory with kwargs {'depth': 3} failed: TypeError:"
    )


def test_unknown_builtin(tmp_path, capsys, tiny_doc):
    tiny_doc["data"] = {"name": "cifar10"}
    assert bad_input(tmp_path, capsys, tiny_doc) == (
        "data.name: 'cifar10' is not a built-in dataset; choose from digits, mnist or give "
        "a 'factory'"
    )


def test_checkpoint_that_does_not_match(tmp_path, capsys, tiny_doc):
    torch.save(tiny_conv(image_size=16).state_dict(), tmp_path / "w.pt")
    tiny_doc["model"] = {"name": "tiny_conv", "checkpoint": "w.pt"}
    message = bad_input(tmp_path, capsys, tiny_doc)
    assert message == (
        f"model.checkpoint: '{tmp_path / 'w.pt'}' does not match the model: "
        "shape mismatch (checkpoint vs model) 6.weight (16, 128) vs (16, 32)"
    )


def test_checkpoint_that_is_a_pickle(tmp_path, capsys, tiny_doc):
    torch.save(tiny_conv(), tmp_path / "whole.pt")  # a whole module: refused, never unpickled
    tiny_doc["model"] = {"name": "tiny_conv", "checkpoint": "whole.pt"}
    message = bad_input(tmp_path, capsys, tiny_doc)
    assert message == (
        f"model.checkpoint: '{tmp_path / 'whole.pt'}' holds pickled Python "
        "objects (a whole module?), which are never loaded; save "
        "model.state_dict() instead"
    )


def test_model_that_does_not_fit_the_data(tmp_path, capsys, tiny_doc):
    tiny_doc["model"] = {"name": "mlp"}  # expects 256 inputs, the data has 64
    message = bad_input(tmp_path, capsys, tiny_doc)
    assert message.startswith(
        "model: a forward pass on the data's inputs of shape [1, 8, 8] failed: RuntimeError:"
    )


def test_debug_shows_the_traceback(tmp_path, tiny_doc):
    tiny_doc["search"]["sampler"] = "bayes"
    space = write_space(tmp_path / "s.yaml", tiny_doc)
    for args in (
        ["--debug", "search", "--space", str(space)],
        ["search", "--space", str(space), "--debug"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "paretoopt.cli", *args], capture_output=True, text=True
        )
        assert out.returncode != 0 and "Traceback" in out.stderr, args
        assert "search.sampler: 'bayes' is not supported" in out.stderr


def test_bad_flag_value(capsys):
    with pytest.raises(SystemExit) as info:
        main(["search", "--space", "x.yaml", "--trials", "0"])
    assert info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_validate_prints_the_normal_form(tiny_space_file, capsys):
    assert main(["validate", "--space", str(tiny_space_file)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("study: tiny\n") and "round_to: 1" in out.out
    assert out.err.strip().endswith(": valid")


def test_show_of_a_missing_study(tmp_path, capsys):
    assert main(["show", "--study", "nothing", "--results", str(tmp_path)]) == 2
    assert "not a paretoopt study folder" in capsys.readouterr().err


def test_bad_storage_url(tmp_path, capsys, tiny_doc):
    tiny_doc["search"]["storage"] = "nosuchdb://localhost/x"
    message = bad_input(tmp_path, capsys, tiny_doc)
    assert message.startswith("search.storage: cannot open 'nosuchdb://localhost/x': ")


def test_a_model_the_runtime_cannot_take_fails_before_the_study_folder(tmp_path, capsys):
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "user_model.py", tmp_path / "user_model.py")
    doc = {
        "study": "moody",
        "model": {"factory": "user_model.py:build_moody"},
        "data": {"factory": "user_model.py:signals"},
        "baseline": {"epochs": 1},
        "search": {"trials": 2},
    }
    space = write_space(tmp_path / "moody.yaml", doc)
    code = main(["search", "--space", str(space), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(
        "error: the baseline cannot be measured in the target runtime (onnxruntime): "
    )
    assert not (tmp_path / "r" / "moody").exists()
