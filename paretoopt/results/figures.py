"""The study's figures, drawn once for the explorer and the shared HTML report alike: the
front, one trial's layers, the hypervolume history. Plotly only, no torch."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from paretoopt.results import explore
from paretoopt.results.frames import StudyResults

COLORS = {
    "front": "#1f77b4",
    "dominated": "#b8c2cc",
    "infeasible": "#f2b8b5",
    "failed": "#d62728",
    "running": "#ff7f0e",
}


def front_figure(
    results: StudyResults,
    x: explore.Axis,
    y: explore.Axis,
    knee: int | None,
    budget: explore.Budget | None = None,
) -> go.Figure:
    """Every completed trial by kind, the front drawn last (on top), trials outside the
    budget crossed out, the knee starred."""
    frame = results.trials[results.trials["state"] == "COMPLETE"].copy()
    frame["kind"] = explore.categories(results)
    fig = px.scatter(
        frame,
        x=x.column,
        y=y.column,
        color="kind",
        color_discrete_map=COLORS,
        custom_data=["number"],
        hover_data={"number": True, "plan": True},
        log_x=x.log,
        log_y=y.log,
        labels={x.column: x.label, y.column: y.label},
        category_orders={"kind": list(COLORS)},
    )
    fig.update_traces(marker={"size": 9, "line": {"width": 0}})
    # drawn last, so no dominated or infeasible marker hides a front point
    fig.data = tuple(sorted(fig.data, key=lambda trace: trace.name == "front"))
    for ax, update in ((x, fig.update_xaxes), (y, fig.update_yaxes)):
        if ax.log and len(frame):
            update(**log_ticks(frame[ax.column]))
    if budget is not None:
        outside = frame[~budget.mask(frame, results.baseline)]
        fig.add_trace(
            go.Scatter(
                x=outside[x.column],
                y=outside[y.column],
                mode="markers",
                marker={"symbol": "x-thin", "size": 11, "line": {"width": 1, "color": "#888"}},
                name="over budget",
                hoverinfo="skip",
            )
        )
    if knee is not None:
        point = frame[frame["number"] == knee]
        fig.add_trace(
            go.Scatter(
                x=point[x.column],
                y=point[y.column],
                mode="markers",
                marker={"symbol": "star", "size": 18, "color": "#ffbf00"},
                name=f"knee (trial {knee})",
                customdata=[[knee]],
            )
        )
    fig.update_layout(height=520, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    _focus_on_front(fig, results, x, y)
    return fig


def log_ticks(values: pd.Series) -> dict[str, Any]:
    """Ticks of a log axis at 1, 2 and 5 of every decade the values span, each labelled
    with its whole value ("20", "0.05"), not plotly's bare "2" and "5" between decades."""
    positive = values[values > 0]
    if positive.empty:
        return {}
    low, high = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
    ticks = [m * 10.0**e for e in range(low, high + 1) for m in (1, 2, 5)]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def _focus_on_front(
    fig: go.Figure, results: StudyResults, x: explore.Axis, y: explore.Axis
) -> None:
    """An accuracy axis spans the front (plus a margin), not the far-off failures: trials
    that lost tens of points would otherwise squeeze the front into one line."""
    front = results.pareto
    for ax, update in ((x, fig.update_xaxes), (y, fig.update_yaxes)):
        if ax.column in ("accuracy", "accuracy_change") and len(front):
            low, high = float(front[ax.column].min()), float(front[ax.column].max())
            # a point of percent below and half above; a user metric, its own scale
            unit = 1.0 if results.shown_metrics[0].display_unit else max(abs(high), 1e-9) / 20
            update(range=[low - max(unit, 0.2 * (high - low)), high + unit / 2])


def layers_figure(layers: pd.DataFrame) -> go.Figure:
    """One trial's layers (explore.layer_table): sparsity as bars, bit-width as colour,
    a factor's rank (kept/full) and a clustered layer's shared values written on its bar."""
    labels = [
        _layer_label(rank, clusters)
        for rank, clusters in zip(layers.get("rank", []), layers.get("clusters", []), strict=True)
    ]
    labelled = any(labels)
    chart = px.bar(
        layers.assign(label=labels),
        x="layer",
        y="sparsity",
        color="bits",
        text="label" if labelled else None,
        hover_data=["channels kept", "rank", "clusters", "kernel"],
        range_y=[0, 1],
        title="Per layer: sparsity (bar), bit-width (colour)"
        + (", rank of a factor (r) and shared values (k) on the bar" if labelled else ""),
    )
    # layer names of an nn.Sequential ("0.0", "6") are names, not numbers: one bar each
    chart.update_xaxes(type="category", categoryorder="array", categoryarray=list(layers.layer))
    chart.update_layout(height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return chart


def _layer_label(rank: str, clusters: int | str) -> str:
    """The bar's label: "r 4/8" for a factor of rank 4 of 8, "k 16" for 16 shared values,
    both, or nothing."""
    return " ".join(
        part for part in (f"r {rank}" if rank else "", f"k {clusters}" if clusters else "") if part
    )


def hypervolume_figure(history: pd.DataFrame) -> go.Figure:
    """explore.hypervolume_history as a line, in baseline units."""
    fig = px.line(
        history,
        x="number",
        y="hypervolume",
        markers=True,
        labels={"number": "trial", "hypervolume": "hypervolume (baseline units)"},
    )
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig
