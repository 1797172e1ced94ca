"""Workloads beyond images: a transformer over int64 token ids, end to end through the CLI."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from paretoopt import load
from paretoopt.cli import main
from paretoopt.results.frames import load_results, trial_record

from .conftest import write_space
from .text_model import CLASSES, LENGTH, sentences

HERE = Path(__file__).parent
QUICK_TARGET = {"warmup": 1, "warmup_s": 0.0, "repeats": 2, "iterations": 3, "quiet_s": 0.0}


@pytest.fixture(scope="module")
def text_study(tmp_path_factory):
    """A finished search of the token-id transformer: the baseline and two channel-pruned
    plans (half the MLP's hidden units and of each attention head's width)."""
    root = tmp_path_factory.mktemp("text")
    shutil.copy(HERE / "text_model.py", root / "text_model.py")
    doc = {
        "study": "text",
        "model": {"factory": f"{root / 'text_model.py'}:build"},
        "data": {"factory": f"{root / 'text_model.py'}:sentences"},
        "baseline": {"epochs": 12},
        "target": QUICK_TARGET,
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 3, "sampler": "random", "anchors": 0},
        "space": {
            "pruning": {"structure": "channel", "sparsity": 0.5},
            "quantization": {"bits": 8},
            "finetune": {"epochs": 3},
        },
    }
    space = write_space(root / "text.yaml", doc)
    assert main(["search", "--space", str(space), "--results", str(root / "r")]) == 0
    return root, space


def test_token_ids_reach_the_model_as_int64_and_every_trial_completes(text_study):
    root, _ = text_study
    trials = pd.read_csv(root / "r" / "text" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    assert trials.loc[0, "accuracy"] > 90.0  # the baseline learned the task
    results = load_results(root / "r" / "text")
    assert results.metadata["input_dtype"] == "int64"


def test_channel_pruning_narrows_attention_and_the_mlp(text_study):
    """Half the hidden units of the encoder's MLP go, and each of the 4 heads keeps half
    its width (embed_dim 32 -> 16, still a multiple of num_heads)."""
    root, _ = text_study
    results = load_results(root / "r" / "text")
    channels = trial_record(results, 1).layer_channels
    assert channels["encoder.layers.0.linear1"] == [32, 64]
    assert channels["encoder.layers.0.self_attn.out_proj"] == [16, 32]
    assert channels["head"] == [CLASSES, CLASSES]


def test_a_pruned_transformer_exports_verified_and_loads(text_study, tmp_path):
    root, space = text_study
    trials = pd.read_csv(root / "r" / "text" / "trials.csv")
    kept = trials[~trials["baseline"] & trials["artifact"].notna()]  # on the front
    number = int(kept["number"].iloc[0])
    out = tmp_path / "x"
    code = main(["export", "--study", "text", "--results", str(root / "r"), "--trial",
                 str(number), "--out", str(out), "--space", str(space)])  # fmt: skip
    assert code == 0
    _, _, test = sentences()
    ids = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    labels = np.array([int(test[i][1]) for i in range(len(test))])
    assert ids.dtype == np.int64 and ids.shape[1:] == (LENGTH,)
    figures = {}
    for name in ("onnx", "pt2", "safetensors"):
        model = load(out / f"text-trial{number}.{name}", space=space)
        figures[name] = model.accuracy(ids, labels)
    assert len(set(figures.values())) == 1, figures  # the three files are one model
    recorded = trials.set_index("number").loc[number, "test_accuracy"]
    assert figures["onnx"] == pytest.approx(recorded, abs=1e-9)
