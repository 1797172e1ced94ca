"""Augmentation benchmark on the shipped conv study: what mixup and cutmix do for the
accuracy a compressed model recovers in fine-tuning.

    python benchmarks/augmentation.py       # or: make bench

Three plans whose fine-tuning has accuracy to recover (70 % of channels removed, 90 % of
weights removed, 3-bit QAT), each fine-tuned for --epochs (6) with distillation, with no
augmentation, mixup 0.2 and cutmix 1.0, over three seeds: 27 trials of the real
pipeline. Writes results/bench/augmentation.csv and prints the table for the README:
the validation accuracy against the baseline's, per plan and augmentation, the mean
over the seeds and its range.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path

from common import Record, arguments, context, progress, table, write_csv

from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.study.trial import calibrate, run_trial

SEEDS = (0, 1, 2)
AUGMENTATIONS = {"none": {}, "mixup 0.2": {"mixup": 0.2}, "cutmix 1.0": {"cutmix": 1.0}}


def plans(epochs: int) -> dict[str, CompressionPlan]:
    ft = FinetuneConfig(epochs, 1e-3, 64)
    kd = DistillConfig(2.0, 0.5)
    return {
        "channel 0.7": CompressionPlan(
            prune=PruneConfig(structure="channel", sparsity=0.7), distill=kd, finetune=ft
        ),
        "unstructured 0.9": CompressionPlan(
            prune=PruneConfig(structure="unstructured", sparsity=0.9), distill=kd, finetune=ft
        ),
        "int3 qat": CompressionPlan(quant=QuantConfig(3, method="qat"), distill=kd, finetune=ft),
    }


def main() -> int:
    args = arguments(__doc__)
    ctx = context(args.space)
    rows: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        calibrate(ctx, Path(tmp) / "calibration")
        base = run_trial(ctx, CompressionPlan(), Path(tmp) / "baseline", seed=0).accuracy
        for name, plan in plans(max(args.epochs, 6)).items():
            for label, knobs in AUGMENTATIONS.items():
                ft = dataclasses.replace(plan.finetune, **knobs)
                changes = []
                for seed in SEEDS:
                    trial = plan.replace(finetune=ft)
                    record = run_trial(ctx, trial, Path(tmp) / f"{name}-{label}-{seed}", seed)
                    changes.append(record.accuracy - base)
                    progress(f"{name}, {label}, seed {seed}: {changes[-1]:+.2f} points")
                rows.append({
                    "plan": name, "augmentation": label, "baseline": round(base, 2),
                    "change_mean": round(statistics.mean(changes), 2),
                    "change_min": round(min(changes), 2), "change_max": round(max(changes), 2),
                })  # fmt: skip
    write_csv(rows, "augmentation.csv", args.out)
    print(
        table(
            rows,
            {
                "plan": lambda r: r["plan"],
                "augmentation": lambda r: r["augmentation"],
                "val accuracy change, mean of 3 seeds (range)": lambda r: (
                    f"{r['change_mean']:+.2f} ({r['change_min']:+.2f} to {r['change_max']:+.2f})"
                ),
            },
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
