from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from paretoopt.compress.artifact import (
    decode_state_dict,
    load_compressed,
    pack_bits,
    read_metadata,
    save_compressed,
    unpack_bits,
)
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier
from paretoopt.compress.techniques.quantize import quantize_tensor
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec
from paretoopt.errors import ArtifactError
from paretoopt.workload.data import create_data
from paretoopt.workload.models import tiny_conv


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=1001)
    packed = pack_bits(codes, bits)
    assert packed.size == -(-1001 * bits // 8)  # exactly ceil(n*b/8) bytes
    assert np.array_equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
def test_quantize_grid(bits, granularity, scheme):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    w[0, 0] = 0.0
    q = quantize_tensor(w, QuantConfig(bits, granularity, scheme))
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    deq = q.dequantize()
    assert torch.all(deq[0, 0] == 0.0)  # zero is exact, so pruned weights stay pruned
    error = (deq - w).abs().reshape(6, -1).max(dim=1).values
    scale = q.scale.expand(6)
    assert torch.all(error <= scale / 2 + 1e-6), (error, scale)
    assert q.scale.numel() == (6 if granularity == "per_channel" else 1)


def test_affine_uses_every_level_between_min_and_max():
    w = torch.linspace(-1.0, 3.0, 256).reshape(1, 256)
    q = quantize_tensor(w, QuantConfig(4))
    assert int(q.codes.min()) == 0 and int(q.codes.max()) == 15


@pytest.fixture(scope="module")
def splits():
    return create_data(ComponentSpec(name="digits", kwargs={"size": 8}))


def _bench(splits, seed=0):
    torch.manual_seed(seed)
    model = tiny_conv().eval()
    return Workbench(
        model, splits, logits_of(model, splits.train.x), find_classifier(model, splits.train.x[:1])
    )


PLANS = {
    "dense-fp32": CompressionPlan(),
    "unstructured-int4": CompressionPlan(PruneConfig("unstructured", 0.7), QuantConfig(4)),
    "unstructured-fp32": CompressionPlan(PruneConfig("unstructured", 0.8)),
    "unstructured-per-tensor-sym-3": CompressionPlan(
        PruneConfig("unstructured", 0.8), QuantConfig(3, "per_tensor", "symmetric")
    ),
    "unstructured-fp16": CompressionPlan(PruneConfig("unstructured", 0.5), QuantConfig(16)),
    "channel-residual-int3": CompressionPlan(PruneConfig("channel", 0.5), QuantConfig(3)),
    "channel-per-tensor-sym-8": CompressionPlan(
        PruneConfig("channel", 0.25), QuantConfig(8, "per_tensor", "symmetric")
    ),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_compressed_file_reloads_to_the_same_outputs(name, splits, tmp_path):
    plan = PLANS[name]
    bench = _bench(splits)
    apply_plan(bench, plan)
    size = save_compressed(tmp_path / "m.safetensors", bench, plan)
    assert size == (tmp_path / "m.safetensors").stat().st_size
    model = load_compressed(tmp_path / "m.safetensors", tiny_conv)
    x = splits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))
    assert read_metadata(tmp_path / "m.safetensors")["plan"] == plan.to_dict()


def test_sizes_follow_the_plan(splits, tmp_path):
    sizes = {}
    for name, plan in PLANS.items():
        bench = _bench(splits)
        apply_plan(bench, plan)
        sizes[name] = save_compressed(tmp_path / f"{name}.safetensors", bench, plan)
    assert sizes["unstructured-int4"] < sizes["unstructured-fp16"] < sizes["dense-fp32"]
    assert sizes["unstructured-fp32"] < sizes["dense-fp32"] * 0.6
    assert sizes["channel-residual-int3"] < sizes["channel-per-tensor-sym-8"]


def test_packed_weight_costs_ceil_bits(splits, tmp_path):
    plan = CompressionPlan(quant=QuantConfig(3))
    bench = _bench(splits)
    apply_plan(bench, plan)
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    from safetensors.numpy import load_file

    arrays = load_file(str(tmp_path / "m.safetensors"))
    weight = bench.model.state_dict()["0.0.weight"]
    assert arrays["0.0.weight::codes"].size == -(-weight.numel() * 3 // 8)


def test_sparse_weights_store_a_mask_and_the_kept_values_only(splits, tmp_path):
    from safetensors.numpy import load_file

    plan = CompressionPlan(PruneConfig("unstructured", 0.8))
    bench = _bench(splits)
    apply_plan(bench, plan)
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    arrays = load_file(str(tmp_path / "m.safetensors"))
    weight = bench.model.state_dict()["6.weight"]
    assert arrays["6.weight::values"].size == int((weight != 0).sum())
    assert arrays["6.weight::mask"].size == -(-weight.numel() // 8)


def test_unstructured_global_sparsity_is_exact(splits):
    bench = _bench(splits)
    apply_plan(bench, CompressionPlan(PruneConfig("unstructured", 0.6, distribution="global")))
    weights = [
        m.weight
        for m in bench.model.modules()
        if hasattr(m, "weight") and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros / total == pytest.approx(0.6, abs=1 / total + 1e-9)


def test_channel_pruning_keeps_classifier_and_shrinks_model(splits):
    bench = _bench(splits)
    before = sum(p.numel() for p in bench.model.parameters())
    apply_plan(bench, CompressionPlan(PruneConfig("channel", 0.5)))
    after = sum(p.numel() for p in bench.model.parameters())
    assert after < 0.5 * before
    classifier = dict(bench.model.named_modules())[bench.classifier]
    assert classifier.out_features == 10
    assert bench.model(splits.val.x[:4]).shape == (4, 10)
    assert bench.pruning_history


def test_per_layer_budgets_differ_by_layer(splits):
    bench = _bench(splits)
    scales = {"0.0": 0.0, "6": 1.5}
    plan = PruneConfig("unstructured", 0.5, distribution="per_layer", layer_scale=scales)
    apply_plan(bench, CompressionPlan(plan))
    sparsity = bench.records["layer_sparsity"]
    assert sparsity["0.0"] == 0.0
    assert sparsity["6"] == pytest.approx(0.75, abs=0.01)
    assert sparsity["1.0"] == pytest.approx(0.5, abs=0.01)


def test_fine_tuning_keeps_pruned_weights_at_zero(splits):
    from paretoopt.config.parts.distill import DistillConfig
    from paretoopt.config.parts.finetune import FinetuneConfig

    bench = _bench(splits)
    plan = CompressionPlan(
        PruneConfig("unstructured", 0.7),
        distill=DistillConfig(2.0, 0.5),
        finetune=FinetuneConfig(1, 1e-2),
    )
    apply_plan(bench, plan)
    for name, mask in bench.masks.items():
        weight = dict(bench.model.named_parameters())[name]
        assert torch.all(weight[mask == 0] == 0), name
    assert len(bench.records["finetune_loss"]) == 1


def test_reading_a_foreign_file_fails_clearly(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ArtifactError, match="not a paretoopt compressed model"):
        decode_state_dict(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a readable compressed model"):
        read_metadata(tmp_path / "junk.safetensors")


def test_loading_into_the_wrong_architecture_fails_clearly(splits, tmp_path):
    plan = CompressionPlan()
    bench = _bench(splits)
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    from paretoopt.workload.models import mlp

    with pytest.raises(ArtifactError, match="does not fit the model"):
        load_compressed(tmp_path / "m.safetensors", lambda: mlp(in_features=64))
    assert copy.deepcopy(plan) == plan


def test_a_channel_removal_that_does_not_replay_fails_clearly(splits, tmp_path):
    plan = CompressionPlan(PruneConfig("channel", 0.5))
    bench = _bench(splits)
    apply_plan(bench, plan)
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    assert load_compressed(tmp_path / "m.safetensors", tiny_conv)(splits.val.x[:2]).shape == (2, 10)
    from paretoopt.workload.models import mlp

    with pytest.raises(ArtifactError, match="its channel removal does not replay on this model"):
        load_compressed(tmp_path / "m.safetensors", lambda: mlp(in_features=64))


@pytest.mark.parametrize("round_to", [1, 8])
def test_channel_pruning_is_monotone_and_rounded(splits, round_to):
    from paretoopt.workload.models import conv

    widths = []
    for sparsity in (0.3, 0.8, 0.95):
        torch.manual_seed(0)
        model = conv(image_size=8).eval()
        bench = Workbench(
            model,
            splits,
            logits_of(model, splits.train.x),
            find_classifier(model, splits.train.x[:1]),
        )
        apply_plan(bench, CompressionPlan(PruneConfig("channel", sparsity, round_to=round_to)))
        convs = [m.out_channels for m in bench.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c % round_to == 0 and c >= round_to for c in convs), convs
        widths.append(sum(p.numel() for p in bench.model.parameters()))
    assert widths == sorted(widths, reverse=True), widths
