"""Space files as they were found to break the validation: each is refused with one
line (exit code 2 from the CLI, no results folder), quickly and with a short message."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from paretoopt.cli import main
from paretoopt.config.space import dump_space, load_space, parse_space
from paretoopt.config.yamlfile import MAX_DEPTH, load_yaml
from paretoopt.errors import SpaceError
from paretoopt.study.startup import _warn_slow_protocol

from .conftest import TINY


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _tiny_yaml(**replace: str) -> str:
    """TINY as YAML text, with some lines replaced (key -> the new line's text)."""
    text = yaml.safe_dump(TINY, sort_keys=False)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def _refused(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's one line for a space file, after checking nothing was left behind."""
    results = tmp_path / "results"
    code = main(["search", "--space", str(_file(tmp_path, text)), "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not results.exists() or not any(results.iterdir())
    return err


def test_a_nan_sparsity_bound_is_refused(tmp_path, capsys):
    text = _tiny_yaml(**{"low: 0.1": "low: .nan"})
    assert "space.pruning.sparsity.low: expected a finite number, but got nan" in _refused(
        tmp_path, text, capsys
    )


def test_a_nan_constraint_is_refused_and_leaves_no_folder(tmp_path, capsys):
    text = _tiny_yaml(**{"max_accuracy_drop: 100.0": "max_accuracy_drop: .nan"})
    assert "constraints.max_accuracy_drop: expected a finite number" in _refused(
        tmp_path, text, capsys
    )
    text = _tiny_yaml(**{"max_accuracy_drop: 100.0": "max_accuracy_drop: .inf"})
    assert "expected a finite number, but got inf" in _refused(tmp_path, text, capsys)


def test_deep_nesting_is_refused_in_one_line(tmp_path, capsys):
    depth = 20_000
    text = _tiny_yaml() + "extra: " + "[" * depth + "]" * depth + "\n"
    err = _refused(tmp_path, text, capsys)
    assert f"nested more than {MAX_DEPTH} levels deep" in err and "Recursion" not in err
    assert load_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None


def test_an_alias_bomb_in_model_kwargs_is_refused_at_once(tmp_path, capsys):
    bomb = "\n".join(
        [f"  a0: &a0 [{', '.join(['x'] * 9)}]"]
        + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    )
    text = _tiny_yaml(**{"name: tiny_conv": "name: tiny_conv\n  kwargs:\n" + bomb})
    start = time.perf_counter()
    err = _refused(tmp_path, text, capsys)
    assert "YAML aliases (*name) are not accepted" in err and len(err) < 200
    assert time.perf_counter() - start < 5.0  # 9**9 strings, had it been expanded


def test_a_duplicate_key_is_refused_with_its_line(tmp_path):
    text = _tiny_yaml(**{"study: tiny": "study: tiny\nstudy: other"})
    with pytest.raises(SpaceError, match=r"space\.yaml: line 2, column 1: duplicate key 'study'"):
        load_space(_file(tmp_path, text))


def test_a_long_value_is_cut_in_the_message():
    doc = copy.deepcopy(TINY)
    doc["search"]["sampler"] = "x" * 100_000
    with pytest.raises(SpaceError) as info:
        parse_space(doc)
    assert len(str(info.value)) < 200 and "..." in str(info.value)
    doc = copy.deepcopy(TINY)
    doc["target"]["y" * 100_000] = 1  # an unknown key, as long
    with pytest.raises(SpaceError) as info:
        parse_space(doc)
    assert len(str(info.value)) < 400


def test_a_stored_space_has_no_aliases_and_reads_back():
    doc = copy.deepcopy(TINY)
    shared = {"size": 8}
    doc["data"]["kwargs"] = shared
    doc["model"]["kwargs"] = shared  # the same object twice: yaml.safe_dump writes &id001
    space = parse_space(doc)
    text = dump_space(space)
    assert "&id" not in text and "*id" not in text
    assert parse_space(load_yaml(text)) == space


def test_a_protocol_that_costs_hours_says_so():
    doc = copy.deepcopy(TINY)
    doc["target"] |= {"repeats": 1000, "iterations": 100_000, "warmup_s": 600}
    space = parse_space(doc)
    said: list[str] = []
    _warn_slow_protocol(space, 0.05, SimpleNamespace(log=said.append))
    assert len(said) == 1 and "at least 10600 s" in said[0] and "8.8 h over 3 trials" in said[0]
    said.clear()
    _warn_slow_protocol(parse_space(TINY), 0.05, SimpleNamespace(log=said.append))
    assert said == []  # the shipped settings cost milliseconds


DATA = '''
import torch
from torch.utils.data import TensorDataset


def signals(labels="int", inputs="finite", n=60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 32, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    if labels == "negative":
        y[5] = -1
    if inputs == "nan":
        x[7, 0, 3] = float("nan")
    ys = y.float() + 0.5 if labels == "float" else y
    parts = (slice(0, 40), slice(40, 50), slice(50, 60))
    return tuple(TensorDataset(x[p], ys[p]) for p in parts)


class OnlyPairs(torch.nn.Module):
    """Runs on a batch of 2, not on the batch of 1 that latency is timed at."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(x.reshape(2, -1))
'''


def _checked(tmp_path: Path, data_kwargs: dict, model: dict | None = None) -> str:
    from paretoopt.study.trial import check_inputs

    (tmp_path / "hostile_data.py").write_text(DATA)
    doc = copy.deepcopy(TINY)
    doc["data"] = {"factory": "hostile_data.py:signals", "kwargs": data_kwargs}
    doc["model"] = model or {"factory": str(Path(__file__).parent / "user_model.py") + ":build"}
    doc["space"]["pruning"]["structure"] = "channel"
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpaceError) as info:
        check_inputs(load_space(path))
    return str(info.value)


def test_labels_and_inputs_are_checked_before_training(tmp_path):
    assert "label -1 is negative" in _checked(tmp_path, {"labels": "negative"})
    assert "the label 1.5 is not an integer class index" in _checked(tmp_path, {"labels": "float"})
    assert "item 7's input holds NaN" in _checked(tmp_path, {"inputs": "nan"})


def test_a_model_that_fails_at_batch_one_is_refused_before_training(tmp_path):
    err = _checked(tmp_path, {}, {"factory": "hostile_data.py:OnlyPairs"})
    assert err.startswith("model: a forward pass") and "failed at batch size 1" in err


def test_a_stored_space_from_before_with_aliases_still_reads_but_a_bomb_does_not():
    from paretoopt.config.yamlfile import MAX_EXPANDED

    shared = {"size": 8}
    doc = copy.deepcopy(TINY)
    doc["model"]["kwargs"] = doc["data"]["kwargs"] = shared
    old = yaml.safe_dump(doc)  # as dump_space wrote a shared value before
    assert "&id001" in old
    assert load_yaml(old, stored=True)["model"]["kwargs"] == {"size": 8}
    with pytest.raises(SpaceError, match="aliases"):
        load_yaml(old)  # a user's file: refused
    bomb = "a0: &a0 [1, 2]\n" + "".join(
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 40)
    )
    with pytest.raises(SpaceError, match=f"more than {MAX_EXPANDED}"):
        load_yaml(bomb, stored=True)
