"""The explorer's data layer: what the app shows, computed from a study's results.

Pure pandas and numpy (no torch, no Streamlit), so the app starts fast and every figure
it draws can be tested on its own: axes absolute or relative to the baseline, the budget
filter, the knee of what remains, hypervolume over trials, parameter influence, and a
candidate's per-layer table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .pick import knee
from .results import SPACE_FILE, StudyResults, load_results


@dataclass(frozen=True)
class Axis:
    column: str
    label: str
    log: bool = False


AXES = {  # (absolute, relative to the baseline)
    "accuracy": (
        Axis("accuracy", "validation accuracy (%)"),
        Axis("accuracy_change", "accuracy change (points)"),
    ),
    "size": (Axis("size_bytes", "size (bytes)", log=True), Axis("size_ratio", "x smaller", True)),
    "latency": (
        Axis("latency_ms", "latency (ms)", log=True),
        Axis("speedup", "x faster", log=True),
    ),
}


def axis(metric: str, relative: bool) -> Axis:
    return AXES[metric][1 if relative else 0]


def studies(root: Path) -> list[str]:
    """Study folders under a results root, by name."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / SPACE_FILE).is_file())


def open_study(root: Path, name: str, storage: str | None = None) -> StudyResults:
    return load_results(root / name, storage)


@dataclass(frozen=True)
class Budget:
    max_drop: float | None = None  # points below the baseline's accuracy
    max_size: float | None = None  # bytes
    max_latency: float | None = None  # ms

    def mask(self, frame: pd.DataFrame, baseline_accuracy: float | None) -> pd.Series:
        # a hair of slack: slider values come back rounded (kB, 4 decimals)
        ok = pd.Series(True, index=frame.index)
        if self.max_drop is not None and baseline_accuracy is not None:
            ok &= frame["accuracy"] >= baseline_accuracy - self.max_drop - 1e-9
        if self.max_size is not None:
            ok &= frame["size_bytes"] <= self.max_size + 0.5
        if self.max_latency is not None:
            ok &= frame["latency_ms"] <= self.max_latency + 1e-9
        return ok


def categories(results: StudyResults) -> pd.Series:
    """Each trial's place in the picture: front, dominated, infeasible, failed, running."""
    frame = results.trials
    front = set(results.pareto.get("number", []))
    out = pd.Series("dominated", index=frame.index)
    out[~frame["feasible"]] = "infeasible"
    out[frame["number"].isin(front)] = "front"
    out[frame["state"] == "FAIL"] = "failed"
    out[frame["state"] == "RUNNING"] = "running"
    return out


def candidates(results: StudyResults, budget: Budget) -> pd.DataFrame:
    """The front within the budget, best accuracy first."""
    front = results.pareto
    if front.empty:
        return front
    inside = front[budget.mask(front, results.baseline.get("accuracy"))]
    return inside.sort_values(["accuracy", "size_bytes"], ascending=[False, True])


def suggested(frame: pd.DataFrame) -> int | None:
    """The knee of the candidates left, or None when none is left."""
    return knee(frame) if len(frame) else None


def selected_trials(event: Any) -> list[int]:
    """Trial numbers from a plotly or dataframe selection event (read dict-style, which is
    what Streamlit hands over, and what a test can inject)."""
    if not event:
        return []
    selection = event.get("selection", {}) if isinstance(event, dict) else event["selection"]
    points = selection.get("points", [])
    return [int(p["customdata"][0]) for p in points if p.get("customdata")]


# --------------------------------------------------------------------------- hypervolume


def hypervolume_history(
    results: StudyResults, metrics: list[str], accuracy_reference: float = 100.0
) -> pd.DataFrame:
    """Hypervolume of the feasible completed trials after each trial, in baseline units.

    Objectives are normalised to "smaller is better" against the baseline: accuracy as
    points lost (reference: `accuracy_reference` points lost, 100 by default), size and
    latency as fractions of the baseline's (reference: 1, the baseline itself). So the
    figure reads the same on any study, and a flat curve says more trials are unlikely
    to help.
    """
    frame, base = results.trials, results.baseline
    if frame.empty or not base:
        return pd.DataFrame(columns=["number", "hypervolume"])
    done = frame[(frame["state"] == "COMPLETE") & frame["feasible"]].sort_values("number")
    points = _normalised(done, metrics, base)
    reference = np.array([accuracy_reference if m == "accuracy" else 1.0 for m in metrics])
    rows, kept, volume = [], np.empty((0, len(metrics))), 0.0
    for number, point in zip(done["number"], points, strict=True):
        dominated = bool(len(kept)) and bool(np.any(np.all(kept <= point, axis=1)))
        if np.all(point < reference) and not dominated:  # only a new front point adds volume
            kept = np.vstack([kept[~np.all(point <= kept, axis=1)], point])
            volume = _hypervolume(kept, reference)
        rows.append({"number": int(number), "hypervolume": volume})
    return pd.DataFrame(rows)


def _normalised(frame: pd.DataFrame, metrics: list[str], base: dict[str, Any]) -> np.ndarray:
    columns = []
    for m in metrics:
        if m == "accuracy":
            columns.append(base["accuracy"] - frame["accuracy"].to_numpy(float) + 0.0)
        elif m == "size":
            columns.append(frame["size_bytes"].to_numpy(float) / base["size_bytes"])
        else:
            columns.append(frame["latency_ms"].to_numpy(float) / base["latency_ms"])
    out = np.stack(columns, axis=1) if columns else np.empty((len(frame), 0))
    if "accuracy" in metrics:  # points lost, floored at "none": gains count as no loss
        i = metrics.index("accuracy")
        out[:, i] = np.clip(out[:, i], 0.0, None)
    return out


def _hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume for 1-3 minimised objectives (slicing along the first one)."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    order = np.argsort(points[:, 0])
    points = points[order]
    total = 0.0
    for i in range(len(points)):
        upper = points[i + 1, 0] if i + 1 < len(points) else reference[0]
        width = upper - points[i, 0]
        if width > 0:
            total += width * _hypervolume(points[: i + 1, 1:], reference[1:])
    return float(total)


# --------------------------------------------------------------------------- parameters


def parameter_frame(results: StudyResults) -> pd.DataFrame:
    """Completed, non-baseline trials with their Optuna parameters (categories as codes)."""
    frame = results.trials
    if frame.empty:
        return frame
    done = frame[(frame["state"] == "COMPLETE") & ~frame["baseline"]]
    params = [c for c in done.columns if c.startswith("param.")]
    out = done[["number", "accuracy", "size_bytes", "latency_ms", *params]].copy()
    for column in params:
        if not pd.api.types.is_numeric_dtype(out[column]):
            out[column] = out[column].astype("category").cat.codes.replace(-1, np.nan)
    return out


def influence(results: StudyResults) -> pd.DataFrame:
    """How strongly each parameter moves each objective: the absolute Spearman rank
    correlation over the completed trials (0 = no monotone relation, 1 = it decides it).
    A simple, assumption-light measure; interactions between parameters do not show."""
    frame = parameter_frame(results)
    params = [c for c in frame.columns if c.startswith("param.")]
    rows = []
    for param in params:
        row: dict[str, Any] = {"parameter": param.removeprefix("param.")}
        for metric, column in (
            ("accuracy", "accuracy"),
            ("size", "size_bytes"),
            ("latency", "latency_ms"),
        ):
            pair = frame[[param, column]].dropna()
            rho = pair[param].rank().corr(pair[column].rank()) if len(pair) > 2 else np.nan
            row[metric] = abs(rho) if rho == rho else 0.0  # nan (a constant) -> no influence
        rows.append(row)
    return pd.DataFrame(rows, columns=["parameter", "accuracy", "size", "latency"])


# --------------------------------------------------------------------------- candidate


def layer_table(record: dict[str, Any]) -> pd.DataFrame:
    """Per layer: the sparsity reached, channels kept, bit-width and the kernel it ran in."""
    sparsity = record.get("layer_sparsity") or {}
    channels = record.get("layer_channels") or {}
    quant = record.get("layer_quant") or {}
    names = list(dict.fromkeys([*sparsity, *channels, *quant]))
    rows = []
    for name in names:
        kept = channels.get(name)
        q = quant.get(name, {})
        rows.append(
            {
                "layer": name,
                "sparsity": sparsity.get(name, 0.0),
                "channels kept": f"{kept[0]}/{kept[1]}" if kept else "",
                "bits": q.get("bits", 32),
                "kernel": q.get("kernel", ""),
            }
        )
    return pd.DataFrame(rows, columns=["layer", "sparsity", "channels kept", "bits", "kernel"])


def export_command(results: StudyResults, number: int) -> str:
    import shlex

    root = results.directory.parent
    # the default root (results/ under the current folder) needs no flag
    flags = (
        ""
        if root.resolve() == Path("results").resolve()
        else f" --results {shlex.quote(str(root))}"
    )
    return (
        f"paretoopt export --study {shlex.quote(results.name)}{flags} --trial {number} "
        "--out exported/"
    )
