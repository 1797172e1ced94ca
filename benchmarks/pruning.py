"""Pruning benchmark on the shipped conv study: saliencies at equal sparsity, and the
latency a half-width model really gains.

    python benchmarks/pruning.py            # or: make bench

Every row is one trial of the real pipeline (prune, fine-tune with distillation, write the
compressed file, rebuild from it, export to ONNX Runtime, measure against the baseline in
alternating rounds). Writes results/bench/pruning.csv and prints the tables for the README.
"""

from __future__ import annotations

import sys

from common import arguments, context, progress, ratios, run_plans, write_csv

from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.plan import CompressionPlan

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
    args = arguments(__doc__)
    ctx = context(args.space)
    rows, base = [], {}
    for name, plan, record, base, seconds in run_plans(ctx, plans(args.epochs)):
        rows.append(
            {
                "name": name,
                "structure": plan.prune.structure,
                "saliency": plan.prune.saliency,
                "sparsity": plan.prune.sparsity,
                "finetune_epochs": plan.finetune.epochs,
                "params": record["params"],
                **ratios(record, base),
                "seconds": round(seconds, 1),
            }
        )
        r = rows[-1]
        progress(
            f"{name:28s} acc {r['accuracy']:6.2f}  x{r['speedup']:.2f} faster  "
            f"x{r['size_ratio']:.1f} smaller"
        )
    write_csv(rows, "pruning.csv", args.out)
    _print_tables(rows, base)
    return 0


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
