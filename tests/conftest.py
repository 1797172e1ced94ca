from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# A study small enough to run in seconds: tiny CNN, 8x8 digits, a short baseline.
TINY: dict[str, Any] = {
    "study": "tiny",
    "model": {"name": "tiny_conv"},
    "data": {"name": "digits", "kwargs": {"size": 8}},
    "baseline": {"epochs": 3},
    "target": {
        "warmup": 2,
        "warmup_s": 0.0,
        "repeats": 2,
        "iterations": 5,
        "sessions": 1,
        "quiet_s": 0.0,  # the fixed rounds only: no waiting for a quiet machine
    },
    "constraints": {"max_accuracy_drop": 100.0},
    "search": {"trials": 3, "seed": 0},
    "space": {
        "pruning": {
            "structure": ["unstructured", "channel"],
            "sparsity": {"low": 0.1, "high": 0.6},
        },
        "quantization": {"bits": [4, 8, 32]},
        "finetune": {"epochs": 1},
    },
}


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def tiny_doc() -> dict[str, Any]:
    return copy.deepcopy(TINY)


def write_space(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def tiny_space_file(tmp_path: Path, tiny_doc: dict[str, Any]) -> Path:
    return write_space(tmp_path / "tiny.yaml", tiny_doc)


def pytest_report_header() -> str:
    """The log says which int8 kernels this run exercised (they differ by ISA)."""
    from paretoopt.measure.isa import int8_dot, this_machine

    isa, machine = this_machine()
    return f"paretoopt: {machine}, int8 on {int8_dot(isa, machine)}, flags {isa}"
