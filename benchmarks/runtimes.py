"""The same plans measured in every CPU runtime: ONNX Runtime, OpenVINO and ExecuTorch
(XNNPACK), each against its own baseline.

    python benchmarks/runtimes.py           # needs `make extras` for the optional two

Every row is one trial of the real pipeline in that runtime (fine-tune with
distillation, write the compressed file, rebuild from it, deploy to the runtime, time it
against the baseline deployed in the same runtime, in alternating rounds). A runtime
that is not installed is left out and said so. Writes results/bench/runtimes.csv and
prints the table for the README.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

from common import ROOT, arguments, progress, ratios, run_plans, table, write_csv

from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import load_space
from paretoopt.measure.fingerprint import hardware_fingerprint
from paretoopt.measure.isa import int8_dot, this_machine
from paretoopt.study.trial import prepare

RUNTIMES = ("onnxruntime", "openvino", "executorch")


def plans(epochs: int) -> list[tuple[str, CompressionPlan]]:
    tune = {"distill": DistillConfig(2.0, 0.5), "finetune": FinetuneConfig(epochs, 1e-3, 64)}
    int8 = QuantConfig(8, scheme="symmetric", activations="int8")
    channel = PruneConfig("channel", 0.5, round_to=8)
    return [
        ("dense", CompressionPlan(**tune)),
        ("channel-0.5", CompressionPlan(channel, **tune)),
        ("int8", CompressionPlan(quant=int8, **tune)),
        ("channel-0.5 + int8", CompressionPlan(channel, int8, **tune)),
    ]


def main() -> int:
    args = arguments(__doc__)
    space = load_space(args.space)
    rows = []
    for runtime in RUNTIMES:
        if runtime != "onnxruntime" and importlib.util.find_spec(runtime) is None:
            progress(f"{runtime}: not installed (make extras); left out")
            continue
        target = dataclasses.replace(space.target, runtime=runtime)
        ctx = prepare(dataclasses.replace(space, target=target), ROOT / "results" / ".cache")
        for name, _, record, base, _seconds in run_plans(ctx, plans(args.epochs)):
            kernels = {e["kernel"] for e in record["layer_quant"].values()}
            rows.append(
                {
                    "runtime": runtime,
                    "plan": name,
                    **ratios(record, base),
                    "baseline_ms": round(base["latency_ms"], 4),
                    "kernels": "/".join(sorted(kernels)),
                    "int_kernels": record["int_kernels"],
                    "deploy_gap": round(record["deploy_gap"], 2),
                }
            )
            r = rows[-1]
            progress(f"{runtime:12s} {name:20s} acc {r['accuracy']:6.2f} x{r['speedup']:.2f}")
    write_csv(rows, "runtimes.csv", args.out)
    isa, machine = this_machine()
    print(
        f"machine: {hardware_fingerprint()['cpu']}, {machine}, int8 on {int8_dot(isa, machine)}\n"
    )
    print(
        table(
            rows,
            {
                "runtime": lambda r: r["runtime"],
                "plan": lambda r: r["plan"],
                "val acc %": lambda r: f"{r['accuracy']:.2f} ({r['accuracy_change']:+.2f})",
                "baseline ms": lambda r: f"{r['baseline_ms']:.4f}",
                "latency ms": lambda r: f"{r['latency_ms']:.4f}",
                "x faster": lambda r: f"{r['speedup']:.2f}",
                "kernels": lambda r: r["kernels"],
                "deploy gap": lambda r: f"{r['deploy_gap']:+.2f}",
            },
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
