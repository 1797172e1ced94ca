from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from paretoopt.cli import main
from paretoopt.results import load_results

from .conftest import write_space

HERE = Path(__file__).resolve().parent


def run_cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short study shared by the tests that only read it."""
    from .conftest import TINY

    root = tmp_path_factory.mktemp("study")
    space = write_space(root / "tiny.yaml", TINY)
    assert run_cli("search", "--space", str(space), "--results", str(root / "results")) == 0
    return root, space


def test_search_writes_every_output(finished):
    root, _ = finished
    study = root / "results" / "tiny"
    for name in ("space.yaml", "run.json", "trials.csv", "pareto.csv", "study.journal"):
        assert (study / name).is_file(), name
    trials = pd.read_csv(study / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2]
    assert trials.loc[0, "baseline"] and trials.loc[0, "plan"] == "dense, fp32"
    assert (trials["state"] == "COMPLETE").all()
    meta = json.loads((study / "run.json").read_text())
    assert meta["baseline"]["accuracy"] == pytest.approx(trials.loc[0, "accuracy"])
    assert meta["hardware"]["cores"] >= 1 and meta["versions"]["optuna"]
    assert meta["baseline_source"] == "trained"
    assert meta["calibrations"][0]["reference_ms"] > 0


def test_size_is_the_byte_count_of_the_front_artifacts(finished):
    root, _ = finished
    results = load_results(root / "results" / "tiny")
    assert len(results.pareto) >= 1
    for _, row in results.pareto.iterrows():
        artifact = root / "results" / "tiny" / row["artifact"] / "model.safetensors"
        assert artifact.stat().st_size == row["size_bytes"]
    kept = {p.name for p in (root / "results" / "tiny" / "trials").iterdir()}
    assert kept == {str(n) for n in results.pareto["number"]} | {"0"}


def test_resume_continues_to_the_new_total_and_reuses_the_baseline(finished, tmp_path):
    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    assert run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4") == 0
    trials = pd.read_csv(results / "tiny" / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2, 3]
    meta = json.loads((results / "tiny" / "run.json").read_text())
    assert meta["baseline_source"] == "cache"
    # one latency scale per study: the first calibration's reference is kept
    assert len(meta["calibrations"]) == 2
    assert meta["reference_ms"] == meta["calibrations"][0]["reference_ms"]
    assert meta["calibrations"][1]["reference_ms"] == meta["reference_ms"]
    # the same command again has nothing left to do
    assert run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4") == 0
    assert len(pd.read_csv(results / "tiny" / "trials.csv")) == 4


def test_resume_refuses_a_changed_space(finished, tmp_path, capsys):
    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    doc = yaml.safe_load(space.read_text())
    doc["space"]["quantization"]["bits"] = [2, 4]
    changed = write_space(tmp_path / "tiny.yaml", doc)
    assert run_cli("search", "--space", str(changed), "--results", str(results)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study 'tiny' in ")
    assert "space.quantization.bits: [4, 8, 32] then, [2, 4] now" in err


def test_interrupted_trials_are_failed_and_replaced(finished, tmp_path):
    import optuna

    from paretoopt.results import journal_storage

    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    storage = journal_storage(results / "tiny")
    study = optuna.load_study(study_name="tiny", storage=storage)
    study.ask()  # a trial left RUNNING, as by a process killed mid-trial
    assert run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4") == 0
    trials = pd.read_csv(results / "tiny" / "trials.csv")
    assert trials.loc[3, "state"] == "FAIL"
    assert trials.loc[3, "fail_reason"].startswith("interrupted")
    assert (trials["state"] == "COMPLETE").sum() == 4


def test_user_model_and_dataset_factories(tmp_path):
    shutil.copy(HERE / "user_model.py", tmp_path / "user_model.py")
    doc = {
        "study": "signals",
        "model": {"factory": "user_model.py:build", "kwargs": {"channels": 8}},
        "data": {"factory": "user_model.py:signals"},
        "baseline": {"epochs": 4},
        "target": {"warmup": 1, "repeats": 2, "iterations": 3},
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 3, "sampler": "random"},
        "space": {
            "pruning": {
                "structure": "channel",
                "sparsity": {"low": 0.3, "high": 0.5},
                "per_layer": True,
            },
            "quantization": {"bits": [4]},
            "finetune": {"epochs": 1},
        },
    }
    space = write_space(tmp_path / "signals.yaml", doc)
    assert run_cli("search", "--space", str(space), "--results", str(tmp_path / "r")) == 0
    trials = pd.read_csv(tmp_path / "r" / "signals" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    channel = trials[trials["plan"].str.startswith("channel")]
    assert len(channel) == 2
    assert (channel["latency_ms"] > 0).all()
    layer_params = [c for c in trials.columns if c.startswith("param.prune.layer.")]
    assert "param.prune.layer.block.dw" in layer_params
    assert "param.prune.layer.out" not in layer_params  # the classifier keeps its outputs


def test_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    shutil.copy(HERE / "user_model.py", tmp_path / "user_model.py")
    doc = {
        "study": "fragile",
        "model": {"factory": "user_model.py:build_fragile"},
        "data": {"factory": "user_model.py:signals"},
        "baseline": {"epochs": 2},
        "target": {"warmup": 1, "repeats": 1, "iterations": 2},
        "search": {"trials": 3, "sampler": "random"},
        "space": {
            "pruning": {"structure": "channel", "sparsity": 0.3},
            "quantization": {"bits": 8},
            "finetune": {"epochs": 1},
        },
    }
    space = write_space(tmp_path / "fragile.yaml", doc)
    assert run_cli("search", "--space", str(space), "--results", str(tmp_path / "r")) == 0
    trials = pd.read_csv(tmp_path / "r" / "fragile" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "FAIL"]
    assert trials.loc[1, "fail_reason"] == ("ValueError: needs features in multiples of 8, has 11")
