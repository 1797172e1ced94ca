"""Low-rank factorization benchmark on the shipped perceptron (Linear layers only): how
much faster a rank-r model runs in ONNX Runtime, and what it costs in accuracy.

    python benchmarks/lowrank.py            # or: make bench
    python benchmarks/lowrank.py --space search_spaces/mlp.yaml --epochs 3

Every row is one trial of the real pipeline (factorize by SVD, fine-tune with
distillation, write the compressed file, rebuild from it, export to ONNX Runtime, time it
against the baseline in alternating rounds): factorization alone, no pruning or
quantization. "dense" fine-tunes the unfactorized model the same way, so the accuracy a
rank costs is read against it as well as against the baseline. The target: a
factorized model at least 1.5x faster than the baseline within 1 point of its accuracy.
Writes results/bench/lowrank.csv and prints the table for the README.
"""

from __future__ import annotations

import sys

from common import MLP_SPACE, arguments, context, progress, ratios, run_plans, table, write_csv

from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.lowrank import LowRankConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.measure.fingerprint import hardware_fingerprint
from paretoopt.measure.isa import int8_dot, this_machine

SHARES = (1.0, 0.5, 0.25, 0.125, 0.0625)  # of each layer's full rank (1.0: dense)
ENERGIES = (0.9, 0.8)
SPEEDUP, DROP = 1.5, 1.0  # the target: this much faster within this many points


def plans(epochs: int) -> list[tuple[str, CompressionPlan]]:
    tune = {"distill": DistillConfig(2.0, 0.5), "finetune": FinetuneConfig(epochs, 1e-3, 64)}
    out = [
        (
            "dense" if share == 1.0 else f"rank-{share:g}",
            CompressionPlan(lowrank=LowRankConfig(share), **tune),
        )
        for share in SHARES
    ]
    out += [
        (
            f"energy-{e:g}",
            CompressionPlan(lowrank=LowRankConfig(criterion="energy", energy=e), **tune),
        )
        for e in ENERGIES
    ]
    return out


def main() -> int:
    args = arguments(__doc__, space=MLP_SPACE)
    ctx = context(args.space)
    rows, base = [], {}
    for name, _, record, base, seconds in run_plans(ctx, plans(args.epochs)):
        ranks = record.get("layer_rank") or {}
        rows.append(
            {
                "name": name,
                "ranks": " ".join(
                    f"{k}:{v[0]}/{v[1]}" for k, v in ranks.items() if k.endswith(".0")
                ),
                "params": record["params"],
                "macs": record["macs"],
                **ratios(record, base),
                "seconds": round(seconds, 1),
            }
        )
        r = rows[-1]
        progress(f"{name:14s} acc {r['accuracy']:6.2f}  x{r['speedup']:.2f} faster  {r['ranks']}")
    write_csv(rows, "lowrank.csv", args.out)
    isa, machine = this_machine()
    cpu = hardware_fingerprint()["cpu"]
    print(
        f"machine: {cpu}, {machine}, int8 on {int8_dot(isa, machine)}; baseline: val "
        f"{base['accuracy']:.2f} %, {base['params']} params, {base['macs']} MACs, "
        f"{base['latency_ms']:.4f} ms\n"
    )
    print(
        table(
            rows,
            {
                "plan": lambda r: r["name"],
                "ranks (first factor: kept/full)": lambda r: r["ranks"] or "-",
                "val acc %": lambda r: f"{r['accuracy']:.2f}",
                "Δ pts": lambda r: f"{r['accuracy_change']:+.2f}",
                "MACs": lambda r: str(r["macs"]),
                "x smaller": lambda r: f"{r['size_ratio']:.2f}",
                "x faster": lambda r: f"{r['speedup']:.2f}",
            },
        )
    )
    hits = [r for r in rows if r["speedup"] >= SPEEDUP and r["accuracy_change"] >= -DROP]
    best = max(hits, key=lambda r: r["speedup"], default=None)
    verdict = (
        f"target held: {best['name']} is x{best['speedup']:.2f} faster, "
        f"{best['accuracy_change']:+.2f} points"
        if best
        else f"target missed: no plan is x{SPEEDUP} faster within {DROP} point"
    )
    print(f"\n{verdict}")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
