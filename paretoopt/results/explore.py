"""The explorer's data layer: what the app shows, computed from a study's results.

Pure pandas and numpy (no torch, no Streamlit), so the app starts fast and every figure
it draws can be tested on its own: axes absolute or relative to the baseline, the budget
filter, the knee of what remains, hypervolume over trials, parameter influence, and a
candidate's per-layer table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from paretoopt.config.metrics import ACCURACY, DEFAULT_QUALITY, METRICS, quality_metric, shown
from paretoopt.results.frames import (
    JOURNAL_FILE,
    RUN_FILE,
    SPACE_FILE,
    StudyResults,
    load_results,
)
from paretoopt.results.pick import confirmed, knee
from paretoopt.results.record import layer_rows


@dataclass(frozen=True)
class Axis:
    column: str
    label: str
    log: bool = False


def axis(metric: str, relative: bool, quality: str = DEFAULT_QUALITY) -> Axis:
    """A metric's axis, absolute or relative to the baseline; the quality one labelled
    by what the study's `metric` measures."""
    m = quality_metric(quality) if metric == ACCURACY.name else METRICS[metric]
    if relative:
        return Axis(m.ratio_column, m.ratio_label, m.quotient)
    return Axis(m.field, m.label, m.log)


def is_live(results: StudyResults) -> bool:
    """A search is running on the study (a trial in flight), in its journal or in the
    database the explorer was given."""
    running = len(results.trials) and bool((results.trials["state"] == "RUNNING").any())
    return bool(running)


def storage_state(results: StudyResults) -> tuple[int, ...]:
    """What changes with every trial a search records, read cheaply: the sizes and
    modification times of the journal and run.json (two stat calls), or, for a study
    in a database, its trial count by state (one query) and run.json's."""
    out: list[int] = []
    names = (JOURNAL_FILE, RUN_FILE) if results.storage is None else (RUN_FILE,)
    for name in names:
        try:
            info = (results.directory / name).stat()
        except OSError:
            out += [-1, -1]
        else:
            out += [info.st_size, info.st_mtime_ns]
    if results.storage is not None:
        out += _database_state(results.storage, results.name)
    return tuple(out)


def _database_state(url: str, study: str) -> list[int]:
    import optuna

    storage = _database(url)
    trials = storage.get_all_trials(storage.get_study_id_from_name(study), deepcopy=False)
    return [len(trials), *(sum(t.state == s for t in trials) for s in optuna.trial.TrialState)]


@functools.lru_cache(maxsize=4)
def _database(url: str) -> Any:
    """One connection pool per database for the page's polls."""
    import optuna

    return optuna.storages.RDBStorage(url)


def studies(root: Path) -> list[str]:
    """Study folders under a results root, by name."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / SPACE_FILE).is_file())


def open_study(root: Path, name: str, storage: str | None = None) -> StudyResults:
    return load_results(root / name, storage)


@dataclass(frozen=True)
class Budget:
    """Limits by metric name, each read as the metric's constraint reads it: accuracy
    as the largest drop in points below the baseline, the others as the largest value."""

    limits: dict[str, float] = field(default_factory=dict)

    def mask(self, frame: pd.DataFrame, baseline: dict[str, Any]) -> pd.Series:
        """`baseline`: the baseline's figures (a relative limit without them is skipped)."""
        ok = pd.Series(True, index=frame.index)
        for name, limit in self.limits.items():
            m = METRICS[name]
            base = baseline.get(m.field)
            if limit is None or (m.limit.relative and base is None):
                continue
            inside = [m.within(float(v), base, limit) for v in frame[m.field]]
            ok &= pd.Series(inside, index=frame.index, dtype=bool)
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
    """The front within the budget, best accuracy first; latencies as confirmed at the
    end of the search wherever a trial was re-measured."""
    front = confirmed(results.pareto, results.baseline)  # re-measured latency, where it is
    if front.empty:
        return front
    inside = front[budget.mask(front, results.baseline)]
    return inside.sort_values(["accuracy", "size_bytes"], ascending=[False, True])


def suggested(frame: pd.DataFrame, objectives: tuple[str, ...] = ()) -> int | None:
    """The knee of the candidates left, or None when none is left."""
    return knee(frame, [m.name for m in shown(objectives)]) if len(frame) else None


def selected_trials(event: Any) -> list[int]:
    """Trial numbers from a plotly or dataframe selection event (read dict-style, which is
    what Streamlit hands over, and what a test can inject)."""
    if not event:
        return []
    selection = event.get("selection", {}) if isinstance(event, dict) else event["selection"]
    points = selection.get("points", [])
    return [int(p["customdata"][0]) for p in points if p.get("customdata")]


# --------------------------------------------------------------------------- hypervolume


EARLY_COLUMNS = {  # trials column: the explorer's heading
    "number": "trial",
    "stopped": "ended",
    "stop_rung": "rung",
    "partial_accuracy": "partial (not final)",
    "size_bytes": "size (untrained, bytes)",
    "latency_ms": "latency (ms)",
    "compute_s": "compute s",
    "plan": "plan",
    "stop_reason": "reason",
}


def early_trials(results: StudyResults) -> pd.DataFrame:
    """The trials the cost-aware search ended before a full fine-tune (study/fidelity):
    rejected before fine-tuning, with the size and latency measured untrained, or stopped
    at a rung, with the partial accuracy there. Never final figures: none is on the front."""
    frame = results.trials
    if frame.empty or "stopped" not in frame:
        return pd.DataFrame(columns=list(EARLY_COLUMNS.values()))
    early = frame[frame["stopped"].isin(["rejected", "stopped"])]
    table = early[[c for c in EARLY_COLUMNS if c in early]].rename(columns=EARLY_COLUMNS)
    return table.reset_index(drop=True)


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
    reference = np.array([accuracy_reference if METRICS[m].maximize else 1.0 for m in metrics])
    rows, kept, volume = [], np.empty((0, len(metrics))), 0.0
    for number, point in zip(done["number"], points, strict=True):
        dominated = bool(len(kept)) and bool(np.any(np.all(kept <= point, axis=1)))
        if np.all(point < reference) and not dominated:  # only a new front point adds volume
            kept = np.vstack([kept[~np.all(point <= kept, axis=1)], point])
            volume = _hypervolume(kept, reference)
        rows.append({"number": int(number), "hypervolume": volume})
    return pd.DataFrame(rows)


def _normalised(frame: pd.DataFrame, metrics: list[str], base: dict[str, Any]) -> np.ndarray:
    """Each metric as a loss in baseline units: points lost, floored at "none" (gains
    count as no loss), or the fraction of the baseline's figure."""
    columns = []
    for name in metrics:
        m = METRICS[name]
        loss = m.loss(frame[m.field].to_numpy(float), float(base[m.field])) + 0.0
        columns.append(np.clip(loss, 0.0, None) if m.maximize else loss)
    return np.stack(columns, axis=1) if columns else np.empty((len(frame), 0))


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
    fields = [m.field for m in shown(results.metrics)]
    out = done[["number", *fields, *params]].copy()
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
    metrics = shown(results.metrics)
    rows = []
    for param in params:
        row: dict[str, Any] = {"parameter": param.removeprefix("param.")}
        for m in metrics:
            pair = frame[[param, m.field]].dropna()
            rho = pair[param].rank().corr(pair[m.field].rank()) if len(pair) > 2 else np.nan
            row[m.name] = abs(rho) if rho == rho else 0.0  # nan (a constant) -> no influence
        rows.append(row)
    return pd.DataFrame(rows, columns=["parameter", *(m.name for m in metrics)])


# --------------------------------------------------------------------------- candidate


def layer_table(record: dict[str, Any]) -> pd.DataFrame:
    """Per layer: the sparsity reached, channels kept, the rank a factor carries, bit-width,
    shared values (weight clustering) and the kernel it ran in."""
    rows = [
        {
            "layer": r["layer"],
            "sparsity": r["sparsity"],
            "channels kept": f"{r['channels_kept']}/{r['channels']}" if r["channels"] else "",
            "rank": f"{r['rank']}/{r['full_rank']}" if r["full_rank"] else "",
            "bits": r["bits"],
            # weight clustering: the layer's shared values (per channel or per tensor)
            "clusters": 2 ** r["bits"] if r["format"] == "kmeans" else "",
            "kernel": r["kernel"] or "",
        }
        for r in layer_rows(record)
    ]
    columns = ["layer", "sparsity", "channels kept", "rank", "bits", "clusters", "kernel"]
    return pd.DataFrame(rows, columns=columns)


def export_command(results: StudyResults, number: int) -> str:
    import shlex

    root = results.directory.parent
    # the default root (results/ under the current folder) needs no flag
    flags = (
        ""
        if root.resolve() == Path("results").resolve()
        else f" --results {shlex.quote(str(root))}"
    )
    if results.shown_runtime != results.runtime:  # a compared runtime's file, as measured
        flags += f" --target {shlex.quote(results.shown_runtime)}"
    return (
        f"paretoopt export --study {shlex.quote(results.name)}{flags} --trial {number} "
        "--out exported/"
    )
