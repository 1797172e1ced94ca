"""The Pareto-front explorer: which model do I ship?

    paretoopt app                   # or: streamlit run app.py -- --results results

Reads studies under a results folder read-only (no lock, so a running search is not
disturbed) and draws everything from ``paretoopt.results.explore``. torch is imported only when a
candidate is exported.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px
import streamlit as st

from paretoopt.config.metrics import Metric, quality_name, quality_short, shown
from paretoopt.errors import ParetoError
from paretoopt.results import explore, figures, share
from paretoopt.results.frames import (
    StudyResults,
    early_text,
    for_target,
    hardware_text,
    trial_record,
)
from paretoopt.results.record import quiet_reading

COLORS = figures.COLORS


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--results", default="results")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--space", default=None)  # trusted factories, for the download
    args, _ = parser.parse_known_args(sys.argv[1:])  # under tests, argv is pytest's
    return args


@st.cache_data(ttl=5, show_spinner=False)
def load(root: str, name: str, storage: str | None, stamp: int) -> StudyResults:
    """Cached for a few seconds; `stamp` (the refresh count) forces a fresh read."""
    return explore.open_study(Path(root), name, storage)


@st.cache_data(ttl=60, show_spinner=False)
def record(_results: StudyResults, name: str, number: int, stamp: int) -> dict[str, Any]:
    return trial_record(_results, number)


def main() -> None:
    st.set_page_config(page_title="paretoopt explorer", layout="wide")
    args = arguments()
    root = Path(args.results)
    st.title("paretoopt: which model do I ship?")
    names = explore.studies(root)
    if not root.is_dir():
        st.info(f"No results folder at `{root}`. Run `paretoopt search --space <file>` first.")
        return
    if not names:
        st.info(f"No studies in `{root}` yet. Run `paretoopt search --space <file>` first.")
        return
    stamp = st.session_state.setdefault("refresh", 0)
    with st.sidebar:
        name = st.selectbox("Study", names, key="study")
        if st.button("Refresh", help="read the study again (a running search adds trials)"):
            st.session_state["refresh"] = stamp = stamp + 1
    try:
        results = load(str(root), name, args.storage, stamp)
    except ParetoError as exc:
        st.warning(str(exc))
        return
    if len(results.runtimes) > 1:  # target.compare: one front per runtime
        with st.sidebar:
            runtime = st.selectbox(
                "Runtime",
                results.runtimes,
                key=f"runtime:{name}",
                help="every trial was measured in each: its figures, ratios and front there",
            )
        try:
            results = for_target(results, runtime)
        except ParetoError as exc:
            st.warning(str(exc))
            return
    show_study(results, stamp)


LIVE_S = 5.0  # seconds between looks at a running study's journal


def follow_live(results: StudyResults) -> None:
    """While a search runs on the study, look at its journal (or database) every LIVE_S
    seconds and read the study again when it changed: new trials appear without a
    refresh."""
    if not explore.is_live(results):
        return
    st.caption(f"Following the running search: the page reads new trials every {LIVE_S:g} s.")
    seen = explore.storage_state(results)

    @st.fragment(run_every=LIVE_S)
    def poll() -> None:
        if explore.storage_state(results) != seen:
            st.session_state["refresh"] = st.session_state.get("refresh", 0) + 1
            st.rerun(scope="app")

    poll()


def show_study(results: StudyResults, stamp: int) -> None:
    frame, base = results.trials, results.baseline
    header(results)
    follow_live(results)
    if frame.empty:
        st.info("This study has no trials yet. Its search may just have started: refresh.")
        return
    completed = frame[frame["state"] == "COMPLETE"]
    if completed.empty:
        st.warning("No trial of this study has completed.")
        failed = frame[frame["state"] == "FAIL"][["number", "fail_reason"]]
        if len(failed):
            st.dataframe(failed, hide_index=True)
        return
    if not base:
        st.warning("The baseline has not been measured yet, so nothing can be compared.")
        return
    budget = budget_controls(results)
    pool = explore.candidates(results, budget)
    knee = explore.suggested(pool, results.metrics)
    left, right = st.columns([2, 1])  # the front first: the page's first read
    with left:
        front_plot(results, budget, knee)  # a new click here selects (see _select)
    with right:
        candidate_table(results, pool, knee)
    chosen = _chosen(results, knee)
    tabs = st.tabs(["Candidate", "Compare", "3-D", "Convergence", "Parameters", "Ended early"])
    with tabs[0]:
        if chosen is None:
            st.info(
                "No candidate within the budget: widen it in the sidebar."
                if len(results.pareto)
                else "No feasible trial yet: the front is empty."
            )
        else:
            try:
                candidate_card(results, chosen, stamp)
            except ParetoError as exc:
                st.warning(str(exc))
    with tabs[1]:
        compare(results, pool, chosen)
    with tabs[2]:
        view_3d(results)
    with tabs[3]:
        convergence(results, list(results.metrics))
    with tabs[4]:
        parameters(results)
    with tabs[5]:
        ended_early(results)


def _selections() -> dict[str, int]:
    """The selected trial of each study (kept apart: trial 7 of one is not of another)."""
    return st.session_state.setdefault("selected", {})


def _select(results: StudyResults, number: int) -> None:
    _selections()[results.name] = int(number)


def _fresh(key: str, value: Any) -> bool:
    """Whether a widget's event is new. Streamlit keeps the last click in widget state, so
    without this an old click would keep overriding later choices made elsewhere."""
    seen = st.session_state.setdefault("seen_events", {})
    if seen.get(key) == value:
        return False
    seen[key] = value
    return True


def _chosen(results: StudyResults, knee: int | None) -> int | None:
    """The selection if it is a completed trial of this study, else the knee."""
    number = _selections().get(results.name)
    done = set(results.trials.loc[results.trials["state"] == "COMPLETE", "number"])
    return number if number is not None and number in done else knee


def header(results: StudyResults) -> None:
    base, meta = results.baseline, results.metadata
    target = (meta.get("sessions") or [{}])[-1].get("calibration") or {}
    hardware = meta.get("hardware") or {}
    st.subheader(f"Study {results.name}")
    running = int((results.trials["state"] == "RUNNING").sum()) if len(results.trials) else 0
    early = early_text(results.trials)
    st.caption(
        f"{len(results.trials)} trials, {len(results.pareto)} on the front"
        + (f", {early}" if early else "")
        + (f", {running} running" if running else "")
        + f" · measured on {hardware_text(hardware)}, timing mode {target.get('mode', 'cpu')}"
        + (f" · figures in {results.shown_runtime}" if results.compared else "")
    )
    if base:
        metrics = results.shown_metrics
        for column, m in zip(st.columns(len(metrics)), metrics, strict=True):
            name = quality_name(results.quality) if m.maximize else m.name
            column.metric(f"Baseline {name}", m.text(base[m.field]))
        st.download_button(
            "Download the study report (.html, opens offline)",
            data=lambda: share.report_html(results).encode(),  # made when asked for
            file_name=f"{results.name}-report.html",
            mime="text/html",
            key="report",
        )


def budget_controls(results: StudyResults) -> explore.Budget:
    # bounds from the baseline alone (and keys that carry the study), so new trials of a
    # running study do not reset the user's budgets
    base, name = results.baseline, results.name
    if results.compared:  # each runtime's budgets: their scales differ
        name = f"{name}@{results.shown_runtime}"
    metrics = results.shown_metrics
    limits: dict[str, float] = {}
    with st.sidebar:
        st.markdown("**Budgets**")
        for m in metrics:
            limit = results.constraints.get(m.limit.key)
            limits[m.name] = _budget_slider(m, float(base[m.field]), name, limit)
        names = [m.name for m in metrics]
        st.radio("Axes", ["relative to the baseline", "absolute"], key="axes_mode")
        st.selectbox("x axis", names[1:] + names[:1], key="x_metric")
        st.selectbox("y axis", names, key="y_metric")
    return explore.Budget(limits)


def _budget_slider(m: Metric, base: float, study: str, constraint: float | None = None) -> float:
    """One budget, in the metric's display unit; returned in the record's unit. The
    accuracy drop runs to twice the study's own limit (`constraint`), which it starts at."""
    if m.limit.relative:  # points below the baseline: the useful range is a few
        top = min(base, max(1.0, 2 * (1.0 if constraint is None else constraint)))
        default = top if constraint is None else min(constraint, top)
        step = 0.1 if m.display_unit else round(top / 100, 6) or 0.001
        label = f"Max {m.name} drop" + (" (points)" if m.display_unit else "")
        return st.slider(label, 0.0, float(top), float(default), step, key=f"max_drop:{study}")
    top = m.budget_span * base / m.display_scale
    unit = f"_{m.display_unit.lower()}" if m.display_scale != 1 else ""
    value = st.slider(
        f"Max {m.name} ({m.display_unit})" if m.display_unit else f"Max {m.name}",
        0.0,
        top,
        top,
        format=f"%.{m.decimals}f",
        key=f"max_{m.name}{unit}:{study}",
    )
    return value * m.display_scale


def front_plot(results: StudyResults, budget: explore.Budget, knee: int | None) -> None:
    relative = st.session_state.get("axes_mode", "relative to the baseline") != "absolute"
    x = explore.axis(st.session_state.get("x_metric", "size"), relative, results.quality)
    y = explore.axis(st.session_state.get("y_metric", "accuracy"), relative, results.quality)
    fig = figures.front_figure(results, x, y, knee, budget)
    event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="front")
    picked = explore.selected_trials(event)
    if picked and _fresh("front", picked):
        _select(results, picked[0])


def _confirmed(frame: pd.DataFrame) -> bool:
    return "confirm_latency_ms" in frame and bool(frame["confirm_latency_ms"].notna().any())


def candidate_table(results: StudyResults, pool: pd.DataFrame, knee: int | None) -> None:
    st.markdown(
        f"**Candidates within the budget: {len(pool)}**"
        + (f" · suggested: trial {knee} (knee)" if knee is not None else "")
        + (" · latency as re-measured at the end of the search" if _confirmed(pool) else "")
    )
    if pool.empty:
        return
    metrics = results.shown_metrics
    ratio_columns = [m.ratio_column for m in metrics]
    q, short = metrics[0], quality_short(results.quality)
    unit = f" {q.display_unit}" if q.display_unit else ""
    change = "Δ pts" if unit else "Δ"
    names = {"number": "trial", "accuracy": f"{short}{unit}", "accuracy_change": change}
    names.update({m.ratio_column: m.ratio_label for m in metrics[1:]})
    table = pool[["number", "accuracy", *ratio_columns, "plan"]].rename(columns=names)
    event = st.dataframe(
        table.round(2),
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="candidates",
        height=260,
    )
    selection = event.get("selection", {}) if isinstance(event, dict) else event["selection"]
    rows = list(selection.get("rows", []))
    if rows and _fresh("candidates", rows) and rows[0] < len(pool):
        _select(results, int(pool.iloc[rows[0]]["number"]))
    options = [int(n) for n in pool["number"]]
    current = _chosen(results, knee)
    if current in options:  # the box shows the selection, whichever way it was made
        st.session_state["candidate_choice"] = current
    st.selectbox(
        "Candidate",
        options,
        key="candidate_choice",
        on_change=lambda: _select(results, st.session_state["candidate_choice"]),
    )


def candidate_card(results: StudyResults, number: int, stamp: int) -> None:
    own = results.shown_runtime == results.runtime  # not a compared runtime's view
    try:  # the figures of the runtime the page shows
        rec = record(results, results.name, number, stamp).in_runtime(results.shown_runtime)
    except (KeyError, ValueError) as exc:
        st.warning(f"Trial {number} could not be measured in {results.shown_runtime}: {exc}")
        return
    base = results.baseline
    latency = rec.get("latency", {})
    st.markdown(f"### Trial {number}: {rec.get('plan_summary', '')}")
    metrics = results.shown_metrics
    columns = st.columns(len(metrics) + 1)
    for column, m in zip(columns[:-1], metrics, strict=True):
        change = m.ratio(float(rec[m.field]), float(base[m.field]))
        pts = " pts" if m.display_unit else ""  # a user metric is in its own units
        delta = f"{change:+.{m.decimals}f}{pts}" if m.maximize else f"{change:.2f}{m.ratio_label}"
        quality = quality_name(results.quality)
        titles = {"accuracy": f"{quality[:1].upper()}{quality[1:]} (deployed)"}
        title = {**titles, "latency": "Latency (median)"}.get(m.name)
        column.metric(title or m.name.capitalize(), m.text(rec[m.field]), delta)
    q = metrics[0]
    pts = " pts" if q.display_unit else ""
    gap = f"{rec.get('deploy_gap', 0.0):+.{q.decimals}f}{pts}"
    columns[-1].metric("Deployed minus PyTorch", gap)
    confirmation = results.metadata.get("confirmations", {}).get(str(number)) if own else None
    st.caption(
        f"Latency above: the baseline's reference times the measured ratio (drift-corrected); "
        f"the raw runs' p90 {latency.get('p90_ms', float('nan')):.4f} ms, spread "
        f"{latency.get('spread', float('nan')):.3f} over {latency.get('runs', '?')} runs "
        f"({latency.get('mode', 'cpu')})"
        + quiet_reading(latency, ", ")
        + (
            f"; re-measured at the end of the search: {confirmation['latency_ms']:.4f} ms"
            + quiet_reading(confirmation, ", ")
            if confirmation
            else "; not re-measured (confirmation runs when a search ends)"
            if own
            else f"; timed once in {results.shown_runtime} (the end of a search re-times the "
            f"study's own runtime, {results.runtime})"
        )
        + f" · test {quality_name(results.quality)} {metrics[0].text(rec['test_accuracy'])}"
        + " · int8 kernels: "
        f"{'yes' if rec.get('int_kernels') else 'no'}"
    )
    layers = explore.layer_table(rec)
    if len(layers):
        chart = figures.layers_figure(layers)
        st.plotly_chart(chart, key="layers")
        st.dataframe(layers, hide_index=True)
    st.markdown("**Take it away**")
    row = results.trials[results.trials["number"] == number]
    if row.empty or not row["artifact"].iloc[0]:
        st.info(
            f"Trial {number}'s files were removed when its search ended: a search keeps only "
            "the front's and the baseline's. Pick a front trial to export."
        )
        return
    command = explore.export_command(results, number)
    st.code(command, language="bash")
    from paretoopt.export import untrusted_factories

    untrusted = untrusted_factories(results) if arguments().space is None else []
    if untrusted:  # a results folder is data: the code it names is not imported
        st.info(
            f"This study's model is built by {' and '.join(untrusted)}. Export it with "
            "`--space <your space file>` added to the command above, or start the explorer "
            "with `paretoopt app --space <your space file>` to download it here."
        )
        return
    st.download_button(
        "Download model files and card (.zip)",
        data=lambda: export_zip(results, number),
        file_name=f"{results.name}-trial{number}.zip",
        mime="application/zip",
        key="download",
    )


def export_zip(results: StudyResults, number: int) -> bytes:
    """The same files `paretoopt export` writes (it is the same function), zipped."""
    from paretoopt.export import export_trial  # imports torch: only when asked

    with tempfile.TemporaryDirectory() as tmp:
        export_trial(
            results.directory,
            tmp,
            trial=number,
            storage=results.storage,
            space=arguments().space,
            target=results.shown_runtime or None,  # the runtime the page shows
        )
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(tmp).iterdir()):
                archive.write(path, path.name)
    return buffer.getvalue()


def compare(results: StudyResults, pool: pd.DataFrame, chosen: int | None) -> None:
    options = [int(n) for n in results.pareto.get("number", [])]
    if not options:
        st.info("No front yet.")
        return
    default = [chosen] if chosen in options else options[:1]
    picked = st.multiselect(
        "Compare up to four candidates", options, default=default, max_selections=4, key="compare"
    )
    metrics = results.shown_metrics
    q, short = metrics[0], quality_short(results.quality)
    unit = f" ({q.display_unit})" if q.display_unit else ""
    names = {"number": "trial", "accuracy": f"val {short}{unit}", "plan": "plan"}
    names["test_accuracy"] = f"test {short}{unit}"
    for m in metrics[1:]:
        scaled = f" ({m.display_unit})" if m.display_unit else ""
        names[m.field], names[m.ratio_column] = f"{m.name}{scaled}", m.ratio_label
    table = results.pareto[results.pareto["number"].isin(picked)][list(names)].copy()
    for m in metrics[1:]:  # in the units the headings name, rounded as tables show them
        table[m.field] = (table[m.field] / m.display_scale).round(m.decimals)
        table[m.ratio_column] = table[m.ratio_column].round(m.ratio_decimals)
    for column in ("accuracy", "test_accuracy"):
        table[column] = table[column].round(q.decimals)
    st.dataframe(table.rename(columns=names), hide_index=True)


def view_3d(results: StudyResults) -> None:
    frame = results.trials[results.trials["state"] == "COMPLETE"].copy()
    frame["kind"] = explore.categories(results)
    fig = px.scatter_3d(
        frame,
        x="size_ratio",
        y="speedup",
        z="accuracy_change",
        color="kind",
        color_discrete_map=COLORS,
        hover_data=["number", "plan"],
        log_x=True,
        log_y=True,
        labels={
            "size_ratio": "x smaller",
            "speedup": "x faster",
            "accuracy_change": results.shown_metrics[0].ratio_label,
        },
    )
    # a cube seen from further out: every axis, its ticks and its title inside the frame
    axis = {"title": {"font": {"size": 12}}, "tickfont": {"size": 10}}
    fig.update_layout(
        height=620,
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
        scene={
            "aspectmode": "cube",
            "camera": {"eye": {"x": 1.9, "y": 1.9, "z": 1.3}},
            "xaxis": axis,
            "yaxis": axis,
            "zaxis": axis,
        },
        legend={"orientation": "h", "y": 1.05},
    )
    st.plotly_chart(fig, key="view3d")


def convergence(results: StudyResults, metrics: list[str]) -> None:
    history = explore.hypervolume_history(results, metrics or [m.name for m in shown(())])
    if history.empty:
        st.info("No feasible trial yet.")
        return
    fig = figures.hypervolume_figure(history)
    st.plotly_chart(fig, key="hypervolume")
    st.caption(
        "Hypervolume of the feasible trials so far, in baseline units (accuracy as points "
        "lost, size and latency as fractions of the baseline's). A flat tail means more "
        "trials are unlikely to find better trade-offs."
    )


def ended_early(results: StudyResults) -> None:
    table = explore.early_trials(results)
    if table.empty:
        st.info(
            "Every trial was fine-tuned in full (search.fidelity: full, or no plan ended early)."
        )
        return
    st.caption(
        f"{early_text(results.trials)}: search.fidelity measured these plans' size and "
        "latency before fine-tuning and stopped them there or at a successive-halving "
        "rung. Their accuracy is partial, never final, and none is on the front."
    )
    st.dataframe(table, hide_index=True)


def parameters(results: StudyResults) -> None:
    frame = explore.parameter_frame(results)
    params = [c for c in frame.columns if c.startswith("param.")]
    if not params:
        st.info("No searched parameters yet.")
        return
    fig = px.parallel_coordinates(
        frame,
        dimensions=[*params, *(m.field for m in results.shown_metrics)],
        color="accuracy",
        labels={p: p.removeprefix("param.") for p in params},
    )
    # tilted headers: side by side, names such as prune.unstructured.sparsity collided
    fig.update_traces(labelangle=-25, labelside="top", labelfont={"size": 11})
    fig.update_layout(height=480, margin={"l": 60, "r": 60, "t": 120, "b": 10})
    st.plotly_chart(fig, key="parcoords")
    st.markdown("**Which parameters move each objective** (|Spearman rank correlation|)")
    st.dataframe(explore.influence(results).round(2), hide_index=True)


if __name__ == "__main__":  # streamlit runs this file as a script: everything is defined above
    main()
