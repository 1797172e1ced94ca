"""Streaming benchmark: a study over data that does not fit a stated memory budget.

    python benchmarks/streaming.py            # or: make bench

The training split is 2,000,000 generated samples of 256 float32 features (2.06 GB in
memory), read as a DataLoader over an iterable dataset (benchmarks/stream_data.py); the
budget is 1,024 MB of peak resident memory for the whole `paretoopt search` process
(model, runtimes, Optuna and all). The search runs the built-in MLP with channel pruning,
int8 weights and distillation; the check: every trial completes, and the process's peak
resident set size (getrusage of the child) stays under the budget.

Writes results/bench/streaming.csv.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from common import BENCH_DIR, ROOT, progress, write_csv
from stream_data import nbytes

BUDGET_MB = 1024
TRAIN_SAMPLES = 2_000_000
TRIALS = 4


def space(folder: Path) -> Path:
    doc = {
        "study": "streaming",
        "model": {"name": "mlp", "kwargs": {"in_features": 256, "hidden": [256, 128]}},
        "data": {
            "factory": f"{ROOT / 'benchmarks' / 'stream_data.py'}:splits",
            "kwargs": {"train": TRAIN_SAMPLES},
        },
        "baseline": {"epochs": 1, "batch_size": 512},
        "target": {"batch_size": 32},
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": TRIALS, "sampler": "random", "anchors": 0},
        "space": {
            "pruning": {"structure": "channel", "sparsity": {"low": 0.2, "high": 0.6}},
            "quantization": {"bits": 8},
            "distillation": {"temperature": 2.0, "alpha": 0.5},
            "finetune": {"epochs": 1, "batch_size": 512},
        },
    }
    path = folder / "streaming.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        command = [str(Path(sys.executable).with_name("paretoopt")), "search", "--space",
                   str(space(folder)),
                   "--results", str(folder / "r")]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB here
        if done.returncode != 0:
            progress(done.stderr[-2000:])
            return 1
        trials = pd.read_csv(folder / "r" / "streaming" / "trials.csv")
    data_mb = nbytes(TRAIN_SAMPLES) / 2**20
    row = {
        "train_samples": TRAIN_SAMPLES,
        "data_mb": round(data_mb),
        "budget_mb": BUDGET_MB,
        "peak_rss_mb": round(peak_mb),
        "trials_complete": int((trials["state"] == "COMPLETE").sum()),
        "trials": len(trials),
        "baseline_accuracy": float(trials.loc[0, "accuracy"]),
        "seconds": round(seconds, 1),
    }
    write_csv([row], "streaming.csv", BENCH_DIR)
    ok = row["peak_rss_mb"] < BUDGET_MB < data_mb and row["trials_complete"] == TRIALS
    print(
        f"{'PASS' if ok else 'FAIL'}  a {row['data_mb']} MB training split, {TRIALS} trials "
        f"({row['trials_complete']} complete, baseline {row['baseline_accuracy']:.2f} %): "
        f"peak resident memory {row['peak_rss_mb']} MB, budget {BUDGET_MB} MB, "
        f"{row['seconds']} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
