"""What the terminal shows: the front at any width, a search's output in a pipe, and the
per-layer records in layers.csv."""

from __future__ import annotations

import copy
import io
import re

import pandas as pd
import pytest
from rich.console import Console

from paretoopt.cli import main
from paretoopt.compress.techniques.bench import prunable_layers
from paretoopt.config.space import parse_space
from paretoopt.results.frames import load_results
from paretoopt.results.record import LAYER_COLUMNS
from paretoopt.results.report import SUMMARY_EVERY, RichReporter, front_table
from paretoopt.workload.models import tiny_conv

from .conftest import TINY, write_space


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    doc = copy.deepcopy(TINY)
    doc["search"] = {"trials": 6, "seed": 0}
    doc["space"]["pruning"]["structure"] = "channel"
    space = write_space(root / "tiny.yaml", doc)
    assert main(["search", "--space", str(space), "--results", str(root / "r")]) == 0
    return load_results(root / "r" / "tiny")


def _lines(results, width: int | None) -> list[str]:
    console = Console(file=io.StringIO(), width=width or 1000, record=True)
    console.print(front_table(results, width))
    return console.export_text().splitlines()


def _front_row(results, line: str, number: int) -> bool:
    return bool(re.match(rf"^│\s+{number} │", line))


@pytest.mark.parametrize("width", [80, 100, 120, 160])
def test_every_front_row_shows_trial_accuracy_size_and_latency_at_any_width(study, width):
    lines = _lines(study, width)
    assert all(len(line) <= width for line in lines)
    for _, r in study.pareto.iterrows():
        row = [line for line in lines if _front_row(study, line, int(r["number"]))]
        assert len(row) == 1, (r["number"], lines)  # one line, the trial number whole
        cells = [c.strip() for c in row[0].strip("│").split("│")]
        assert f"{r['accuracy']:.2f}" in cells
        assert any(c.endswith("kB") and "…" not in c for c in cells)
        assert f"{r['latency_ms']:.4f}" in cells
        numbers = [c for c in cells if re.fullmatch(r"[-+]?[0-9.]+( kB)?\*?", c)]
        assert len(numbers) >= 4  # no number was squeezed to an ellipsis


def test_a_narrow_terminal_drops_the_plan_before_any_number_and_a_wide_one_keeps_it(study):
    narrow, wide = "\n".join(_lines(study, 80)), "\n".join(_lines(study, 200))
    assert "plan" not in narrow and "test acc" not in narrow
    assert "plan" in wide and "test acc %" in wide and "x smaller" in wide


def test_show_to_a_pipe_prints_every_column_unwrapped(study, capsys):
    assert main(["show", "--study", "tiny", "--results", str(study.directory.parent)]) == 0
    out = capsys.readouterr().out.splitlines()
    for _, r in study.pareto.iterrows():
        row = [line for line in out if _front_row(study, line, int(r["number"]))]
        assert len(row) == 1 and r["plan"] in row[0]  # the whole plan, on the row's line


def test_a_search_in_a_pipe_prints_a_progress_line_every_ten_trials():
    buffer = io.StringIO()
    reporter = RichReporter(Console(file=buffer, width=100_000))
    doc = copy.deepcopy(TINY)
    doc["search"] = {"trials": 25}
    reporter.start(parse_space(doc), 0)
    for done in range(1, 26):
        reporter.advance(done)
    reporter.stop()
    lines = [line for line in buffer.getvalue().splitlines() if line.startswith("progress:")]
    assert [line.split(",")[0] for line in lines] == [
        f"progress: {n} of 25 trials" for n in range(SUMMARY_EVERY, 25, SUMMARY_EVERY)
    ]
    assert all(" elapsed, eta " in line for line in lines)


def test_layers_csv_holds_every_completed_trials_layers(study):
    layers = pd.read_csv(study.directory / "layers.csv")
    assert list(layers.columns) == ["trial", *LAYER_COLUMNS]
    done = study.trials[study.trials["state"] == "COMPLETE"]
    assert sorted(layers["trial"].unique()) == sorted(done["number"])
    per_trial = layers.groupby("trial").size()
    layers_of_the_model = len(prunable_layers(tiny_conv(image_size=8)))  # 6
    assert per_trial.nunique() == 1 and per_trial.iloc[0] == layers_of_the_model
    pruned = layers[(layers["trial"] > 0) & layers["channels_kept"].notna()]
    assert (pruned["channels_kept"] <= pruned["channels"]).all() and len(pruned)
    assert set(layers["kernel"].dropna()) <= {"int8", "float32"}


def test_export_help_shows_the_tolerance_default(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert re.search(r"default\s+0\.5", capsys.readouterr().out)


def test_the_report_lists_the_front_with_the_knee_marked(study):
    from paretoopt.results import explore
    from paretoopt.results.share import report_html

    page = report_html(study)
    knee = explore.suggested(explore.candidates(study, explore.Budget()), study.metrics)
    assert page.count("<tr class='knee'>") == 1 and f"<tr class='knee'><td>{knee}</td>" in page
    for _, r in study.pareto.iterrows():
        assert f"<td>{int(r['number'])}</td>" in page and f"<td>{r['plan']}</td>" in page
