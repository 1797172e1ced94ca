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

3. With ``--study results/<study>`` (a finished search, e.g. ``make demo``), the
   figures the search reports, on that study:
   - one int8 model.onnx of its front timed 10 times with the study's protocol, a
     second apart, each in a fresh session: max/min of the 10 ratios <= 1.05, with how
     many were read at the machine's quiet level and how long each took;
   - its int8 trials of one deployed structure: max/min of their reported latencies
     <= 1.05 (and of the trials' own figures, before pooling);
   - every front trial's search-time latency within 5 % of its end-of-search
     confirmation.

Writes results/bench/latency.csv (with --study: latency_study.csv, and every reading of
the one file in latency_readings.csv) and prints the tables for the README, with the CPU's
int8 instruction set.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Record, arguments, context, progress, table, write_csv

from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.measure import OrtRunner, TorchRunner, runtime_threads, time_runner
from paretoopt.measure.isa import int8_dot, this_machine
from paretoopt.measure.structure import onnx_structure
from paretoopt.results.frames import StudyResults, load_results, trial_record
from paretoopt.study.trial import StudyContext, calibrate, run_trial, settled_latency

REPEATS = 10
TARGET_CV = 0.05
TARGET_MAX_MIN = 1.05  # one file timed again; trials of one structure
TARGET_CONFIRM = 0.05  # a front trial's search figure against its confirmation
SPACING_S = 1.0  # between the measurements of one file

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
    from paretoopt.study.trial import run_trial

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


def fresh_sessions(ctx: StudyContext, results: StudyResults, work: Path) -> list[Record]:
    """The fastest int8 front trial's model.onnx, timed REPEATS times with the study's
    protocol (each time in fresh sessions against the baseline): one row per reading."""
    number, file = int8_file(ctx, results, work)
    structure = onnx_structure(file)  # as a trial and its confirmation pass it
    readings = []
    for i in range(REPEATS):
        time.sleep(SPACING_S)  # not all in one stretch of the machine's state
        level = ctx.target.candidate_levels.get(structure)  # None: this is its first timing
        runner = OrtRunner(file, ctx.space.target.threads)
        start = time.perf_counter()
        figure = settled_latency(ctx, runner, file, structure)
        readings.append(
            {
                "trial": number,
                "reading": i + 1,
                "ratio": round(figure["ratio_to_baseline"], 5),
                "quiet": bool(figure["quiet"]),
                "quiet_pairs": figure["quiet_pairs"],
                "pairs": figure["pairs"],
                "tries": figure["tries"],
                "seconds": round(time.perf_counter() - start, 2),
                "error": figure["error"],
                "level_before_us": level and round(level * 1e3, 2),
                "candidate_min_us": round(figure["min_ms"] * 1e3, 2),
                "candidate_median_us": round(figure["median_ms"] * 1e3, 2),
                "baseline_median_us": round(figure["baseline_median_ms"] * 1e3, 2),
                "session_ratios": " ".join(f"{r:.5f}" for r in figure["session_ratios"]),
            }
        )
        r = readings[-1]
        progress(
            f"trial {number}, measurement {i + 1}: ratio {r['ratio']:.4f}, "
            f"{r['quiet_pairs']} of {r['pairs']} pairs quiet, {r['seconds']:.2f} s, "
            f"{r['tries']} tries; candidate {r['candidate_median_us']:.1f} us (fastest "
            f"{r['candidate_min_us']:.1f}), baseline {r['baseline_median_us']:.1f} us "
            "(medians of all rounds)"
        )
    return readings


def repeat_summary(readings: list[Record]) -> Record:
    """max/min of the readings, and of those not flagged (the spread the protocol itself
    leaves, beside the machine's disturbed stretches)."""
    measured = [r["ratio"] for r in readings]
    kept = [r["ratio"] for r in readings if r["quiet"]]
    sessions = [float(x) for r in readings for x in r["session_ratios"].split()]
    seconds = [r["seconds"] for r in readings]
    return {
        "trial": readings[0]["trial"],
        "measurements": len(measured),
        "quiet_measurements": len(kept),
        "sessions": len(sessions),
        "session_max_min": round(max(sessions) / min(sessions), 4),
        "max_min": round(max(measured) / min(measured), 4),
        "quiet_max_min": round(max(kept) / min(kept), 4) if kept else None,
        "median_s": round(statistics.median(seconds), 2),
        "max_s": round(max(seconds), 2),
    }


def int8_file(ctx: StudyContext, results: StudyResults, work: Path) -> tuple[int, Path]:
    """The fastest int8 front trial's model.onnx; where the front has none, the fastest
    front trial's plan run again with int8 activations (the file is written in `work`)."""
    front = results.pareto[~results.pareto["baseline"].astype(bool)]
    if front.empty:
        raise SystemExit(f"{results.name}: no compressed trial on the front to time")
    int8 = front[front["int_kernels"].fillna(False).astype(bool)]
    row = (int8 if len(int8) else front).sort_values("latency_ms").iloc[0]
    number = int(row["number"])
    if len(int8):
        return number, results.directory / str(row["artifact"]) / "model.onnx"
    plan = CompressionPlan.from_dict(trial_record(results, number).plan)
    weights = plan.quant if plan.quant.integer else QuantConfig(8)  # int8 needs integer weights
    plan = plan.replace(quant=dataclasses.replace(weights, activations="int8"))
    progress(f"no int8 trial on the front: trial {number}'s plan with int8 activations")
    run_trial(ctx, plan, work / "int8", seed=0)
    return number, work / "int8" / "model.onnx"


def structures(results: StudyResults) -> Record:
    """The int8 trials of each deployed structure held by two or more: the largest
    max/min of their reported latencies, and of their own figures before pooling."""
    done = results.trials[results.trials["state"] == "COMPLETE"]
    int8 = done[done["int_kernels"].fillna(False).astype(bool)]
    groups = [g for _, g in int8.groupby("latency_structure") if len(g) > 1]
    spread = [float(g["latency_ms"].max() / g["latency_ms"].min()) for g in groups]
    own = [float(g["latency_own_ms"].max() / g["latency_own_ms"].min()) for g in groups]
    return {
        "int8_trials": len(int8),
        "structures_shared": len(groups),
        "trials_in_them": sum(len(g) for g in groups),
        "reported_max_min": round(max(spread, default=1.0), 4),
        "own_max_min_median": round(statistics.median(own), 4) if own else None,
        "own_max_min_worst": round(max(own, default=1.0), 4),
    }


def confirmations(results: StudyResults) -> Record:
    """Each front trial's search-time latency against its end-of-search re-measurement."""
    front = results.pareto
    if "confirm_latency_ms" not in front:
        return {"front": len(front), "confirmed": 0, "worst_gap": None, "within": 0}
    confirmed = front[front["confirm_latency_ms"].notna()]
    gaps = (confirmed["latency_ms"] / confirmed["confirm_latency_ms"] - 1.0).abs()
    return {
        "front": len(front),
        "confirmed": len(confirmed),
        "worst_gap": round(float(gaps.max()), 4) if len(gaps) else None,
        "within": int((gaps <= TARGET_CONFIRM).sum()),
    }


def study_checks(study: Path, out: str) -> int:
    """Section 3: the figures of a finished study, checked against their targets."""
    results = load_results(study)
    ctx = context(study / "space.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        calibrate(ctx, Path(tmp) / "calibration")
        readings = fresh_sessions(ctx, results, Path(tmp))
    write_csv(readings, "latency_readings.csv", out)  # kept: a failure is traced from these
    again = repeat_summary(readings)
    shared, confirmed = structures(results), confirmations(results)
    isa, machine = this_machine()
    row = {"study": results.name, "int8_dot": int8_dot(isa, machine), **again}
    row.update({f"structure_{k}": v for k, v in shared.items()})
    row.update({f"confirm_{k}": v for k, v in confirmed.items()})
    write_csv([row], "latency_study.csv", out)
    checks = [
        (
            again["max_min"] <= TARGET_MAX_MIN,
            f"one int8 file timed {REPEATS} times, {SPACING_S:.0f} s apart: max/min "
            f"{again['max_min']:.3f}, {again['quiet_measurements']} read at the quiet level "
            f"(max/min of those: {again['quiet_max_min']}), "
            f"{again['median_s']} s each (at most {again['max_s']} s)",
        ),
        (
            shared["reported_max_min"] <= TARGET_MAX_MIN,
            f"{shared['structures_shared']} int8 "
            f"structures of {shared['trials_in_them']} trials: reported max/min "
            f"{shared['reported_max_min']:.3f} (own figures: median {shared['own_max_min_median']}"
            f", worst {shared['own_max_min_worst']})",
        ),
        (
            confirmed["within"] == confirmed["confirmed"] > 0,
            f"{confirmed['within']} of "
            f"{confirmed['confirmed']} confirmed front trials within {TARGET_CONFIRM:.0%} "
            f"(worst {confirmed['worst_gap']})",
        ),
    ]
    print(f"machine: {machine}, int8 on {row['int8_dot']}, flags {isa}")
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in checks) else 1


def main() -> int:
    args = arguments(__doc__, epochs=False, study=True)
    if args.study:
        return study_checks(Path(args.study), args.out)
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
