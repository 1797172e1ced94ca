"""The quality objective: built-in metrics against scikit-learn's, batch by batch; user
metrics checked at load; a study with a user metric, end to end through the CLI."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

from paretoopt.cli import main
from paretoopt.config.metrics import quality_metric
from paretoopt.config.space import parse_space
from paretoopt.errors import SpaceError, TrialError
from paretoopt.results.frames import load_results
from paretoopt.workload.quality import Quality, load_quality

from .conftest import write_space


def _data(n: int = 300, classes: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.standard_normal((n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += rng.uniform(0, 2, n).astype(np.float32)  # some skill
    return logits, labels


def _batches(logits, labels, size):
    return [(logits[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


@pytest.mark.parametrize("size", [1, 13, 300])
def test_built_in_metrics_equal_scikit_learn_whatever_the_batching(size):
    logits, labels = _data()
    predicted = logits.argmax(axis=1)
    expected = {
        "top1": 100.0 * float((predicted == labels).mean()),
        "top5": 100.0 * top_k_accuracy_score(labels, logits, k=5, labels=range(7)),
        "macro_f1": 100.0 * f1_score(labels, predicted, average="macro"),
        "balanced_accuracy": 100.0 * balanced_accuracy_score(labels, predicted),
    }
    for name, value in expected.items():
        got = Quality(name).score(_batches(logits, labels, size))
        assert got == pytest.approx(value, abs=1e-9), name


def test_macro_f1_counts_a_class_only_predicted_and_skips_one_never_seen():
    """scikit-learn's macro F1 averages over the classes in the labels or predictions: a
    class the model predicts but the labels lack scores 0, a class in neither is left out."""
    logits = np.zeros((4, 5), dtype=np.float32)
    logits[[0, 1, 2, 3], [0, 1, 1, 3]] = 1.0  # predicts 0, 1, 1, 3
    labels = np.array([0, 1, 2, 2])
    got = Quality("macro_f1").score([(logits, labels)])
    assert got == pytest.approx(100 * f1_score(labels, logits.argmax(1), average="macro"))


def test_top_k_breaks_ties_as_scikit_learn_does():
    """Whole-number logits tie often: a tied class of a higher index ranks first."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 500)
    logits = rng.integers(0, 3, (500, 8)).astype(np.float32)
    expected = 100.0 * top_k_accuracy_score(labels, logits, k=5, labels=range(8))
    assert Quality("top5").score(_batches(logits, labels, 64)) == pytest.approx(expected)


def test_top5_with_fewer_classes_than_five_is_every_sample():
    logits, labels = _data(classes=3)
    assert Quality("top5").score([(logits, labels)]) == 100.0


def test_a_user_metric_sees_the_whole_split_as_numpy():
    seen = []

    def metric(logits, labels):
        seen.append((logits.shape, logits.dtype, labels.dtype))
        return float(labels.sum())

    logits, labels = _data(n=50)
    assert Quality("m:metric", metric).score(_batches(logits, labels, 16)) == labels.sum()
    assert seen == [((50, 7), np.float32, np.int64)]


def test_a_user_metric_that_fails_in_a_trial_names_itself():
    quality = Quality("m:bad", lambda logits, labels: float("nan"))
    with pytest.raises(TrialError, match=r"metric m:bad: must return a finite number"):
        quality.score([_data(n=8)])


# --------------------------------------------------------------------------- the space file


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def m(logits, labels):\n    return 'high'\n", r"must return a number, but returned str"),
        ("def m(logits, labels):\n    return None\n", r"must return a number"),
        ("def m(logits, labels):\n    return float('inf')\n", r"must return a finite number"),
        ("def m(logits):\n    return 1.0\n", r"calling it with logits \(8, 3\) float32 .* failed"),
        ("def m(logits, labels):\n    raise ValueError('no')\n", r"ValueError: no"),
    ],
)
def test_a_bad_user_metric_fails_at_load_in_one_line(tmp_path, source, message):
    (tmp_path / "metric.py").write_text(source)
    space = parse_space(_doc("metric.py:m"), source=tmp_path / "s.yaml")
    with pytest.raises(SpaceError, match=message) as info:
        load_quality(space.metric)
    assert str(info.value).startswith("metric: ") and "\n" not in str(info.value)


def _doc(metric):
    return {
        "model": "tiny_conv",
        "data": {"name": "digits", "kwargs": {"size": 8}},
        "metric": metric,
    }


@pytest.mark.parametrize("metric", ["top3", "accuracy", 5, ["top1"]])
def test_an_unknown_metric_lists_the_choices(metric):
    with pytest.raises(SpaceError, match=r"^metric: .* choose from top1, top5, macro_f1, "):
        parse_space(_doc(metric))


def test_a_missing_metric_file_is_named(tmp_path):
    with pytest.raises(SpaceError, match=r"metric: file 'nope.py' does not exist"):
        parse_space(_doc("nope.py:m"), source=tmp_path / "s.yaml")


def test_metric_defaults_to_top1_and_labels_follow_it():
    assert parse_space(_doc("top1")).metric == "top1"
    assert quality_metric("top1").label == "validation accuracy (%)"  # as it always was
    assert quality_metric("macro_f1").label == "validation macro F1 (%)"
    user = quality_metric("/x/metric.py:mean_margin")
    assert user.label == "validation mean_margin" and user.display_unit == ""


# --------------------------------------------------------------------------- end to end

METRIC = '''
import numpy as np

def agreement(logits, labels):
    """Top-1 agreement as a fraction (0 to 1): units that are not percent."""
    return float((logits.argmax(axis=1) == labels).mean())
'''


def test_a_study_with_a_user_metric_records_and_exports_in_its_units(tmp_path, tiny_doc, capsys):
    (tmp_path / "metric.py").write_text(METRIC)
    tiny_doc.update(metric="metric.py:agreement", constraints={"max_accuracy_drop": 1.0})
    tiny_doc["search"] = {"trials": 3, "seed": 0, "anchors": 0}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    results = tmp_path / "r"
    assert main(["search", "--space", str(space), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"baseline: val agreement 0\.\d{4} after", out)  # its units, not %
    trials = pd.read_csv(results / "tiny" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 3 and done["accuracy"].between(0.0, 1.0).all()
    assert done["test_accuracy"].between(0.0, 1.0).all()
    assert load_results(results / "tiny").quality.endswith("metric.py:agreement")
    export = ["export", "--study", "tiny", "--results", str(results), "--trial", "0",
              "--out", str(tmp_path / "x")]  # fmt: skip
    capsys.readouterr()
    assert main(export) == 2  # the folder is data: its metric is code, not imported
    assert "metric " in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*export, "--space", str(space)]) == 0  # the space file the user trusts
    card = json.loads(next((tmp_path / "x").glob("*.card.json")).read_text())
    assert card["metric"].endswith("metric.py:agreement")
    check = card["files"]["onnx"]
    assert check["test_accuracy"] == pytest.approx(check["recorded_test_accuracy"], abs=1e-6)
    assert 0.5 < check["test_accuracy"] <= 1.0
    markdown = next((tmp_path / "x").glob("*.card.md")).read_text()
    assert "| validation agreement (deployed) |" in markdown
    assert "test agreement" in capsys.readouterr().out


def test_a_study_cannot_resume_under_another_metric(tmp_path, tiny_doc, capsys):
    tiny_doc["search"] = {"trials": 1, "seed": 0, "anchors": 0}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    results = tmp_path / "r"
    assert main(["search", "--space", str(space), "--results", str(results)]) == 0
    tiny_doc.update(metric="macro_f1", search={"trials": 2, "seed": 0, "anchors": 0})
    write_space(space, tiny_doc)
    assert main(["search", "--space", str(space), "--results", str(results)]) == 2
    assert "metric: 'top1' then, 'macro_f1' now" in capsys.readouterr().err
