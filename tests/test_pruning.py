"""Contract tests of the pruning dimensions: every combination runs, is exact, exports."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier, prunable_layers
from paretoopt.compress.techniques.prune import cubic_ratios
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec
from paretoopt.workload.data import Split, Splits, create_data
from paretoopt.workload.models import conv

from .user_model import SignalNet, signals

SALIENCIES = ("l1", "l2", "taylor", "hessian")


@pytest.fixture(scope="module")
def digits():
    return create_data(ComponentSpec(name="digits", kwargs={"size": 8}))


@pytest.fixture(scope="module")
def waves():
    parts = [
        Split(torch.stack([x for x, _ in d]), torch.stack([y for _, y in d])) for d in signals()
    ]
    return Splits(*parts)


def bench_for(model, splits, seed=0):
    torch.manual_seed(seed)
    model = model.eval()
    return Workbench(
        model,
        splits,
        logits_of(model, splits.train.x),
        find_classifier(model, splits.train.x[:1]),
        seed=seed,
    )


def plan_of(structure, saliency, schedule="one_shot", sparsity=0.5, epochs=1, **extra):
    return CompressionPlan(
        PruneConfig(structure, sparsity, saliency, schedule=schedule, **extra),
        distill=DistillConfig(2.0, 0.5),
        finetune=FinetuneConfig(epochs, 1e-3, 64),
    )


@pytest.mark.parametrize(
    ("structure", "saliency", "schedule"),
    list(itertools.product(("unstructured", "channel"), SALIENCIES, ("one_shot", "gradual"))),
)
def test_every_combination_yields_a_model_that_runs(digits, structure, saliency, schedule):
    bench = bench_for(conv(image_size=8, width=8, hidden=16), digits)
    apply_plan(bench, plan_of(structure, saliency, schedule))
    out = bench.model(digits.val.x[:5])
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert bench.records["saliency"] == saliency
    widths = [kept for kept, _ in bench.records["layer_channels"].values()]
    before = [w for w, _ in bench.original.values()]
    if structure == "channel":
        assert sum(widths) < sum(before)
    else:
        assert widths == before and max(bench.records["layer_sparsity"].values()) > 0.3


@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_sparsity_zero_is_the_identity(digits, structure, saliency):
    bench = bench_for(conv(image_size=8, width=8, hidden=16), digits)
    before = copy.deepcopy(bench.model.state_dict())
    apply_plan(bench, plan_of(structure, saliency, sparsity=0.0, epochs=0))
    after = bench.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("saliency", SALIENCIES)
def test_uniform_unstructured_reaches_the_budget_in_every_layer(digits, saliency):
    bench = bench_for(conv(image_size=8, width=8, hidden=16), digits)
    apply_plan(bench, plan_of("unstructured", saliency, sparsity=0.7, epochs=0))
    for name, layer in prunable_layers(bench.model).items():
        n = layer.weight.numel()
        reached = bench.records["layer_sparsity"][name]
        assert abs(reached - 0.7) <= 1 / n + 1e-9, (name, reached)


@pytest.mark.parametrize("saliency", SALIENCIES)
def test_uniform_channel_pruning_reaches_the_budget_within_rounding(digits, saliency):
    bench = bench_for(conv(image_size=8, width=16, hidden=32), digits)
    apply_plan(bench, plan_of("channel", saliency, sparsity=0.5, epochs=0))
    channels = bench.records["layer_channels"]
    for name, (kept, original) in channels.items():
        if name == bench.classifier:
            assert kept == original
        else:
            assert kept == original - int(original * 0.5), (name, kept, original)


def test_gradual_unstructured_ends_at_the_budget(digits):
    bench = bench_for(conv(image_size=8, width=8, hidden=16), digits)
    plan = plan_of("unstructured", "l2", "gradual", sparsity=0.8, epochs=2, gradual_steps=3)
    apply_plan(bench, plan)
    for name, layer in prunable_layers(bench.model).items():
        assert abs(bench.records["layer_sparsity"][name] - 0.8) <= 1 / layer.weight.numel() + 1e-9


def test_cubic_schedule():
    levels = cubic_ratios(0.8, 4)
    assert levels[0] == 0.0 and levels[-1] == pytest.approx(0.8)
    steps = [b - a for a, b in itertools.pairwise(levels)]
    assert steps == sorted(steps, reverse=True)  # fast early, slow late
    assert levels[1] == pytest.approx(0.8 * (1 - 0.75**3))


def test_regrowth_moves_weights_at_constant_sparsity(digits):
    bench = bench_for(conv(image_size=8, width=8, hidden=16), digits)
    plan = plan_of("unstructured", "l2", sparsity=0.7, epochs=2, regrowth=True, regrowth_interval=3)
    apply_plan(bench, CompressionPlan(plan.prune))  # prune only: the masks before regrowth
    masks_before = {k: v.clone() for k, v in bench.masks.items()}
    bench = bench_for(conv(image_size=8, width=8, hidden=16), digits)
    apply_plan(bench, plan)
    moved = sum(int((bench.masks[k] != masks_before[k]).sum()) for k in bench.masks)
    assert moved > 0
    for name, mask in bench.masks.items():
        assert int(mask.sum()) == int(masks_before[name].sum()), name  # constant sparsity
        weight = dict(bench.model.named_parameters())[name]
        assert torch.all(weight[mask == 0] == 0)


def test_residual_batchnorm_depthwise_model_is_pruned_and_exports(waves, tmp_path):
    from paretoopt.measure import OrtRunner, export_onnx

    bench = bench_for(SignalNet(channels=16), waves)
    apply_plan(bench, plan_of("channel", "l2", sparsity=0.5, epochs=1))
    channels = bench.records["layer_channels"]
    assert channels["out"] == [3, 3]  # the classifier keeps its outputs
    assert channels["fc"][0] < channels["fc"][1]
    assert bench.model(waves.val.x[:4]).shape == (4, 3)
    export_onnx(bench.model, waves.train.x[:1], tmp_path / "m.onnx")
    ours = logits_of(bench.model, waves.val.x[:8]).numpy()
    theirs = OrtRunner(tmp_path / "m.onnx", 1)(waves.val.x[:8].numpy())
    assert abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("saliency", ["l2", "taylor"])
def test_global_channel_pruning_keeps_every_layer_and_reaches_the_level(digits, round_to, saliency):
    bench = bench_for(conv(image_size=8, width=16, hidden=32), digits)
    before = sum(p.numel() for p in bench.model.parameters())
    plan = plan_of(
        "channel", saliency, sparsity=0.6, epochs=0, distribution="global", round_to=round_to
    )
    apply_plan(bench, plan)
    for name, (kept, _) in bench.records["layer_channels"].items():
        if name != bench.classifier:
            assert kept >= round_to and kept % round_to == 0, (name, kept)
    assert sum(p.numel() for p in bench.model.parameters()) < 0.6 * before


def test_gradual_channel_pruning_trains_in_training_mode(digits):
    bench = bench_for(conv(image_size=8, width=16, hidden=32), digits)
    modes = []
    bench.step_hooks.append(lambda step, total: modes.append(bench.model.training) or False)
    apply_plan(bench, plan_of("channel", "l2", "gradual", sparsity=0.5, epochs=2))
    assert modes and all(modes[1:])  # after every removal the model trains again
    widths = [kept for kept, _ in bench.records["layer_channels"].values()]
    assert sum(widths) < sum(w for w, _ in bench.original.values())
