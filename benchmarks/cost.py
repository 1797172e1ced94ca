"""Trial cost: where a trial's time goes, how much of it is framework overhead, and how
many trials an hour one and two workers run.

    python benchmarks/cost.py              # or: make bench

Fresh studies of the shipped spaces (results/bench/studies/cost-*), run as a user runs
them. Per trial, the pipeline records its stages (train = fine-tuning with distillation
and QAT; compress = pruning and quantization; export; calibrate = int8 activation
ranges; measure = accuracy in the runtime and latency); "other" is the rest of the
trial's wall time (sampling, storage writes, the artifact file). Framework overhead is
everything but fine-tuning, as a share of the summed trial time (the baseline trial
excluded). Trials per hour are end to end: start-up, baseline from the cache,
calibration, the trials and the end-of-search confirmation, divided into the trial count.

Writes results/bench/cost.csv and cost.html and prints the README tables.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from common import (
    CONV_SPACE,
    MLP_SPACE,
    Record,
    arguments,
    progress,
    table,
    write_csv,
    write_figure,
)

from paretoopt.config.space import load_space
from paretoopt.results.frames import BASELINE_ATTR, open_storage

STAGES = ("train", "compress", "export", "calibrate", "measure")
RUNS = (("conv", CONV_SPACE, 30, 1), ("conv", CONV_SPACE, 30, 2), ("mlp", MLP_SPACE, 40, 1))
TARGET = 0.25  # overhead share on the default conv space


def run(bench: str, file: Path, trials: int, workers: int, root: Path) -> Record:
    from paretoopt.study.search import search

    space = load_space(file)
    space = replace(
        space, study=f"cost-{bench}-{workers}w", search=replace(space.search, trials=trials)
    )
    shutil.rmtree(root / space.study, ignore_errors=True)  # timed from scratch
    start = time.perf_counter()
    results = search(space, results_root=root, workers=workers)
    wall = time.perf_counter() - start
    progress(f"  {space.study}: {trials} trials in {wall:.0f} s")
    study = optuna.load_study(study_name=space.study, storage=open_storage(None, results.directory))
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and not t.user_attrs.get(BASELINE_ATTR)
    ]
    total = sum(t.duration.total_seconds() for t in done)
    stages = {s: sum(t.user_attrs["stages"][s] for t in done) for s in STAGES}
    other = total - sum(stages.values())
    n = len(done)
    return {
        "bench": bench,
        "workers": workers,
        "trials": trials,
        "wall_s": round(wall, 1),
        "trials_per_hour": round(trials / wall * 3600),
        "trial_s_median": round(sorted(t.duration.total_seconds() for t in done)[n // 2], 3),
        "trial_s_mean": round(total / n, 3),
        **{f"{s}_s": round(v / n, 3) for s, v in stages.items()},
        "other_s": round(other / n, 3),
        "overhead_share": round(1 - stages["train"] / total, 3),
    }


def figure(rows: list[Record]) -> Any:
    import plotly.graph_objects as go

    single = [r for r in rows if r["workers"] == 1]
    fig = go.Figure()
    for stage in (*STAGES, "other"):
        fig.add_bar(name=stage, x=[r["bench"] for r in single], y=[r[f"{stage}_s"] for r in single])
    fig.update_layout(
        barmode="stack",
        title="Mean seconds per trial, by stage (1 worker)",
        yaxis_title="seconds",
        template="plotly_white",
        width=700,
        height=450,
    )
    return fig


def main() -> int:
    args = arguments(__doc__, epochs=False)
    out = Path(args.out)
    rows = [run(bench, file, n, w, out / "studies") for bench, file, n, w in RUNS]
    write_csv(rows, "cost.csv", out)
    write_figure(figure(rows), "cost.html", out)
    print(
        table(
            rows,
            {
                "space": lambda r: r["bench"],
                "workers": lambda r: str(r["workers"]),
                "trials": lambda r: str(r["trials"]),
                "wall": lambda r: f"{r['wall_s']:.0f} s",
                "trials/hour": lambda r: str(r["trials_per_hour"]),
                "trial (mean)": lambda r: f"{r['trial_s_mean']:.2f} s",
                **{s: (lambda r, s=s: f"{r[f'{s}_s']:.3f}") for s in (*STAGES, "other")},
                "overhead": lambda r: f"{r['overhead_share'] * 100:.0f} %",
            },
        )
    )
    conv = next(r for r in rows if r["bench"] == "conv" and r["workers"] == 1)
    ok = conv["overhead_share"] <= TARGET
    print(
        f"framework overhead on the default conv space at most {TARGET * 100:.0f} % of a "
        f"trial: {'PASS' if ok else 'FAIL'} ({conv['overhead_share'] * 100:.0f} %)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
