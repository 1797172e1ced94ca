"""Cost-aware search: hypervolume against compute seconds, the cost-aware default against
full-fidelity TPE, on the realistic MNIST benchmark and on digits-conv.

    python benchmarks/cost_search.py                      # or: make bench
    python benchmarks/cost_search.py --benches mnist --trials 10 --seeds 0 1 2

Every run is a real study of a shipped space file, differing only in `search.fidelity`
and `search.seed` (TPE with the study's anchors in both arms, the same trial budget):

- full: every plan fine-tuned in full (`search.fidelity: full`, paretoopt's behaviour
  before the cost-aware search);
- cost-aware: `search.fidelity: halving`, the default (`auto`) where fine-tuning runs 4
  epochs or more, as on the MNIST space: size and latency measured before fine-tuning
  (plans they rule off the front are never trained), then successive halving at 1/9 and
  1/3 of fine-tuning, keeping 1 in 3.

Compute is each trial's wall seconds, recorded by the trial itself
(`paretoopt.compute_s`: prescreen, fine-tuning, compression, export, calibration and
measurement; whatever the trial's outcome), summed in trial order. Start-up, baseline
and the end-of-search confirmation are the same in both arms and left out.

Hypervolume as in benchmarks/search.py: objectives in baseline units (points of accuracy
lost, fractions of the baseline's size and latency), reference (max_accuracy_drop, 1,
1), feasible completed trials only, divided by the reference box. The target: the
cost-aware arm reaches 90 % of the full arm's final hypervolume (same seed) in at most
1/3 of the full arm's compute, median over the seeds. Trials rejected before fine-tuning
and stopped at a rung are counted, with the compute they saved (the mean compute of the
run's completed trials, less their own).

Writes results/bench/cost_search_<bench>.csv (per run), cost_search_<bench>_history.csv
(hypervolume and compute after every trial), cost_search.html and
docs/bench-cost-search.png.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from common import BENCH_DIR, CONV_SPACE, ROOT, Record, progress, table, write_csv, write_figure
from common import snapshot as png_of

from paretoopt.config.space import Space, load_space
from paretoopt.measure.fingerprint import hardware_fingerprint
from paretoopt.measure.isa import int8_dot, this_machine
from paretoopt.results.explore import hypervolume_history
from paretoopt.results.frames import COMPUTE_ATTR, StudyResults, open_storage

MNIST_SPACE = ROOT / "search_spaces" / "mnist.yaml"
BENCHES = {"mnist": (MNIST_SPACE, 10), "conv": (CONV_SPACE, 30)}  # space, trials
ARMS = {"full": "full", "cost-aware": "halving"}  # arm: search.fidelity
SHARE = 0.9  # of the full arm's final hypervolume
TARGET = 1 / 3  # of the full arm's compute


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--benches", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--trials", type=int, help="trials per run (default: per benchmark)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(BENCH_DIR), help="output folder")
    parser.add_argument("--fresh", action="store_true", help="delete the runs' studies first")
    return parser.parse_args()


def bench_space(file: Path, bench: str, arm: str, seed: int, trials: int) -> Space:
    space = load_space(file)
    search = replace(space.search, fidelity=ARMS[arm], seed=seed, trials=trials)
    return replace(space, study=f"cost-search-{bench}-{arm}-{seed}", search=search)


def run_study(space: Space, root: Path, fresh: bool) -> StudyResults:
    from paretoopt.study.search import search

    if fresh:
        shutil.rmtree(root / space.study, ignore_errors=True)
    # otherwise a study left by an interrupted run resumes: each trial records its own
    # compute, so the curve reads the same either way
    start = time.perf_counter()
    results = search(space, results_root=root)
    progress(f"  {space.study}: {len(results.trials)} trials, {time.perf_counter() - start:.0f} s")
    return results


def curve(results: StudyResults, space: Space) -> pd.DataFrame:
    """After each trial, in trial order: the cumulative compute seconds and the
    normalised hypervolume, with the trial's outcome."""
    drop = space.constraints.max_accuracy_drop or 100.0
    metrics = [o.metric for o in space.objectives]
    hv = hypervolume_history(results, metrics, accuracy_reference=drop)
    by_number = dict(zip(hv["number"], hv["hypervolume"] / drop, strict=True))
    study = optuna.load_study(
        study_name=results.name, storage=open_storage(None, results.directory)
    )
    compute = {t.number: float(t.user_attrs.get(COMPUTE_ATTR, 0.0)) for t in study.trials}
    frame = results.trials.sort_values("number")
    rows, spent, last = [], 0.0, 0.0
    for _, r in frame.iterrows():
        spent += compute.get(int(r["number"]), 0.0)
        last = by_number.get(int(r["number"]), last)  # stopped trials add no volume
        outcome = r.get("stopped") or ("complete" if r["state"] == "COMPLETE" else "failed")
        rows.append(
            {"number": int(r["number"]), "compute_s": spent, "hypervolume": float(last),
             "outcome": outcome, "trial_s": compute.get(int(r["number"]), 0.0)}
        )  # fmt: skip
    return pd.DataFrame(rows)


def compute_to(history: pd.DataFrame, level: float) -> float | None:
    """Compute seconds spent when the hypervolume first reaches `level`."""
    reached = history[history["hypervolume"] >= level - 1e-12]
    return float(reached["compute_s"].iloc[0]) if len(reached) else None


def savings(history: pd.DataFrame) -> Record:
    """Trials that ended early, by kind, and the compute they saved against the run's
    mean completed trial."""
    complete = history[history["outcome"] == "complete"]["trial_s"].iloc[1:]  # no baseline
    full = float(complete.mean()) if len(complete) else 0.0
    out: Record = {}
    for kind in ("rejected", "stopped"):
        early = history[history["outcome"] == kind]["trial_s"]
        out[kind] = len(early)
        out[f"{kind}_saved_s"] = round(float((full - early).clip(lower=0).sum()), 1)
    return out


def figure(histories: pd.DataFrame, benches: list[str]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colours = {"full": "#ff7f0e", "cost-aware": "#1f77b4"}
    fig = make_subplots(rows=1, cols=len(benches), subplot_titles=benches)
    for col, bench in enumerate(benches, start=1):
        part = histories[histories["bench"] == bench]
        for (arm, seed), run in part.groupby(["arm", "seed"]):
            fig.add_trace(
                go.Scatter(
                    x=run["compute_s"], y=run["hypervolume"], mode="lines",
                    line={"color": colours[str(arm)], "shape": "hv"},
                    name=str(arm), legendgroup=str(arm),
                    showlegend=bool(col == 1 and seed == part["seed"].min()),
                    hovertemplate=f"{arm} seed {seed}<br>%{{x:.0f}} s: %{{y:.4f}}<extra></extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text="compute seconds (sum of trial time)", row=1, col=col)
    fig.update_yaxes(title_text="hypervolume (fraction of the reference box)", row=1, col=1)
    fig.update_layout(
        title="Hypervolume of the feasible front against compute, one line per seed",
        width=1100, height=480, template="plotly_white",
    )  # fmt: skip
    return fig


def _save(runs: list[Record], histories: list[pd.DataFrame], bench: str, out: Path) -> None:
    """This benchmark's runs so far: cost_search_<bench>.csv and ..._history.csv."""
    write_csv([r for r in runs if r["bench"] == bench], f"cost_search_{bench}.csv", out)
    frame = pd.concat([h for h in histories if (h["bench"] == bench).all()], ignore_index=True)
    write_csv(frame.round(5).to_dict("records"), f"cost_search_{bench}_history.csv", out)


def main() -> int:
    args = arguments()
    out = Path(args.out)
    root = out / "studies"
    runs: list[Record] = []
    histories: list[pd.DataFrame] = []
    for bench in args.benches:
        file, default_trials = BENCHES[bench]
        trials = args.trials or default_trials
        progress(f"{bench}: {len(ARMS)} arms x {len(args.seeds)} seeds x {trials} trials")
        for seed in args.seeds:
            level, full_compute = None, None
            for arm in ARMS:
                space = bench_space(file, bench, arm, seed, trials)
                history = curve(run_study(space, root, args.fresh), space)
                histories.append(history.assign(bench=bench, arm=arm, seed=seed))
                final, spent = (
                    float(history["hypervolume"].iloc[-1]),
                    float(history["compute_s"].iloc[-1]),
                )
                if arm == "full":
                    level, full_compute = SHARE * final, spent
                assert level is not None and full_compute is not None
                reach = compute_to(history, level)
                runs.append(
                    {"bench": bench, "arm": arm, "seed": seed, "trials": trials,
                     "final_hv": round(final, 5), "compute_s": round(spent, 1),
                     "compute_to_90_s": None if reach is None else round(reach, 1),
                     "share_of_full": None if reach is None else round(reach / full_compute, 3),
                     **savings(history)}
                )  # fmt: skip
                _save(runs, histories, bench, out)  # after every run: a long benchmark
    frame = pd.concat(histories, ignore_index=True)
    page = write_figure(figure(frame, args.benches), "cost_search.html", out)
    png_of(page, ROOT / "docs" / "bench-cost-search.png")
    return report(runs, args.benches)


def report(runs: list[Record], benches: list[str]) -> int:
    isa, machine = this_machine()
    cpu = hardware_fingerprint()["cpu"]
    print(f"machine: {cpu}, {machine}, int8 on {int8_dot(isa, machine)}, flags {isa}")
    print(
        table(
            runs,
            {
                "benchmark": lambda r: f"{r['bench']} ({r['trials']} trials)",
                "arm": lambda r: r["arm"],
                "seed": lambda r: str(r["seed"]),
                "final HV": lambda r: f"{r['final_hv']:.4f}",
                "compute": lambda r: f"{r['compute_s']:.0f} s",
                "to 90 % of full's HV": lambda r: (
                    "never"
                    if r["compute_to_90_s"] is None
                    else f"{r['compute_to_90_s']:.0f} s ({r['share_of_full'] * 100:.0f} %)"
                ),
                "rejected (saved)": lambda r: f"{r['rejected']} ({r['rejected_saved_s']:.0f} s)",
                "stopped (saved)": lambda r: f"{r['stopped']} ({r['stopped_saved_s']:.0f} s)",
            },
        )
    )
    failed = False
    for bench in benches:
        mine = [r for r in runs if r["bench"] == bench and r["arm"] == "cost-aware"]
        shares = [
            r["share_of_full"] if r["share_of_full"] is not None else float("inf") for r in mine
        ]
        median = statistics.median(shares)
        ok = median <= TARGET
        print(
            f"{bench}: cost-aware reaches 90 % of full-fidelity TPE's final hypervolume in at "
            f"most 1/3 of its compute (median of {len(mine)} seeds): "
            f"{'PASS' if ok else 'FAIL'} ({median * 100:.0f} %; seeds "
            + ", ".join("never" if s == math.inf else f"{s * 100:.0f} %" for s in shares)
            + ")"
        )
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
