"""The metric descriptors: every consumer reads them, and a new objective is one of them.

Contract tests run over every registered metric; the end-to-end test makes MACs an
objective with a constraint, through the CLI, and checks each consumer on the result.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
from rich.console import Console

from paretoopt.cli import main
from paretoopt.config.metrics import DEFAULT_OBJECTIVES, METRICS, ratios, shown
from paretoopt.config.space import ConstraintsSpec, parse_space
from paretoopt.results import explore
from paretoopt.results.frames import METRIC_COLUMNS, load_results, pareto_mask
from paretoopt.results.pick import knee, pick
from paretoopt.results.report import front_table

from .conftest import write_space


@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_every_metric_reaches_every_consumer(metric, tiny_doc):
    # the space file accepts it as an objective, with its direction, and its limit
    doc = {**tiny_doc, "objectives": {"accuracy": "maximize", metric.name: metric.direction}}
    if metric.name == "accuracy":
        doc["objectives"] = {"accuracy": "maximize", "size": "minimize"}
    doc["constraints"] = {metric.limit.key: 5}
    space = parse_space(doc)
    assert metric.name in space.metrics
    assert getattr(space.constraints, metric.limit.key) == 5
    assert metric.limit.key in {f.name for f in dataclasses.fields(ConstraintsSpec)}
    # the frames, the pick grammar and the explorer's axes know it
    assert METRIC_COLUMNS[metric.name] == metric.field
    assert explore.axis(metric.name, False).column == metric.field
    assert explore.axis(metric.name, True).column == metric.ratio_column
    front = pd.DataFrame(
        {"number": [1, 2], **{m.field: [2.0, 4.0] for m in METRICS.values()}, "plan": ["", ""]}
    )
    best = 2 if metric.maximize else 1
    assert pick(front, f"{'max' if metric.maximize else 'min'} {metric.name}") == best
    assert metric.units[""] == 1.0


def test_ratios_read_each_metric_against_the_baseline():
    base = {"accuracy": 98.0, "size_bytes": 1000, "latency_ms": 0.2, "macs": 4_000_000}
    ours = {"accuracy": 97.5, "size_bytes": 250, "latency_ms": 0.1, "macs": 1_000_000}
    assert ratios(ours, base) == {
        "accuracy_change": -0.5,
        "size_ratio": 4.0,
        "speedup": 2.0,
        "macs_ratio": 4.0,
    }
    assert ratios({"accuracy": 97.5}, base) == {"accuracy_change": -0.5}  # only what exists


def test_constraint_violations_follow_optuna_5_sign():
    acc, size = METRICS["accuracy"], METRICS["size"]
    assert acc.violation(97.5, 98.0, 1.0) == pytest.approx(-0.5)  # 0.5 drop, 1 allowed
    assert acc.violation(96.0, 98.0, 1.0) == pytest.approx(1.0)
    assert size.violation(1200, None, 1000) == 200
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        acc.violation(97.0, None, 1.0)


def test_the_default_objectives_are_shown_before_any_other():
    assert DEFAULT_OBJECTIVES == ("accuracy", "size", "latency")
    assert [m.name for m in shown(("accuracy", "macs"))] == ["accuracy", "size", "latency", "macs"]
    assert [m.name for m in shown(())] == list(DEFAULT_OBJECTIVES)


def test_the_knee_reads_the_objectives_it_is_given():
    # trial 1 is best on MACs, trial 2 on latency: the knee follows the objectives named
    front = pd.DataFrame(
        {
            "number": [1, 2],
            "accuracy": [98.0, 98.0],
            "size_bytes": [1000, 1000],
            "latency_ms": [0.3, 0.1],
            "macs": [1e5, 1e7],
        }
    )
    assert knee(front, ["accuracy", "latency"]) == 2
    assert knee(front, ["accuracy", "macs"]) == 1


def test_a_budget_reads_every_metric_it_names():
    frame = pd.DataFrame({"accuracy": [99.0, 99.0], "macs": [1_000_000, 3_000_000]})
    budget = explore.Budget({"accuracy": 1.0, "macs": 2_000_000})
    assert list(budget.mask(frame, {"accuracy": 99.5})) == [True, False]


def test_macs_as_an_objective_with_a_constraint_through_the_cli(tmp_path, tiny_doc):
    """MACs become an objective by naming them: Optuna optimises them, the constraint
    applies, the front, the pick rules, the explorer and the tables read them."""
    doc = {**tiny_doc, "objectives": ["accuracy", "macs"]}
    doc["search"] = {"trials": 4, "seed": 0, "anchors": 1}
    doc["space"] = {
        "pruning": {"structure": "channel", "sparsity": {"low": 0.2, "high": 0.6}},
        "quantization": {"bits": 32},
        "finetune": {"epochs": 0},
    }
    # a limit just under the baseline's MACs: the uncompressed baseline is infeasible
    doc["constraints"] = {"max_accuracy_drop": 100.0, "max_macs": 1}
    probe = write_space(tmp_path / "probe.yaml", {**doc, "search": {"trials": 1, "seed": 0}})
    assert main(["search", "--space", str(probe), "--results", str(tmp_path / "p")]) == 0
    base_macs = load_results(tmp_path / "p" / "tiny").baseline["macs"]
    doc["constraints"]["max_macs"] = base_macs - 1
    space = write_space(tmp_path / "macs.yaml", doc)
    assert main(["search", "--space", str(space), "--results", str(tmp_path / "r")]) == 0

    results = load_results(tmp_path / "r" / "tiny")
    assert results.metrics == ("accuracy", "macs")
    done = results.trials[results.trials["state"] == "COMPLETE"]
    assert list(done["feasible"]) == [m <= base_macs - 1 for m in done["macs"]]
    assert not done.loc[done["number"] == 0, "feasible"].item()  # the baseline breaks it
    feasible = done[done["feasible"]]
    assert len(feasible) >= 1
    expected = feasible[
        pareto_mask(feasible[["accuracy", "macs"]].to_numpy(), ["maximize", "minimize"])
    ]
    assert set(results.pareto["number"]) == set(expected["number"])
    for _, row in results.pareto.iterrows():
        assert row["macs_ratio"] == pytest.approx(base_macs / row["macs"])
    smallest = int(results.pareto.sort_values("macs").iloc[0]["number"])
    assert pick(results.pareto, "min macs where accuracy_drop <= 100", 99.0) == smallest
    assert pick(results.pareto, f"max accuracy where macs <= {base_macs / 1e3}k") in set(
        results.pareto["number"]
    )
    stored = json.loads((tmp_path / "r" / "tiny" / "run.json").read_text())
    assert stored["baseline"]["macs"] == base_macs

    assert main(["show", "--study", "tiny", "--results", str(tmp_path / "r")]) == 0
    console = Console(width=220, record=True)
    console.print(front_table(results))
    table = console.export_text()
    assert "macs M" in table and "x fewer MACs" in table
    row = results.pareto.iloc[0]
    assert f"{row['macs'] / 1e6:.2f}" in table and f"{row['macs_ratio']:.2f}" in table
