"""Malformed and adversarial space files: every one ends in a clear error (SpaceError,
exit code 2 from the CLI) or a valid space, never a traceback or a results folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paretoopt.cli import main
from paretoopt.config.space import parse_space
from paretoopt.errors import SpaceError

from .conftest import TINY

KEYS = [
    "study", "model", "data", "baseline", "target", "constraints", "search", "space",
    "objectives", "name", "factory", "kwargs", "checkpoint", "epochs", "lr", "runtime",
    "device", "threads", "batch_size", "trials", "sampler", "pruning", "quantization",
    "bits", "sparsity", "structure", "low", "high", "log", "step", "activations", "method",
    "distribution", "agent", "max_accuracy_drop", "finetune", "distillation", "alpha",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["conv", "digits", "tpe", "int8", "qat", "cuda", "../../etc/passwd"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=20,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    return out


def _mutate(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _check(doc: Any) -> None:
    try:
        parse_space(doc)
    except SpaceError as exc:
        text = str(exc)
        assert text and "\n" not in text.strip() and "Traceback" not in text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_any_document_is_refused_clearly_or_accepted(doc):
    _check(doc)


PATHS = _paths(TINY)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), VALUES)
def test_a_valid_document_with_one_value_changed(path, value):
    _check(_mutate(TINY, path, value))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([p for p in PATHS if p]))
def test_a_valid_document_with_one_key_removed(path):
    doc = copy.deepcopy(TINY)
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    _check(doc)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(st.binary(max_size=200), VALUES.map(lambda v: yaml.safe_dump(v).encode())))
def test_the_cli_answers_with_one_line_and_exit_code_2(tmp_path: Path, capsys, body):
    space = tmp_path / "fuzz.yaml"
    space.write_bytes(body)
    results = tmp_path / "results"
    code = main(["search", "--space", str(space), "--results", str(results)])
    err = capsys.readouterr().err
    if code != 0:  # a body that happens to be a valid space would start a search
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not results.exists() or not any(results.iterdir())
