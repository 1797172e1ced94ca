"""`paretoopt report`: one self-contained HTML file of a study, to attach to a pull request
or a CI run: the front, the hypervolume history, the front table with its confirmed
latencies, the knee's layers, the baseline, the target and the hardware. Plotly's
script is inlined once, so the file opens with no server and no network."""

from __future__ import annotations

import html
import os
from pathlib import Path

from paretoopt.config.metrics import quality_name
from paretoopt.results import explore, figures
from paretoopt.results.frames import StudyResults, early_text, hardware_text, trial_record
from paretoopt.results.report import front_columns


def report_html(results: StudyResults) -> str:
    """The whole report, as one HTML document."""
    pool = explore.candidates(results, explore.Budget())
    knee = explore.suggested(pool, results.metrics)
    x = explore.axis("size", True, results.quality)
    y = explore.axis("accuracy", True, results.quality)
    parts = [_heading(results, knee)]
    charts = [figures.front_figure(results, x, y, knee)]
    history = explore.hypervolume_history(results, [m.name for m in results.shown_metrics])
    if not history.empty:
        charts.append(figures.hypervolume_figure(history))
    # plotly.js inlined with the first chart only: one copy in the file
    parts += [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        for i, fig in enumerate(charts)
    ]
    parts.append(_front_table(results, knee))
    if knee is not None:
        layers = explore.layer_table(trial_record(results, knee).to_attrs())
        if len(layers):
            parts.append(f"<h2>The knee's layers (trial {knee})</h2>")
            parts.append(
                figures.layers_figure(layers).to_html(full_html=False, include_plotlyjs=False)
            )
            parts.append(layers.to_html(index=False, border=0, classes="table"))
    early = explore.early_trials(results)
    if len(early):  # cost-aware search: never final figures, so apart from the front
        parts.append(f"<h2>Ended early: {html.escape(early_text(results.trials))}</h2>")
        parts.append(early.to_html(index=False, border=0, classes="table", na_rep=""))
    parts.append(_setting(results))
    body = "\n".join(parts)
    title = html.escape(f"paretoopt: {results.name}")
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:0.9em;margin:1em 0}"
    "td,th{padding:0.25em 0.6em;border-bottom:1px solid #ddd;text-align:right}"
    "td:last-child,th:last-child{text-align:left}.knee{background:#fff4cc}"
)


def _heading(results: StudyResults, knee: int | None) -> str:
    base = results.baseline
    metrics = results.shown_metrics
    figures_ = ", ".join(
        f"{quality_name(results.quality) if m.maximize else m.name} {m.text(base[m.field])}"
        for m in metrics
        if base.get(m.field) is not None
    )
    done = int((results.trials["state"] == "COMPLETE").sum()) if len(results.trials) else 0
    return (
        f"<h1>Study {html.escape(results.name)}</h1>"
        f"<p>{len(results.trials)} trials ({done} completed), {len(results.pareto)} on the "
        f"Pareto front" + (f"; the knee is trial {knee}" if knee is not None else "") + ".</p>"
        f"<p>Baseline: {html.escape(figures_)}.</p>"
    )


def _front_table(results: StudyResults, knee: int | None) -> str:
    """The front as the terminal shows it in full (report.front_columns: confirmed
    latency beside the search's), with the plan, the knee's row marked."""
    if results.pareto.empty:
        return "<p>No feasible trial on the front yet.</p>"
    columns, _ = front_columns(results)
    plans = [str(p) for p in results.pareto["plan"]]
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns) + "<th>plan</th>"
    rows = []
    for i, plan in enumerate(plans):
        cells = [c.cells[i] for c in columns] + [plan]
        mark = " class='knee'" if knee is not None and columns[0].cells[i] == str(knee) else ""
        rows.append(f"<tr{mark}>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
    return f"<h2>The front</h2><table><tr>{head}</tr>{''.join(rows)}</table>"


def _setting(results: StudyResults) -> str:
    meta = results.metadata
    sessions = meta.get("sessions") or [{}]
    calibration = sessions[-1].get("calibration") or {}
    if results.shown_runtime != results.runtime:  # a compared runtime's view: its own
        calibration = (calibration.get("compared") or {}).get(results.shown_runtime) or {}
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    shown = f" in {results.shown_runtime}" if results.compared else ""
    lines = [
        f"Measured{shown} on {hardware_text(meta.get('hardware') or {})}; timing mode "
        f"{calibration.get('mode', 'cpu')}, baseline reference "
        f"{calibration.get('reference_ms', float('nan')):.4f} ms.",
        f"Versions: {versions}." if versions else "",
        f"Quality metric: {quality_name(results.quality)}.",
    ]
    return "<h2>Where it was measured</h2>" + "".join(
        f"<p>{html.escape(line)}</p>" for line in lines if line
    )


def write_report(results: StudyResults, out: str | Path) -> Path:
    """The report at `out`, written whole or not at all."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report_html(results), encoding="utf-8")
    os.replace(tmp, path)
    return path
