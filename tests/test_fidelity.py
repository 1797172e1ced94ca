"""Cost-aware search (study/fidelity): the decisions as arithmetic, then a real study."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from paretoopt.config.space import load_space
from paretoopt.results.frames import (
    COMPUTE_ATTR,
    PRESCREEN_ATTR,
    RUNGS_ATTR,
    STOP_ATTR,
    load_results,
    open_storage,
)
from paretoopt.study.fidelity import (
    LATENCY_MARGIN,
    crowding,
    fidelity_of,
    held_back,
    pareto_ranks,
    prescreen_reason,
    rung_steps,
)
from paretoopt.study.search import search

from .conftest import write_space

# --------------------------------------------------------------------------- policy


def _space(tmp_path: Path, doc: dict[str, Any], **search_keys: Any) -> Any:
    doc = {**doc, "search": {**doc["search"], **search_keys}}
    return load_space(write_space(tmp_path / "s.yaml", doc))


def test_auto_halves_only_long_fine_tunes(tmp_path, tiny_doc):
    assert fidelity_of(_space(tmp_path, tiny_doc)).full  # 1 epoch: every plan in full
    tiny_doc["space"]["finetune"] = {"epochs": {"low": 1, "high": 6}}
    long = fidelity_of(_space(tmp_path, tiny_doc))
    assert long.prescreen and long.rungs == (1 / 9, 1 / 3) and long.eta == 3


def test_explicit_policies(tmp_path, tiny_doc):
    assert fidelity_of(_space(tmp_path, tiny_doc, fidelity="full")).full
    pre = fidelity_of(_space(tmp_path, tiny_doc, fidelity="prescreen"))
    assert pre.prescreen and pre.rungs == ()
    halving = fidelity_of(
        _space(tmp_path, tiny_doc, fidelity="halving", halving_eta=2, halving_rungs=3)
    )
    assert halving.rungs == (1 / 8, 1 / 4, 1 / 2) and halving.eta == 2


def test_a_bad_fidelity_names_the_options(tmp_path, tiny_doc):
    from paretoopt.errors import SpaceError

    with pytest.raises(
        SpaceError, match=r"search\.fidelity: 'cheap' .*auto, full, prescreen, halving"
    ):
        _space(tmp_path, tiny_doc, fidelity="cheap")


def test_rung_steps_drop_the_degenerate_ones():
    from paretoopt.study.fidelity import Fidelity

    f = Fidelity(prescreen=True, rungs=(1 / 9, 1 / 3), eta=3)
    assert rung_steps(f, 90) == {10: 0, 30: 1}
    assert rung_steps(f, 5) == {1: 1}  # 5/9 rounds to step 0: no rung there
    assert rung_steps(f, 2) == {}


# --------------------------------------------------------------------------- rungs


def test_pareto_ranks_and_crowding():
    points = [(0, 3), (1, 1), (3, 0), (2, 2), (3, 3)]
    assert pareto_ranks(points) == [0, 0, 0, 1, 2]
    crowd = crowding(points, pareto_ranks(points))
    assert crowd[0] == crowd[2] == math.inf  # the front's ends
    assert crowd[1] == pytest.approx(2.0)  # (3-0)/3 + (3-0)/3


def test_a_dominated_trial_stops_and_says_by_how_many():
    reason = held_back((2, 2), [(1, 1), (0, 3)], eta=3)
    assert reason == "dominated by 1 of the 2 other trials seen there"


def test_the_first_trials_at_a_rung_go_on():
    assert held_back((5, 5), [], eta=3) is None
    assert held_back((0, 3), [(3, 0)], eta=3) is None  # both ends of the front: ties go on


def test_only_the_best_share_of_a_front_goes_on():
    # six non-dominated points on a line: ceil(6/3) = 2 go on; the ends have infinite
    # crowding distance, so a middle point is held back
    line = [(i, 5 - i) for i in range(6)]
    middle, others = line[2], [p for p in line if p != line[2]]
    reason = held_back(middle, others, eta=3)
    assert reason is not None and reason.startswith("not among the best 2 of the 6")
    assert held_back(line[0], line[1:], eta=3) is None


# --------------------------------------------------------------------------- prescreen


BASE = {"accuracy": 90.0, "size_bytes": 1000, "latency_ms": 1.0}


def _done(accuracy: float, size: int, latency: float, structure: str = "a") -> dict[str, Any]:
    return {
        "accuracy": accuracy,
        "size_bytes": size,
        "latency_ms": latency,
        "latency": {"structure": structure},
    }


def test_prescreen_rejects_what_a_trial_at_the_cap_beats(tmp_path, tiny_doc):
    space = _space(tmp_path, tiny_doc)
    plan = {"size_bytes": 500, "latency_ms": 0.5, "structure": "b"}
    better = _done(90.0, 400, 0.4)
    reason = prescreen_reason(space, plan, BASE, [(7, better)])
    assert reason is not None and reason.startswith("trial 7 reached the baseline's accuracy")


def test_prescreen_keeps_what_accuracy_could_still_win(tmp_path, tiny_doc):
    space = _space(tmp_path, tiny_doc)
    plan = {"size_bytes": 500, "latency_ms": 0.5, "structure": "b"}
    # below the baseline's accuracy: this plan might fine-tune to a better one
    assert prescreen_reason(space, plan, BASE, [(1, _done(89.9, 400, 0.4))]) is None
    # smaller but slower: not dominated
    assert prescreen_reason(space, plan, BASE, [(1, _done(90.0, 400, 0.6))]) is None


def test_prescreen_keeps_clear_of_latency_noise(tmp_path, tiny_doc):
    space = _space(tmp_path, tiny_doc)
    plan = {"size_bytes": 500, "latency_ms": 0.5, "structure": "b"}
    close = 0.5 * (1 - LATENCY_MARGIN / 2)  # faster, but within another structure's noise
    assert prescreen_reason(space, plan, BASE, [(1, _done(90.0, 400, close))]) is None
    # the same deployed structure shares one pooled figure: no margin there
    same = prescreen_reason(space, plan, BASE, [(1, _done(90.0, 400, 0.5, structure="b"))])
    assert same is not None


def test_prescreen_rejects_a_broken_constraint(tmp_path, tiny_doc):
    tiny_doc["constraints"]["max_size_bytes"] = 450
    space = _space(tmp_path, tiny_doc)
    plan = {"size_bytes": 500, "latency_ms": 0.5, "structure": "b"}
    reason = prescreen_reason(space, plan, BASE, [])
    assert reason == "its size_bytes 500 is over constraints.max_size_bytes: 450"


# --------------------------------------------------------------------------- a study


@pytest.fixture(scope="module")
def halving_study(tmp_path_factory) -> tuple[Any, Path]:
    import copy

    from .conftest import TINY

    doc = copy.deepcopy(TINY)
    doc["search"] = {"trials": 14, "seed": 0, "fidelity": "halving", "anchors": 0}
    doc["space"]["finetune"] = {"epochs": 3}
    root = tmp_path_factory.mktemp("halving")
    space = load_space(write_space(root / "s.yaml", doc))
    return search(space, results_root=root / "results"), root


def test_a_halving_study_stops_trials_and_records_why(halving_study):
    results, _ = halving_study
    frame = results.trials
    assert len(frame) == 14  # stopped and rejected trials count towards the total
    early = frame[frame["state"] == "PRUNED"]
    assert len(early) >= 3, frame[["number", "state", "stop_reason"]]
    assert set(early["stopped"]) <= {"rejected", "stopped"}
    assert early["stop_reason"].str.len().min() > 20
    # an early trial shows the size and latency it measured, but never enters the front
    assert early["size_bytes"].notna().all() and early["latency_ms"].notna().all()
    assert not early["feasible"].any()
    assert set(results.pareto["number"]).isdisjoint(early["number"])
    stopped = early[early["stopped"] == "stopped"]
    assert stopped["stop_rung"].isin([1, 2]).all()
    assert stopped["partial_accuracy"].between(0, 100).all()
    assert frame["compute_s"].notna().all()


def test_an_early_trial_leaves_no_files(halving_study):
    results, _ = halving_study
    early = results.trials.loc[results.trials["state"] == "PRUNED", "number"]
    trials_dir = results.directory / "trials"
    leftovers = {p.name for p in trials_dir.iterdir()} if trials_dir.is_dir() else set()
    assert not leftovers & ({str(n) for n in early} | {f"{n}.partial" for n in early})


def test_a_trained_trial_reuses_its_untrained_timing(halving_study):
    """The fine-tuned model deploys to the graph timed before fine-tuning: the record
    says so and holds the same structure; its size matches the prescreen's."""
    results, _ = halving_study
    storage = open_storage(None, results.directory)
    study = optuna.load_study(study_name=results.name, storage=storage)
    trained = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and PRESCREEN_ATTR in t.user_attrs
    ]
    assert trained
    for t in trained:
        figures, latency = t.user_attrs[PRESCREEN_ATTR], t.user_attrs["latency"]
        assert latency["structure"] == figures["structure"]
        assert latency["before_training"] is True
        assert (
            abs(t.user_attrs["size_bytes"] - figures["size_bytes"]) <= 0.01 * figures["size_bytes"]
        )
        assert set(t.user_attrs[RUNGS_ATTR]) == {"0", "1"}  # it passed both rungs
        assert t.user_attrs[COMPUTE_ATTR] > 0
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "PRUNED":
            assert t.user_attrs[STOP_ATTR]["kind"] in ("rejected", "stopped")


def test_trials_csv_holds_the_early_trials(halving_study):
    import pandas as pd

    results, _ = halving_study
    table = pd.read_csv(results.directory / "trials.csv")
    assert {"stopped", "stop_rung", "partial_accuracy", "stop_reason", "compute_s"} <= set(
        table.columns
    )
    assert (table["state"] == "PRUNED").sum() == (results.trials["state"] == "PRUNED").sum()


def test_resuming_a_halving_study_counts_its_early_trials(halving_study):
    results, root = halving_study
    space = load_space(root / "s.yaml")
    more = search(space.with_trials(16), results_root=root / "results")
    assert len(more.trials) == 16
    assert len(load_results(more.directory).trials) == 16


# --------------------------------------------------------------------------- shown to people


def test_show_report_and_explorer_name_the_early_trials(halving_study):
    import sys

    from rich.console import Console
    from streamlit.testing.v1 import AppTest

    from paretoopt.results.frames import early_text
    from paretoopt.results.report import front_table
    from paretoopt.results.share import report_html

    # read the study again: the resume test before this one may have added trials
    results = load_results(halving_study[0].directory)
    early = early_text(results.trials)
    counts = results.trials["stopped"].value_counts()
    assert early.startswith(f"{counts['stopped']} stopped at a rung")
    console = Console(width=200, record=True)
    console.print(front_table(results, 200))
    assert early in console.export_text()
    page = report_html(results)
    assert f"Ended early: {early}" in page and "partial (not final)" in page

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"))
    sys.argv = ["app.py", "--results", str(results.directory.parent)]
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    assert early in "\n".join(c.value for c in at.caption)
    shown = next(d.value for d in at.dataframe if "partial (not final)" in d.value.columns)
    assert len(shown) == counts.sum() - counts.get("", 0)
    assert set(shown["ended"]) <= {"stopped", "rejected"}


def test_a_study_may_change_its_fidelity_on_resume(tmp_path, tiny_doc):
    from paretoopt.study.session import check_resumable

    first = _space(tmp_path, tiny_doc, fidelity="full")
    search(first, results_root=tmp_path / "r")
    check_resumable(_space(tmp_path, tiny_doc, fidelity="halving"), tmp_path / "r" / "tiny")
    from paretoopt.errors import StudyError

    with pytest.raises(StudyError, match="different space"):
        check_resumable(_space(tmp_path, tiny_doc, seed=5), tmp_path / "r" / "tiny")
