"""The realistic built-in benchmark: a MobileNetV2-style network on 5,000 real MNIST digits,
where fine-tuning is most of every trial's time.

    python benchmarks/workload.py                 # or: make bench
    python benchmarks/workload.py --trials 20     # a shorter study

A fresh study of search_spaces/mnist.yaml (results/bench/studies/workload-mnist), run as a
user runs it. Reports the front within 1 point of the baseline's validation accuracy
(size ratio, and the latency ratio of the end-of-search confirmation, which re-times each
front trial's own file), the trial time by stage, and the share of it spent fine-tuning.
The target: fine-tuning is at least 80 % of the summed trial time (the baseline trial,
which fine-tunes nothing, excluded), so the benchmark stands for studies where training
dominates, as the cost-aware search needs.

Writes results/bench/workload.csv and prints the README tables.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
from common import BENCH_DIR, ROOT, Record, progress, table, write_csv

from paretoopt.config.space import load_space
from paretoopt.measure.fingerprint import hardware_fingerprint
from paretoopt.measure.isa import int8_dot, this_machine
from paretoopt.results.frames import BASELINE_ATTR, load_results, open_storage

SPACE = ROOT / "search_spaces" / "mnist.yaml"
STAGES = ("train", "compress", "export", "calibrate", "measure")
WITHIN = 1.0  # points of validation accuracy below the baseline
TARGET = 0.80  # fine-tuning's share of the summed trial time


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--space", default=str(SPACE), help="search-space YAML file")
    parser.add_argument("--trials", type=int, help="trials (default: the space file's)")
    parser.add_argument("--out", default=str(BENCH_DIR), help="output folder")
    return parser.parse_args()


def stage_shares(directory: Path, study: str) -> Record:
    """Mean seconds per trial by stage, and fine-tuning's share of the summed trial time."""
    storage = open_storage(None, directory)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE" and not t.user_attrs.get(BASELINE_ATTR)]
    total = sum(t.duration.total_seconds() for t in done)
    stages = {s: sum(t.user_attrs["stages"][s] for t in done) for s in STAGES}
    n = len(done)
    return {
        "trials": n,
        "trial_s_mean": round(total / n, 2),
        **{f"{s}_s": round(v / n, 2) for s, v in stages.items()},
        "other_s": round((total - sum(stages.values())) / n, 2),
        "train_share": round(stages["train"] / total, 3),
    }


def front_rows(directory: Path) -> list[Record]:
    """The front within WITHIN points, by size ratio, with the confirmed latency ratio."""
    results = load_results(directory)
    base = results.baseline["accuracy"]
    front = results.pareto[results.pareto["accuracy"] >= base - WITHIN]
    front = front.sort_values("size_ratio", ascending=False)
    return [
        {
            "trial": int(r["number"]),
            "accuracy": round(float(r["accuracy"]), 2),
            "accuracy_change": round(float(r["accuracy"]) - base, 2),
            "size_ratio": round(float(r["size_ratio"]), 1),
            "speedup": round(float(r["speedup"]), 2),
            "confirm_speedup": round(float(r.get("confirm_speedup", float("nan"))), 2),
            "plan": r["plan"],
        }
        for _, r in front.iterrows()
    ]


def main() -> int:
    args = arguments()
    space = load_space(args.space)
    trials = args.trials or space.search.trials
    space = replace(space, study="workload-mnist", search=replace(space.search, trials=trials))
    root = Path(args.out) / "studies"
    shutil.rmtree(root / space.study, ignore_errors=True)  # timed from scratch
    from paretoopt.study.search import search

    start = time.perf_counter()
    results = search(space, results_root=root)
    wall = time.perf_counter() - start
    progress(f"  {space.study}: {trials} trials in {wall:.0f} s")
    shares = stage_shares(results.directory, space.study)
    rows = front_rows(results.directory)
    write_csv(rows or [{"trial": None}], "workload.csv", args.out)
    isa, machine = this_machine()
    cpu = hardware_fingerprint()["cpu"]
    print(f"machine: {cpu}, {machine}, int8 on {int8_dot(isa, machine)}, flags {isa}")
    print(f"baseline validation accuracy {results.baseline['accuracy']:.2f} %, wall {wall:.0f} s")
    print(
        table(
            rows,
            {
                "trial": lambda r: str(r["trial"]),
                "val acc": lambda r: f"{r['accuracy']:.2f} % ({r['accuracy_change']:+.2f})",
                "x smaller": lambda r: f"{r['size_ratio']:.1f}",
                "x faster (search)": lambda r: f"{r['speedup']:.2f}",
                "x faster (confirmed)": lambda r: f"{r['confirm_speedup']:.2f}",
                "plan": lambda r: r["plan"],
            },
        )
    )
    print(
        table(
            [shares],
            {
                "trials": lambda r: str(r["trials"]),
                "trial (mean)": lambda r: f"{r['trial_s_mean']:.1f} s",
                **{s: (lambda r, s=s: f"{r[f'{s}_s']:.2f}") for s in (*STAGES, "other")},
                "fine-tuning share": lambda r: f"{r['train_share'] * 100:.0f} %",
            },
        )
    )
    ok = shares["train_share"] >= TARGET
    print(
        f"fine-tuning at least {TARGET * 100:.0f} % of trial time: "
        f"{'PASS' if ok else 'FAIL'} ({shares['train_share'] * 100:.0f} %)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
