"""The explorer: its data layer, and the app's states driven through Streamlit's AppTest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from paretoopt.results import explore
from paretoopt.results.frames import journal_storage, load_results
from paretoopt.study.search import search

from .conftest import TINY, write_space

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A results folder: a finished study, plus an empty, a failed-only and a running one."""
    base = tmp_path_factory.mktemp("explorer")
    results = base / "results"
    doc = dict(TINY, search={"trials": 6, "seed": 0})
    search(write_space(base / "tiny.yaml", doc), results_root=results)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("empty", "failed", "running"):
        folder = results / name
        folder.mkdir()
        space = (
            (results / "tiny" / "space.yaml").read_text().replace("study: tiny", f"study: {name}")
        )
        (folder / "space.yaml").write_text(space)
        study = optuna.create_study(
            study_name=name,
            storage=journal_storage(folder),
            directions=["maximize", "minimize", "minimize"],
        )
        if name == "failed":
            trial = study.ask()
            trial.set_user_attr("fail_reason", "TrialError: fine-tuning diverged")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    # "running": the finished study's trials and one still in flight, as a live search has
    shutil.rmtree(results / "running")
    shutil.copytree(results / "tiny", results / "running")
    live = optuna.load_study(study_name="tiny", storage=journal_storage(results / "running"))
    live.ask()
    return results


def app(root: Path, study: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    sys.argv = ["app.py", "--results", str(root)]
    at.run()
    if study is not None:
        at.selectbox(key="study").set_value(study).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [i.value for i in at.info] + [w.value for w in at.warning]
    return "\n".join(parts)


# --------------------------------------------------------------------------- app states


def test_a_missing_results_folder_says_what_to_do(tmp_path):
    at = app(tmp_path / "nothing")
    assert "No results folder at" in at.info[0].value


def test_an_empty_results_folder_says_what_to_do(tmp_path):
    at = app(tmp_path)
    assert "No studies in" in at.info[0].value


def test_a_study_without_trials(root):
    assert "has no trials yet" in texts(app(root, "empty"))


def test_a_study_whose_trials_all_failed(root):
    at = app(root, "failed")
    assert "No trial of this study has completed" in texts(at)
    assert "fine-tuning diverged" in at.dataframe[0].value["fail_reason"].iloc[0]


def test_a_running_study_is_followed_live_and_a_finished_one_is_not(root, tmp_path):
    assert "Following the running search" in texts(app(root, "running"))
    assert "Following the running search" not in texts(app(root, "tiny"))
    live = load_results(root / "running")
    assert explore.is_live(live) and not explore.is_live(load_results(root / "tiny"))
    # what the page polls for moves when a search records a trial
    results = tmp_path / "results"
    shutil.copytree(root / "running", results / "running")
    copy = load_results(results / "running")
    before = explore.storage_state(copy)
    study = optuna.load_study(study_name="tiny", storage=journal_storage(results / "running"))
    study.ask()
    assert explore.storage_state(copy) != before


def test_a_running_study_opens_read_only(root):
    journal = root / "running" / "study.journal"
    before = journal.read_bytes()
    at = app(root, "running")
    assert "1 running" in texts(at)
    assert "### Trial" in texts(at)
    assert journal.read_bytes() == before  # read-only: the live study is not touched


def test_the_explorer_names_the_studys_quality_metric(root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(root / "tiny", results / "f1")
    space = results / "f1" / "space.yaml"
    assert "metric: top1" in space.read_text()
    space.write_text(space.read_text().replace("metric: top1", "metric: macro_f1"))
    at = app(results, "f1")
    labels = [m.label for m in at.metric]
    assert "Baseline macro F1" in labels and "Macro F1 (deployed)" in labels
    assert "test macro F1 " in texts(at)
    assert "F1 %" in at.dataframe[0].value.columns


def _charts(at: AppTest) -> dict[str, dict]:
    """The plotly figures the page drew, by chart key."""
    return {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def test_every_layer_of_a_sequential_model_gets_its_own_bar(root):
    """nn.Sequential names its layers "0.0", "1.0", "6": read as numbers, bars sat at
    x = 0, 1, 6 and "3.conv1" was left out. A category axis draws one bar per layer."""
    at = app(root, "tiny")
    layers = _charts(at)["layers"]
    assert layers["layout"]["xaxis"]["type"] == "category"
    names = [str(n) for n in layers["data"][0]["x"]]
    assert names == layers["layout"]["xaxis"]["categoryarray"]
    assert "3.conv1" in names and "0.0" in names and len(set(names)) == len(names)
    tables = [d.value for d in at.dataframe if "layer" in d.value.columns]
    assert [list(t["layer"]) for t in tables] == [names]  # the table below lists the same


def test_front_points_are_drawn_over_the_others_and_log_axes_read_whole_values(root):
    at = app(root, "tiny")
    front = _charts(at)["front"]
    kinds = [t.get("name") for t in front["data"]]
    drawn = [k for k in kinds if k in ("front", "dominated", "infeasible")]
    assert drawn[-1] == "front"  # plotted last, on top
    ticks = front["layout"]["xaxis"]["ticktext"]
    assert {"1", "2", "5", "10", "20"} <= set(ticks)  # not "1 2 5 10 2 5"


def test_the_drop_budget_starts_at_the_studys_limit_and_spans_a_useful_range(root):
    at = app(root, "tiny")
    drop = [s for s in at.slider if s.label.startswith("Max accuracy drop")][0]
    limit = load_results(root / "tiny").constraints["max_accuracy_drop"]  # TINY: 100
    base = load_results(root / "tiny").baseline["accuracy"]
    assert drop.value == min(limit, drop.max) and drop.max == min(base, max(1.0, 2 * limit))


def test_the_drop_budget_of_a_tight_study_is_its_constraint(root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(root / "tiny", results / "tight")
    space = results / "tight" / "space.yaml"
    text = space.read_text()
    assert "max_accuracy_drop: 100.0" in text
    space.write_text(text.replace("max_accuracy_drop: 100.0", "max_accuracy_drop: 0.5"))
    at = app(results, "tight")
    drop = [s for s in at.slider if s.label.startswith("Max accuracy drop")][0]
    assert (drop.value, drop.min, drop.max) == (0.5, 0.0, 1.0)


def test_a_finished_study_suggests_the_knee_and_offers_the_export(root):
    at = app(root, "tiny")
    results = load_results(root / "tiny")
    knee = explore.suggested(explore.candidates(results, explore.Budget()))
    assert f"suggested: trial {knee} (knee)" in texts(at)
    assert f"### Trial {knee}:" in texts(at)
    assert at.code[0].value == (
        f"paretoopt export --study tiny --results {root} --trial {knee} --out exported/"
    )
    labels = [b.proto.label for b in at.get("download_button")]
    assert any(label.startswith("Download model files") for label in labels)
    assert "Download the study report (.html, opens offline)" in labels


def test_selecting_a_point_on_the_plot_selects_the_candidate(root):
    at = app(root, "tiny")
    results = load_results(root / "tiny")
    other = int(results.pareto["number"].iloc[-1])
    at.session_state["front"] = {
        "selection": {
            "points": [{"customdata": [other]}],
            "point_indices": [0],
            "box": [],
            "lasso": [],
        }
    }
    at.run()
    assert f"### Trial {other}:" in texts(at)
    at.run()  # the selection survives a rerun (and so new trials arriving)
    assert at.session_state["selected"] == {"tiny": other}
    # a later choice in the box wins over the old click that widget state still holds
    first = int(at.selectbox(key="candidate_choice").options[0])
    at.selectbox(key="candidate_choice").set_value(first).run()
    assert f"### Trial {first}:" in texts(at)


def test_selecting_a_table_row_selects_the_candidate(root):
    at = app(root, "tiny")
    pool = [int(o) for o in at.selectbox(key="candidate_choice").options]
    at.session_state["candidates"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert f"### Trial {pool[1]}:" in texts(at)


def test_the_selection_belongs_to_its_study(root):
    at = app(root, "tiny")
    at.session_state["selected"] = {"failed": 3}
    at.run()
    assert "### Trial" in texts(at)  # tiny shows its knee, not a foreign trial 3
    at.selectbox(key="study").set_value("failed").run()
    assert "No trial of this study has completed" in texts(at)


def test_the_download_makes_the_same_files_as_the_command(root):
    from paretoopt.app import export_zip

    results = load_results(root / "tiny")
    number = int(results.pareto["number"].iloc[0])
    import io
    import zipfile

    names = sorted(zipfile.ZipFile(io.BytesIO(export_zip(results, number))).namelist())
    stem = f"tiny-trial{number}"
    assert names == sorted(
        f"{stem}{s}" for s in (".onnx", ".pt2", ".safetensors", ".card.json", ".card.md")
    )


def test_a_budget_narrows_the_candidates(root):
    at = app(root, "tiny")
    before = len(load_results(root / "tiny").pareto)
    assert f"Candidates within the budget: {before}" in texts(at)
    results = load_results(root / "tiny")
    smallest = float(results.pareto["size_bytes"].min()) / 1000
    at.slider(key="max_size_kb:tiny").set_value(smallest).run()
    assert "Candidates within the budget: 1" in texts(at)


def test_the_app_does_not_import_torch_until_an_export(root):
    code = (
        "import sys; from streamlit.testing.v1 import AppTest; "
        f"sys.argv = ['app.py', '--results', {str(root)!r}]; "
        f"at = AppTest.from_file({str(APP)!r}, default_timeout=60); at.run(); "
        "at.selectbox(key='study').set_value('tiny').run(); "
        "assert not at.exception and '### Trial' in str([m.value for m in at.markdown]); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# --------------------------------------------------------------------------- data layer


def test_hypervolume_is_exact_on_a_small_case():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # reference (4, 4): the staircase covers 3 + 2 + 1 = 6 unit squares
    assert explore._hypervolume(points, np.array([4.0, 4.0])) == pytest.approx(6.0)
    cube = np.array([[0.5, 0.5, 0.5]])
    assert explore._hypervolume(cube, np.ones(3)) == pytest.approx(0.125)
    assert explore._hypervolume(np.vstack([cube, [[0.6, 0.6, 0.6]]]), np.ones(3)) == 0.125


def test_hypervolume_never_falls_over_trials(root):
    history = explore.hypervolume_history(load_results(root / "tiny"), ["accuracy", "size"])
    values = history["hypervolume"].to_numpy()
    assert len(values) >= 1 and np.all(np.diff(values) >= -1e-12)


def test_selection_events_map_to_trial_numbers():
    event = {"selection": {"points": [{"customdata": [7]}, {"customdata": [3]}, {}]}}
    assert explore.selected_trials(event) == [7, 3]
    assert explore.selected_trials(None) == []


def test_budget_mask_and_categories(root):
    results = load_results(root / "tiny")
    kinds = explore.categories(results)
    assert set(kinds[results.trials["number"].isin(results.pareto["number"])]) == {"front"}
    frame = pd.DataFrame({"accuracy": [99.0, 97.0], "size_bytes": [10, 50], "latency_ms": [1, 2]})
    mask = explore.Budget({"accuracy": 1.0, "size": 40}).mask(frame, {"accuracy": 99.5})
    assert list(mask) == [True, False]


def test_layer_table_and_influence(root):
    results = load_results(root / "tiny")
    from paretoopt.results.frames import trial_record

    number = int(results.pareto["number"].iloc[0])
    table = explore.layer_table(trial_record(results, number))
    assert list(table.columns) == [
        "layer",
        "sparsity",
        "channels kept",
        "rank",
        "bits",
        "clusters",
        "kernel",
    ]
    assert len(table) >= 2
    influence = explore.influence(results)
    assert set(influence.columns) == {"parameter", "accuracy", "size", "latency"}
    assert (
        (
            (influence[["accuracy", "size", "latency"]] >= 0)
            & (influence[["accuracy", "size", "latency"]] <= 1)
        )
        .all()
        .all()
    )


def test_a_handed_study_with_its_own_factory_offers_no_download(root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(root / "tiny", results / "handed")
    folder = results / "handed"
    (folder / "helper.py").write_text("raise SystemExit('imported')\n")
    space = (folder / "space.yaml").read_text().replace("study: tiny", "study: handed")
    space = space.replace("name: tiny_conv", f"factory: {folder / 'helper.py'}:build")
    (folder / "space.yaml").write_text(space)
    (folder / "study.journal").write_text(  # the journal names the study too
        (root / "tiny" / "study.journal").read_text().replace('"tiny"', '"handed"')
    )
    at = app(results, "handed")
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Download the study report (.html, opens offline)"]  # data only
    assert "helper.py:build" in texts(at) and "paretoopt app --space" in texts(at)


def test_a_study_in_a_database_is_followed_live_too(tmp_path):
    """A study kept in a database (search.storage) has no journal to watch: the page's
    poll counts its trials by state instead, so a new or finished trial shows."""
    from types import SimpleNamespace

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="db", storage=url, directions=["maximize"])
    results = SimpleNamespace(storage=url, directory=tmp_path, name="db")
    before = explore.storage_state(results)
    trial = study.ask()
    running = explore.storage_state(results)
    study.tell(trial, 1.0)
    assert len({before, running, explore.storage_state(results)}) == 3


# --------------------------------------------------------------------------- compared runtimes


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A finished study whose trials were measured in eager PyTorch too (target.compare)."""
    base = tmp_path_factory.mktemp("compared")
    doc = dict(TINY, study="tiny-compare", search={"trials": 3, "seed": 0})
    doc["target"] = {**TINY["target"], "compare": ["torch"]}
    search(write_space(base / "tiny.yaml", doc), results_root=base / "results")
    return base / "results"


def test_a_compared_study_reads_one_front_per_runtime(compared):
    from paretoopt.results.frames import for_target

    results = load_results(compared / "tiny-compare")
    assert results.runtimes == ["onnxruntime", "torch"] and results.shown_runtime == "onnxruntime"
    assert for_target(results, "onnxruntime") is results and for_target(results, None) is results
    view = for_target(results, "torch")
    base = results.baseline["compared"]["torch"]
    assert view.baseline["latency_ms"] == base["latency_ms"]
    assert view.baseline["size_bytes"] == results.baseline["size_bytes"]  # the same file
    done = view.trials[view.trials["state"] == "COMPLETE"]
    own = results.trials.set_index("number")
    for _, row in done.iterrows():
        assert row["latency_ms"] == own.loc[row["number"], "latency_ms@torch"]
        assert row["accuracy"] == own.loc[row["number"], "accuracy@torch"]
        assert row["speedup"] == pytest.approx(base["latency_ms"] / row["latency_ms"])
        assert row["accuracy_change"] == pytest.approx(row["accuracy"] - base["accuracy"])
        assert own.loc[row["number"], "speedup@torch"] == pytest.approx(row["speedup"])
    assert set(view.pareto["number"]) <= set(done["number"])
    with pytest.raises(Exception, match="measured its trials in onnxruntime, torch, not in"):
        for_target(results, "openvino")
    assert for_target(results, "Torch").shown_runtime == "torch"  # names in any case


def test_the_explorer_switches_between_the_runtimes_of_a_compared_study(compared):
    at = app(compared, "tiny-compare")
    selector = at.selectbox(key="runtime:tiny-compare")
    assert list(selector.options) == ["onnxruntime", "torch"]
    assert "figures in onnxruntime" in texts(at)
    selector.set_value("torch").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "figures in torch" in texts(at)
    assert " --target torch --trial " in at.code[0].value  # the export of what the page shows


def test_the_report_of_a_compared_runtime_names_it_and_its_baseline(compared, tmp_path):
    from paretoopt.cli import main

    out = tmp_path / "torch.html"
    args = ["report", "--results", str(compared), "--study", "tiny-compare", "--out", str(out)]
    assert main([*args, "--target", "torch"]) == 0
    page = out.read_text()
    run = json.loads((compared / "tiny-compare" / "run.json").read_text())
    theirs = run["sessions"][-1]["calibration"]["compared"]["torch"]["reference_ms"]
    assert "Measured in torch on" in page and f"baseline reference {theirs:.4f} ms" in page
    assert main([*args, "--target", "tflite"]) == 2  # one line, not a traceback


def test_the_baseline_and_plans_of_its_structure_read_1x_against_it(root):
    results = load_results(root / "tiny")
    frame = results.trials[results.trials["state"] == "COMPLETE"]
    base = frame[frame["baseline"]].iloc[0]
    assert base["speedup"] == 1.0  # its pooled latency is the one ratios are read against
    assert results.baseline["latency_ms"] == base["latency_ms"]
    same = frame[frame["latency_structure"] == base["latency_structure"]]
    assert (same["speedup"] == 1.0).all()
