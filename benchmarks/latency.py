"""Latency benchmark on the shipped conv study: how repeatable the measurement is, and
what isolation from training is worth.

    python benchmarks/latency.py            # or: make bench

1. Repeatability: the baseline in the target runtime, measured 10 times with the study's
   protocol; the coefficient of variation (standard deviation / mean) of the 10 medians
   must stay under 5 %. The same for the paired candidate/baseline ratio of a half-width
   model, the figure the search actually uses.
2. Isolation: the baseline measured while another process fine-tunes a model on this
   machine, once with that process passing the measurement gate at every step (as every
   paretoopt process does) and once without it.

Writes results/bench/latency.csv and prints the tables for the README.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Record, arguments, context, progress, table, write_csv

from paretoopt.measure import TorchRunner, runtime_threads, time_runner
from paretoopt.pipeline import StudyContext, calibrate
from paretoopt.plan import CompressionPlan, PruneConfig

REPEATS = 10
TARGET_CV = 0.05

# a training loop in another process: the same work a worker's fine-tuning does
TRAINER = """
import sys, torch
from paretoopt.measure.gate import MeasurementGate
from contextlib import nullcontext
torch.set_num_threads(2)
gated = sys.argv[1] == "gated"
gate = MeasurementGate()
model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64 * 256, 10))
opt = torch.optim.Adam(model.parameters())
x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
print("ready", flush=True)
while True:
    with gate.computing() if gated else nullcontext():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
"""


def repeatability(ctx: StudyContext, work: Path) -> list[Record]:
    """The baseline's median, and a candidate's paired ratio, each measured REPEATS times."""
    from paretoopt.pipeline import run_trial

    assert ctx.target.reference is not None
    run = ctx.target.reference.timer(ctx.target.batch)
    medians = []
    for i in range(REPEATS):
        with ctx.target.gate.measuring():
            medians.append(time_runner(run, ctx.space.target).median_ms)
        progress(f"baseline measurement {i + 1}: {medians[-1]:.4f} ms")
    plan = CompressionPlan(PruneConfig("channel", 0.5, round_to=8))
    ratios = []
    for i in range(REPEATS):
        record = run_trial(ctx, plan, work / f"half-{i}", seed=0)
        ratios.append(record["latency"]["ratio_to_baseline"])
        progress(f"half-width candidate {i + 1}: ratio {ratios[-1]:.4f}")
    return [_summary("baseline median (ms)", medians), _summary("half-width / baseline", ratios)]


def _summary(name: str, values: list[float]) -> Record:
    mean = statistics.fmean(values)
    return {
        "figure": name,
        "runs": len(values),
        "mean": round(mean, 5),
        "min": round(min(values), 5),
        "max": round(max(values), 5),
        "cv": round(statistics.stdev(values) / mean, 4),
    }


def isolation(ctx: StudyContext) -> list[Record]:
    """The baseline's median alone, beside a gated trainer, beside an ungated one, in the
    study's runtime and in eager PyTorch with 2 threads (whose worker threads suffer most
    from a neighbour: they wait for each other at every operator)."""
    assert ctx.target.reference is not None
    runners = {
        "onnxruntime, 1 thread": ctx.target.reference,
        "torch eager, 2 threads": TorchRunner(ctx.baseline, 2),
    }
    rows = []
    for setting in ("quiet", "gated", "ungated"):
        trainer = _start_trainer(setting) if setting != "quiet" else None
        try:
            row: Record = {"beside": setting}
            for name, runner in runners.items():
                run = runner.timer(ctx.target.batch)
                medians = []
                with runtime_threads(runner):
                    for _ in range(3):
                        with ctx.target.gate.measuring():
                            medians.append(time_runner(run, ctx.space.target).median_ms)
                row[name] = round(statistics.median(medians), 4)
        finally:
            if trainer is not None:
                trainer.kill()
                trainer.wait()
        rows.append(row)
        progress(f"beside {setting} training: {row}")
    return rows


def _start_trainer(setting: str) -> subprocess.Popen[str]:
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, setting], stdout=subprocess.PIPE, text=True
    )
    assert trainer.stdout is not None
    trainer.stdout.readline()  # "ready": the model is built and the loop is starting
    time.sleep(1.0)
    return trainer


def main() -> int:
    args = arguments(__doc__, epochs=False)
    ctx = context(args.space)
    with tempfile.TemporaryDirectory() as tmp:
        cal = calibrate(ctx, Path(tmp) / "calibration")
        progress(f"calibration: {cal['reference_ms']:.4f} ms, spread {cal['spread']:.3f}")
        repeat = repeatability(ctx, Path(tmp))
    isolated = isolation(ctx)
    write_csv(repeat, "latency.csv", args.out)
    write_csv(isolated, "latency_isolation.csv", args.out)
    print(
        table(
            repeat,
            {
                "figure": lambda r: r["figure"],
                "runs": lambda r: str(r["runs"]),
                "mean": lambda r: f"{r['mean']:.4f}",
                "min": lambda r: f"{r['min']:.4f}",
                "max": lambda r: f"{r['max']:.4f}",
                "CV": lambda r: f"{r['cv'] * 100:.2f} %",
            },
        )
    )
    print()
    quiet = isolated[0]
    print(
        table(
            isolated,
            {
                "measured beside": lambda r: r["beside"],
                **{
                    f"{name} (ms)": lambda r, n=name: f"{r[n]:.4f} ({r[n] / quiet[n]:.2f}x)"
                    for name in ("onnxruntime, 1 thread", "torch eager, 2 threads")
                },
            },
        )
    )
    ok = repeat[0]["cv"] < TARGET_CV
    print(
        f"\n{'PASS' if ok else 'FAIL'}  baseline latency CV {repeat[0]['cv'] * 100:.2f} % "
        f"over {REPEATS} measurements (target: < {TARGET_CV * 100:.0f} %)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
