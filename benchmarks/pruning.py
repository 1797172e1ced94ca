"""Pruning benchmark on the shipped conv study: saliencies at equal sparsity, and the
latency a half-width model really gains.

    python benchmarks/pruning.py            # or: make bench

Every row is one trial of the real pipeline (prune, fine-tune with distillation, write the
compressed file, rebuild from it, export to ONNX Runtime, measure against the baseline in
alternating rounds). Writes results/bench/pruning.csv and prints the tables for the README.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from paretoopt.pipeline import calibrate, prepare, run_trial
from paretoopt.plan import CompressionPlan, DistillConfig, FinetuneConfig, PruneConfig
from paretoopt.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SALIENCIES = ("l1", "l2", "taylor", "hessian")
SETTINGS = {  # structure -> sparsity compared at
    "unstructured": 0.9,
    "channel": 0.5,
}


def plans(epochs: int) -> list[tuple[str, CompressionPlan]]:
    out = []
    for structure, sparsity in SETTINGS.items():
        for saliency in SALIENCIES:
            prune = PruneConfig(structure, sparsity, saliency, round_to=8)
            for ft in (0, epochs):
                plan = CompressionPlan(
                    prune, distill=DistillConfig(2.0, 0.5), finetune=FinetuneConfig(ft, 1e-3, 64)
                )
                out.append((f"{structure}-{saliency}-ft{ft}", plan))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "conv.yaml"))
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    space = load_space(args.space)
    ctx = prepare(space, ROOT / "results" / ".cache")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibrate(ctx, Path(tmp) / "calibration")
        base = run_trial(ctx, CompressionPlan(), Path(tmp) / "baseline", seed=0)
        for name, plan in plans(args.epochs):
            start = time.perf_counter()
            record = run_trial(ctx, plan, Path(tmp) / name, seed=0)
            rows.append(_row(name, plan, record, base, time.perf_counter() - start))
            print(
                f"{name:28s} acc {rows[-1]['accuracy']:6.2f}  x{rows[-1]['speedup']:.2f} "
                f"faster  x{rows[-1]['size_ratio']:.1f} smaller",
                file=sys.stderr,
            )
    with open(out / "pruning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _print_tables(rows, base)
    return 0


def _row(name: str, plan: CompressionPlan, record: dict, base: dict, seconds: float) -> dict:
    return {
        "name": name,
        "structure": plan.prune.structure,
        "saliency": plan.prune.saliency,
        "sparsity": plan.prune.sparsity,
        "finetune_epochs": plan.finetune.epochs,
        "accuracy": round(record["accuracy"], 2),
        "accuracy_change": round(record["accuracy"] - base["accuracy"], 2),
        "params": record["params"],
        "size_bytes": record["size_bytes"],
        "size_ratio": round(base["size_bytes"] / record["size_bytes"], 2),
        "latency_ms": round(record["latency_ms"], 4),
        "speedup": round(base["latency_ms"] / record["latency_ms"], 2),
        "latency_spread": round(record["latency"]["spread"], 3),
        "seconds": round(seconds, 1),
    }


def _print_tables(rows: list[dict], base: dict) -> None:
    print(
        f"baseline: val {base['accuracy']:.2f} %, {base['params']} params, "
        f"{base['size_bytes']} B, {base['latency_ms']:.4f} ms\n"
    )
    for structure, sparsity in SETTINGS.items():
        print(f"{structure} pruning at {sparsity:.0%}:\n")
        print(
            "| saliency | val acc after pruning | after fine-tuning | Δ pts | params | "
            "x smaller | x faster |"
        )
        print("|---|---|---|---|---|---|---|")
        for saliency in SALIENCIES:
            pre, post = (
                r for r in rows if r["structure"] == structure and r["saliency"] == saliency
            )
            print(
                f"| {saliency} | {pre['accuracy']:.2f} | {post['accuracy']:.2f} | "
                f"{post['accuracy_change']:+.2f} | {post['params']} | "
                f"{post['size_ratio']:.1f} | {post['speedup']:.2f} |"
            )
        print()


if __name__ == "__main__":
    sys.exit(main())
