"""Quantization benchmark on the shipped conv study: what each bit-width, granularity,
method and activation format really buys in size, speed and accuracy.

    python benchmarks/quantization.py       # or: make bench

Every row is one trial of the real pipeline: quantize (after fine-tuning, or during it
with QAT), write the compressed file, rebuild from it, convert for ONNX Runtime (int8
with calibrated activations where the plan asks), and measure against the float32
baseline in alternating rounds. Writes results/bench/quantization.csv, prints the tables
for the README, and checks the targets:

- int8 (weights and activations) at least 2x faster than the float32 baseline, with at
  most 0.5 point of accuracy lost;
- a 4-bit model at least 7x smaller than the baseline's file, within 1 point.
"""

from __future__ import annotations

import sys

from common import Record, arguments, context, progress, ratios, run_plans, table, write_csv

from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan

INT8 = {"bits": 8, "scheme": "symmetric", "activations": "int8"}


def plans(epochs: int) -> list[tuple[str, CompressionPlan]]:
    def plan(quant: QuantConfig, ft: int = 0) -> CompressionPlan:
        return CompressionPlan(
            quant=quant, distill=DistillConfig(2.0, 0.5), finetune=FinetuneConfig(ft, 1e-3, 64)
        )

    out = [
        ("fp16", plan(QuantConfig(16))),
        ("bf16", plan(QuantConfig(16, half_type="bfloat16"))),
        ("int8-weights", plan(QuantConfig(8))),
        ("int8-ptq", plan(QuantConfig(**INT8))),
        ("int8-ptq-per-tensor", plan(QuantConfig(**INT8, granularity="per_tensor"))),
    ]
    for bits in (6, 4, 3, 2):
        out += [
            (f"int{bits}-ptq", plan(QuantConfig(bits))),
            (f"int{bits}-ptq-per-tensor", plan(QuantConfig(bits, "per_tensor"))),
            (f"int{bits}-ptq-ft", plan(QuantConfig(bits), epochs)),
            (f"int{bits}-qat", plan(QuantConfig(bits, method="qat"), epochs)),
        ]
    out += [
        ("int4-qat-int8-act", plan(QuantConfig(4, activations="int8", method="qat"), epochs)),
        (
            "mixed-2/4/8-qat-int8-act",
            plan(QuantConfig(8, **_mixed(), activations="int8", method="qat"), epochs),
        ),
    ]
    return out


def _mixed() -> dict[str, object]:
    """A hand-made mixed plan: 8 bits where the signal enters and leaves, 2 bits in the
    wide hidden layer (58 % of the weights), 4 bits elsewhere."""
    return {"layer_bits": {"0.0": 8, "1.0": 4, "3.conv1": 4, "3.conv2": 4, "6": 2, "8": 8}}


def row(name: str, plan: CompressionPlan, record: Record, base: Record, seconds: float) -> Record:
    q = plan.quant
    return {
        "name": name,
        "bits": q.describe(),
        "granularity": q.granularity,
        "activations": q.activations,
        "method": q.method,
        "finetune_epochs": plan.finetune.epochs,
        "torch_accuracy": round(record["torch_accuracy"], 2),
        "deploy_gap": round(record["deploy_gap"], 2),
        **ratios(record, base),
        "runtime_file_bytes": record["runtime_file_bytes"],
        "int_kernels": record["int_kernels"],
        "seconds": round(seconds, 1),
    }


def check_targets(rows: list[Record]) -> list[str]:
    by = {r["name"]: r for r in rows}
    int8, four = by["int8-ptq"], by["int4-qat"]
    return [
        _verdict(
            int8["speedup"] >= 2.0 and int8["accuracy_change"] >= -0.5,
            f"int8: {int8['speedup']:.2f}x faster at {int8['accuracy_change']:+.2f} points "
            "(target: >= 2x, >= -0.5)",
        ),
        _verdict(
            four["size_ratio"] >= 7.0 and four["accuracy_change"] >= -1.0,
            f"4-bit: {four['size_ratio']:.2f}x smaller at {four['accuracy_change']:+.2f} points "
            "(target: >= 7x, >= -1)",
        ),
    ]


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def main() -> int:
    args = arguments(__doc__)
    rows: list[Record] = []
    base: Record = {}
    for name, plan, record, base, seconds in run_plans(context(args.space), plans(args.epochs)):
        rows.append(row(name, plan, record, base, seconds))
        r = rows[-1]
        progress(
            f"{name:26s} acc {r['accuracy']:6.2f} (torch {r['torch_accuracy']:6.2f})  "
            f"x{r['size_ratio']:.1f} smaller  x{r['speedup']:.2f} faster"
        )
    write_csv(rows, "quantization.csv", args.out)
    print(
        f"baseline: val {base['accuracy']:.2f} %, {base['size_bytes']} B, "
        f"{base['latency_ms']:.4f} ms\n"
    )
    print(
        table(
            rows,
            {
                "plan": lambda r: r["name"],
                "FT epochs": lambda r: str(r["finetune_epochs"]),
                "PyTorch acc %": lambda r: f"{r['torch_accuracy']:.2f}",
                "deployed acc %": lambda r: f"{r['accuracy']:.2f}",
                "Δ pts": lambda r: f"{r['accuracy_change']:+.2f}",
                "file B": lambda r: str(r["size_bytes"]),
                "x smaller": lambda r: f"{r['size_ratio']:.1f}",
                "x faster": lambda r: f"{r['speedup']:.2f}",
                "int8 kernels": lambda r: "yes" if r["int_kernels"] else "no",
            },
        )
    )
    verdicts = check_targets(rows)
    print("\n" + "\n".join(verdicts))
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
