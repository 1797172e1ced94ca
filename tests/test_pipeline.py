from __future__ import annotations

import copy
import statistics

import pytest
import torch

from paretoopt.compress.artifact import load_compressed
from paretoopt.compress.train import accuracy, logits_of
from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import parse_space
from paretoopt.results.pooling import pooled
from paretoopt.study.trial import (
    ARTIFACT,
    RUNTIME_FILE,
    calibrate,
    check_inputs,
    prepare,
    run_trial,
)

from .conftest import TINY


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    doc = copy.deepcopy(TINY)
    doc["target"]["sessions"] = 2  # each candidate timed in two sessions
    space = parse_space(doc)
    context = prepare(space, tmp_path_factory.mktemp("cache"), log=lambda _: None)
    calibrate(context, tmp_path_factory.mktemp("calibration"))
    return context


PLAN = CompressionPlan(
    PruneConfig("channel", 0.5),
    QuantConfig(4),
    DistillConfig(2.0, 0.5),
    FinetuneConfig(1, 1e-3),
)


def test_one_trial_measures_the_model_rebuilt_from_its_file(ctx, tmp_path):
    record = run_trial(ctx, PLAN, tmp_path / "7", seed=0)
    assert sorted(p.name for p in (tmp_path / "7").iterdir()) == sorted([ARTIFACT, RUNTIME_FILE])
    assert not (tmp_path / "7.partial").exists()
    assert record["size_bytes"] == (tmp_path / "7" / ARTIFACT).stat().st_size
    assert record["runtime_file_bytes"] == (tmp_path / "7" / RUNTIME_FILE).stat().st_size
    model = load_compressed(tmp_path / "7" / ARTIFACT, ctx.build_model)
    val = accuracy(logits_of(model, ctx.splits.val.x), ctx.splits.val.y)
    assert record["torch_accuracy"] == pytest.approx(val)
    assert record["accuracy"] == pytest.approx(val, abs=100 / len(ctx.splits.val))
    assert record["plan"] == PLAN.to_dict()
    assert record["params"] < sum(p.numel() for p in ctx.baseline.parameters())
    base = run_trial(ctx, CompressionPlan(), tmp_path / "0", seed=0)
    assert 0 < record["macs"] < base["macs"]  # removed channels cost no multiply-adds
    assert record["int_kernels"] is False and record["runtime"] == "onnxruntime"
    latency = record["latency"]
    assert latency["runs"] == 2 * 2 * 5 and latency["median_ms"] > 0  # 2 sessions
    assert len(latency["session_ratios"]) == 2
    assert latency["ratio_to_baseline"] == statistics.median(latency["session_ratios"])
    assert record["latency_ms"] == pytest.approx(
        ctx.calibration["reference_ms"] * latency["ratio_to_baseline"]
    )
    # the pruned graph is a structure of its own; the uncompressed one is the baseline's
    assert len(latency["structure"]) == 16 and latency["structure"] != base["latency"]["structure"]
    assert set(record["layer_bits"].values()) == {4}
    assert record["saliency"] == "l2"
    channels = record["layer_channels"]  # kept of the original, per layer
    assert channels[ctx.classifier][0] == channels[ctx.classifier][1]
    assert any(kept < original for kept, original in channels.values())
    assert set(record["timings"]) >= {"prune", "distill", "quantize", "write", "export", "measure"}
    stages = record["stages"]
    assert set(stages) == {
        "train",
        "compress",
        "export",
        "calibrate",
        "measure",
        "prescreen",
        "compare",
    }
    assert stages["prescreen"] == 0  # no gauge: nothing measured before fine-tuning
    assert stages["compare"] == 0  # no target.compare: measured in one runtime
    assert stages["train"] == record["timings"]["distill"] > 0
    assert stages["measure"] == pytest.approx(
        record["timings"]["evaluate"] + record["timings"]["measure"], abs=1e-3
    )
    assert latency["mode"] == "cpu" and latency["peak_memory_bytes"] is None


def test_the_baseline_trial_changes_nothing(ctx, tmp_path):
    record = run_trial(ctx, CompressionPlan(), tmp_path / "0", seed=0)
    base = accuracy(logits_of(ctx.baseline, ctx.splits.val.x), ctx.splits.val.y)
    assert record["accuracy"] == pytest.approx(base)
    # exactly the raw tensors, plus safetensors' 8-byte length and its JSON header
    data = sum(t.numel() * t.element_size() for t in ctx.baseline.state_dict().values())
    with open(tmp_path / "0" / ARTIFACT, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert record["size_bytes"] == 8 + header + data


def test_torch_runtime(ctx, tmp_path):
    import dataclasses

    from paretoopt.measure.target import Target

    spec = dataclasses.replace(ctx.space.target, runtime="torch")
    torch_ctx = dataclasses.replace(
        ctx,
        space=dataclasses.replace(ctx.space, target=spec),
        target=Target(spec, ctx.splits.val, ctx.splits.train.x[:1]),
    )
    torch.set_num_threads(2)
    calibrate(torch_ctx, tmp_path / "cal")
    record = run_trial(torch_ctx, PLAN, tmp_path / "1", seed=0)
    assert torch.get_num_threads() == 2  # timing at 1 thread did not leak into training
    assert record["runtime_file_bytes"] is None
    assert record["runtime"] == "torch"
    assert record["accuracy"] == pytest.approx(record["torch_accuracy"])
    assert not (tmp_path / "1" / RUNTIME_FILE).exists()
    assert record["latency"]["mode"] == "eager"


def test_the_baseline_cache_is_reused(tmp_path):
    space = parse_space(TINY)
    first = prepare(space, tmp_path, log=lambda _: None)
    second = prepare(space, tmp_path, log=lambda _: None)
    assert (first.baseline_source, second.baseline_source) == ("trained", "cache")
    for a, b in zip(
        first.baseline.state_dict().values(), second.baseline.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_check_inputs_finds_the_classes():
    model, splits = check_inputs(parse_space(TINY))
    assert splits.layout == {
        "kind": "tensor",
        "inputs": [{"name": "0", "shape": [1, 8, 8], "dtype": "float32"}],
    }
    assert model(splits.val.x[:2]).shape == (2, 10)


def test_paired_timing_ignores_one_disturbed_round(monkeypatch):
    import types

    from paretoopt.config.space import TargetSpec
    from paretoopt.measure import protocol

    now = {"ns": 0, "calls": 0}  # a fake clock: the models advance it, nothing sleeps
    monkeypatch.setattr(protocol, "time", types.SimpleNamespace(perf_counter_ns=lambda: now["ns"]))

    def candidate():
        now["calls"] += 1
        disturbed = 2 * 20 < now["calls"] <= 3 * 20  # the third round runs 4x slower
        now["ns"] += 4_000_000 if disturbed else 1_000_000

    def reference():
        now["ns"] += 2_000_000

    target = TargetSpec(warmup=0, warmup_s=0.0, repeats=5, iterations=20)
    ours, theirs, ratio = protocol.time_paired(candidate, reference, target)
    assert ours.runs == theirs.runs == 100
    assert ratio == 0.5  # the per-round ratios are 0.5, 0.5, 2.0, 0.5, 0.5
    assert theirs.median_ms == 2.0 and ours.median_ms == 1.0
    assert ours.spread == 4.0  # the disturbed round still shows in the spread


def test_unstructured_pruning_keeps_the_baselines_structure_and_shares_its_latency(ctx, tmp_path):
    """Dense kernels do not skip zeros: a float plan that only zeroes weights deploys the
    baseline's graph, so it pools with the baseline; pruned channels make another."""
    base = run_trial(ctx, CompressionPlan(), tmp_path / "0", seed=0)
    sparse = run_trial(ctx, CompressionPlan(PruneConfig("unstructured", 0.5)), tmp_path / "1", 0)
    narrow = run_trial(ctx, CompressionPlan(PruneConfig("channel", 0.5)), tmp_path / "2", 0)
    assert sparse["latency"]["structure"] == base["latency"]["structure"]
    assert narrow["latency"]["structure"] != base["latency"]["structure"]
    together = pooled(sparse, [base, narrow])
    assert together.latency.pooled_trials == 2 and together.latency.pooled_sessions == 4
