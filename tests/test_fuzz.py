"""Malformed and adversarial space files: every one ends in a clear error (SpaceError,
exit code 2 from the CLI) or a valid space, never a traceback or a results folder."""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paretoopt.cli import main
from paretoopt.config.knobs import Choice, Fixed, Range
from paretoopt.config.space import load_space, parse_space
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
        space = parse_space(doc)
    except SpaceError as exc:
        text = str(exc)
        assert text and "\n" not in text.strip() and "Traceback" not in text
        assert len(text) < 1000  # a message never formats an unbounded value
    else:
        _assert_within_bounds(space)


def _assert_within_bounds(obj: Any, where: str = "") -> None:
    """Every setting of an accepted space holds finite values within its documented
    bounds (a fixed knob's value, a choice's options, a range's ends)."""
    for f in fields(obj):
        value, path = getattr(obj, f.name), f"{where}.{f.name}".lstrip(".")
        if "section" in f.metadata:
            _assert_within_bounds(value, path)
            continue
        rule = f.metadata.get("rule")
        if rule is None or value is None:
            continue
        for v in _values(value):
            if isinstance(v, float):
                assert math.isfinite(v), (path, v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert rule.low is None or v >= rule.low, (path, v)
                assert rule.high is None or v <= rule.high, (path, v)
            if rule.options is not None:
                assert v in rule.options, (path, v)


def _values(value: Any) -> tuple[Any, ...]:
    if isinstance(value, Fixed):
        return (value.value,)
    if isinstance(value, Choice):
        return value.options
    if isinstance(value, Range):
        return (value.low, value.high)
    return (value,)


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


# YAML that plain data cannot produce: aliases (an alias bomb grows without end when
# formatted) and nesting deeper than any space file needs
def _aliased(n: int) -> str:
    """`n` levels of lists of aliases, each doubling the last (an alias bomb)."""
    lines = ["a0: &a0 [1, 2]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, n + 1)]
    return "\n".join([*lines, f"model: {{name: tiny_conv, kwargs: {{x: *a{n}}}}}"]) + "\n"


ALIASED = st.integers(1, 30).map(_aliased)
NESTED = st.integers(30, 5000).map(lambda n: "model: " + "[" * n + "]" * n + "\n")
BODIES = st.one_of(
    st.binary(max_size=200),
    VALUES.map(lambda v: yaml.safe_dump(v).encode()),
    ALIASED.map(str.encode),
    NESTED.map(str.encode),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(BODIES)
def test_the_cli_answers_with_one_line_and_exit_code_2(tmp_path: Path, capsys, body):
    space = tmp_path / "fuzz.yaml"
    space.write_bytes(body)
    results = tmp_path / "results"
    code = main(["search", "--space", str(space), "--results", str(results)])
    err = capsys.readouterr().err
    if code == 0:  # a body that happens to be a valid space starts a search: it must be one
        _assert_within_bounds(load_space(space))
        return
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 1000, err
    assert not results.exists() or not any(results.iterdir())
