"""Search efficiency: paretoopt's default sampler against random search and a uniform
grid over the same knobs, on the shipped conv and mlp studies, in one run.

    python benchmarks/search.py            # or: make bench

Every run is a real study (the same space file, baseline, fine-tuning and measurement),
differing only in `search.sampler` and `search.seed`:

- tpe: paretoopt's default: the study's 3 anchor plans (light to strong, see
  paretoopt/study/anchors.py), then multivariate TPE (10 start-up trials, the anchors and the
  baseline among them);
- tpe-no-anchors: the same TPE without the anchors (`search.anchors: 0`), to show what
  each part contributes;
- random: Optuna's RandomSampler, no anchors;
- grid: `search.sampler: grid`, a lattice of 3 evenly spaced values per range knob and
  every option of a choice, visited in a seeded random order (what a user sweeping by
  hand would lay out; a full grid is far larger than the budget).

Five seeds each, at equal budgets (the baseline trial included): 60 trials for conv
(half its shipped budget) and 80 for mlp (twice its shipped 40). A random-search run
that has not reached the 90 % level by the budget is continued to 4x the budget, so that
the target compares against a measured count where one exists; the curves, the final
hypervolumes and the level itself are those of the equal budget.

Hypervolume, fixed and written down: objectives in baseline units, all minimised:
accuracy as points lost against the baseline (gains count as no loss), size and latency
as fractions of the baseline's. The reference point is (the space's max_accuracy_drop,
1, 1): the worst feasible accuracy, the baseline's size and latency. Only feasible
trials count. The hypervolume is divided by the reference box's volume, so 1.0 would be
a free, lossless model. "Trials to 90 %" is the first trial after which a run's
hypervolume reaches 90 % of the best final hypervolume any run of that benchmark found.

Writes under results/bench/: search_history.csv (hypervolume after every trial of every
run), search.csv (trials to 90 % per run), search_outcome.csv (the best compression
within 0.5 and 1 point, with its plan), search.html (the curves); the studies themselves
stay in results/bench/studies/ (delete it for a fresh run: finished studies are reused).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from common import (
    CONV_SPACE,
    MLP_SPACE,
    Record,
    arguments,
    progress,
    snapshot,
    table,
    write_csv,
    write_figure,
)

from paretoopt.config.space import Space, load_space
from paretoopt.results.explore import hypervolume_history
from paretoopt.results.frames import StudyResults

BENCHES = {"conv": (CONV_SPACE, 60), "mlp": (MLP_SPACE, 80)}
ARMS = {  # name: (search.sampler, search.anchors)
    "tpe": ("tpe", 3),
    "tpe-no-anchors": ("tpe", 0),
    "random": ("random", 0),
    "grid": ("grid", 0),
}
SEEDS = (0, 1, 2, 3, 4)
EXTEND = 4  # a random run short of the level at the budget continues to 4x the budget
SHARE = 0.9  # of the best hypervolume
TARGET = 0.5  # tpe needs at most this fraction of random's trials


def bench_space(file: Path, bench: str, arm: str, seed: int, trials: int) -> Space:
    space = load_space(file)
    sampler, anchors = ARMS[arm]
    search = replace(space.search, sampler=sampler, anchors=anchors, seed=seed, trials=trials)
    return replace(space, study=f"bench-{bench}-{arm}-{seed}", search=search)


def run_study(space: Space, root: Path) -> StudyResults:
    from paretoopt.study.search import search

    start = time.perf_counter()
    results = search(space, results_root=root)
    progress(f"  {space.study}: {len(results.trials)} trials, {time.perf_counter() - start:.0f} s")
    return results


def history(results: StudyResults, space: Space) -> list[float]:
    """Normalised hypervolume after each trial (1-based position = trials spent)."""
    drop = space.constraints.max_accuracy_drop or 100.0
    metrics = [o.metric for o in space.objectives]
    frame = hypervolume_history(results, metrics, accuracy_reference=drop)
    by_number = dict(zip(frame["number"], frame["hypervolume"] / drop, strict=True))
    curve, last = [], 0.0
    for number in sorted(results.trials["number"]):
        last = by_number.get(number, last)  # failed or infeasible trials add nothing
        curve.append(float(last))
    return curve


def extend(run: Record, level: float, root: Path) -> None:
    """Continue a random run that missed the level within the budget, to EXTEND times
    the budget, so that the target compares with a measured count, not a censored one.
    The curves, final hypervolumes and the level itself stay those of the equal budget."""
    file, budget = BENCHES[run["bench"]]
    space = bench_space(file, run["bench"], run["sampler"], run["seed"], EXTEND * budget)
    run["extended_to"] = EXTEND * budget
    run["trials_to_90"] = trials_to(history(run_study(space, root), space), level)


def trials_to(curve: list[float], level: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= level), None)


def best_within(results: StudyResults, budget: int, points: float, column: str) -> Record:
    """The largest ratio (size_ratio or speedup) among trials within `points` of the
    baseline's accuracy, with its plan."""
    frame = results.trials[results.trials["number"] < budget]  # an extended run: its budget
    ok = frame[(frame["state"] == "COMPLETE") & ~frame["baseline"]]
    ok = ok[ok["accuracy_change"] >= -points]
    if ok.empty:
        return {"ratio": None, "trial": None, "accuracy_change": None, "plan": ""}
    row = ok.loc[ok[column].idxmax()]
    return {
        "ratio": round(float(row[column]), 2),
        "trial": int(row["number"]),
        "accuracy_change": round(float(row["accuracy_change"]), 2),
        "test_accuracy": round(float(row["test_accuracy"]), 2),
        "plan": row["plan"],
    }


def summarise(runs: list[Record], bench: str, budget: int) -> list[Record]:
    """Per sampler: the median over seeds of the trials to 90 %. A run that never got
    there counts as one trial past what it ran (the budget, or its extension); a median
    that falls on such a run is censored: only known to be more than that."""
    rows = []
    for sampler in ARMS:
        mine = [r for r in runs if r["bench"] == bench and r["sampler"] == sampler]
        ran = [r["extended_to"] or budget for r in mine]
        needed = [r["trials_to_90"] or n + 1 for r, n in zip(mine, ran, strict=True)]
        median = statistics.median_low(needed)  # one seed's figure, an integer
        censored = any(
            r["trials_to_90"] is None and n + 1 == median for r, n in zip(mine, ran, strict=True)
        )
        rows.append(
            {
                "bench": bench,
                "sampler": sampler,
                "budget": budget,
                "trials_to_90_median": None if censored else median,
                "more_than": median - 1 if censored else None,
                "trials_to_90_seeds": " / ".join(
                    str(r["trials_to_90"] or f">{n}") for r, n in zip(mine, ran, strict=True)
                ),
                "final_hv_mean": round(statistics.mean(r["final_hv"] for r in mine), 4),
                "final_hv_min": round(min(r["final_hv"] for r in mine), 4),
                "final_hv_max": round(max(r["final_hv"] for r in mine), 4),
            }
        )
    return rows


def shown(row: Record) -> str:
    return str(row["trials_to_90_median"] or f">{row['more_than']}")


def verdict(summary: list[Record]) -> tuple[bool, str]:
    ours = next(r for r in summary if r["sampler"] == "tpe")
    theirs = next(r for r in summary if r["sampler"] == "random")
    mine = ours["trials_to_90_median"]
    # a censored random median is a lower bound: judged by it, the verdict is cautious
    other = theirs["trials_to_90_median"] or theirs["more_than"] + 1
    ok = mine is not None and mine <= TARGET * other
    return ok, f"tpe {shown(ours)} vs random {shown(theirs)} trials"


def figure(curves: pd.DataFrame, best: dict[str, float]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colours = {
        "tpe": "#1f77b4",
        "tpe-no-anchors": "#9467bd",
        "random": "#ff7f0e",
        "grid": "#2ca02c",
    }
    fig = make_subplots(rows=1, cols=len(BENCHES), subplot_titles=list(BENCHES))
    for col, bench in enumerate(BENCHES, start=1):
        for sampler in ARMS:
            part = curves[(curves["bench"] == bench) & (curves["sampler"] == sampler)]
            stats = part.groupby("trials")["hypervolume"].agg(["mean", "min", "max"])
            x = list(stats.index)
            fig.add_trace(
                go.Scatter(
                    x=x + x[::-1], y=list(stats["max"]) + list(stats["min"])[::-1],
                    fill="toself", fillcolor=colours[sampler], opacity=0.15,
                    line={"width": 0}, showlegend=False, hoverinfo="skip",
                ),
                row=1, col=col,
            )  # fmt: skip
            fig.add_trace(
                go.Scatter(
                    x=x, y=stats["mean"], name=sampler, legendgroup=sampler,
                    showlegend=col == 1, line={"color": colours[sampler]},
                ),
                row=1, col=col,
            )  # fmt: skip
        fig.add_hline(
            y=SHARE * best[bench], line_dash="dot", line_color="grey", row=1, col=col,
            annotation_text="90 % of best", annotation_position="bottom right",
        )  # fmt: skip
        fig.update_xaxes(title_text="trials", row=1, col=col)
    fig.update_yaxes(title_text="hypervolume (fraction of the reference box)", row=1, col=1)
    fig.update_layout(
        title=f"Hypervolume of the feasible front: mean of {len(SEEDS)} seeds, band = min to max",
        width=1100, height=480, template="plotly_white",
    )  # fmt: skip
    return fig


def main() -> int:
    args = arguments(__doc__, epochs=False)
    out = Path(args.out)
    root = out / "studies"
    curves: list[Record] = []
    runs: list[Record] = []
    outcome: list[Record] = []
    for bench, (file, budget) in BENCHES.items():
        progress(f"{bench}: {len(ARMS)} samplers x {len(SEEDS)} seeds x {budget} trials")
        for sampler in ARMS:
            for seed in SEEDS:
                space = bench_space(file, bench, sampler, seed, budget)
                results = run_study(space, root)
                curve = history(results, space)[:budget]  # an extended run, read again
                curves += [
                    {"bench": bench, "sampler": sampler, "seed": seed, "trials": i + 1,
                     "hypervolume": round(v, 6)}
                    for i, v in enumerate(curve)
                ]  # fmt: skip
                runs.append({"bench": bench, "sampler": sampler, "seed": seed, "curve": curve})
                for points, column in ((0.5, "size_ratio"), (1.0, "speedup")):
                    outcome.append(
                        {"bench": bench, "sampler": sampler, "seed": seed,
                         "within_points": points, "objective": column,
                         **best_within(results, budget, points, column)}
                    )  # fmt: skip
    best = {b: max(r["curve"][-1] for r in runs if r["bench"] == b) for b in BENCHES}
    for r in runs:
        r["final_hv"] = round(r["curve"][-1], 6)
        r["trials_to_90"] = trials_to(r.pop("curve"), SHARE * best[r["bench"]])
        r["extended_to"] = None
        if r["trials_to_90"] is None and r["sampler"] == "random":
            extend(r, SHARE * best[r["bench"]], root)
    summary = [row for b, (_, budget) in BENCHES.items() for row in summarise(runs, b, budget)]
    write_csv(curves, "search_history.csv", out)
    write_csv(runs, "search.csv", out)
    write_csv(summary, "search_summary.csv", out)
    write_csv(outcome, "search_outcome.csv", out)
    page = write_figure(figure(pd.DataFrame(curves), best), "search.html", out)
    snapshot(page, Path(__file__).resolve().parents[1] / "docs" / "bench-search.png")
    return report(summary, outcome, best)


def report(summary: list[Record], outcome: list[Record], best: dict[str, float]) -> int:
    print(
        table(
            summary,
            {
                "benchmark": lambda r: r["bench"],
                "sampler": lambda r: r["sampler"],
                "trials to 90 % (median)": shown,
                "per seed": lambda r: r["trials_to_90_seeds"],
                "final HV, mean (min-max)": lambda r: (
                    f"{r['final_hv_mean']:.4f} ({r['final_hv_min']:.4f}-{r['final_hv_max']:.4f})"
                ),
            },
        )
    )
    print()
    print(", ".join(f"best hypervolume {b}: {v:.4f}" for b, v in best.items()))
    best_rows = []
    for bench in BENCHES:
        for column in ("size_ratio", "speedup"):
            mine = [o for o in outcome if o["bench"] == bench and o["objective"] == column]
            top = max((o for o in mine if o["ratio"] is not None), key=lambda o: o["ratio"])
            best_rows.append(top)
    print()
    print(
        table(
            best_rows,
            {
                "benchmark": lambda r: r["bench"],
                "best": lambda r: (
                    f"{r['ratio']:.1f}x {'smaller' if r['objective'] == 'size_ratio' else 'faster'}"
                    f" within {r['within_points']} point"
                ),
                "val / test acc": lambda r: (
                    f"{r['accuracy_change']:+.2f} / {r['test_accuracy']:.2f} %"
                ),
                "found by": lambda r: f"{r['sampler']} seed {r['seed']}, trial {r['trial']}",
                "plan": lambda r: r["plan"],
            },
        )
    )
    failed = False
    for bench in BENCHES:
        ok, text = verdict([r for r in summary if r["bench"] == bench])
        print(
            f"{bench}: default sampler reaches 90 % of the best hypervolume in at most half "
            f"the trials random search needs: {'PASS' if ok else 'FAIL'} ({text})"
        )
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
