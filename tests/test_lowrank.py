"""Low-rank factorization: the contract of the factors, the file and the space."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from paretoopt.compress.artifact import load_compressed, read_metadata, save_compressed
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier, prunable_layers
from paretoopt.compress.techniques.lowrank import (
    factored_size,
    factorize,
    full_ranks,
    kept_rank,
    plan_ranks,
)
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.lowrank import LowRankConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec, load_space
from paretoopt.errors import ArtifactError, PlanError, SpaceError
from paretoopt.results.record import layer_rows
from paretoopt.workload.data import create_data
from paretoopt.workload.models import tiny_conv

from .conftest import write_space

LAYERS = {
    "linear": (lambda: nn.Linear(20, 12), (3, 20)),
    "conv3x3-strided": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv1x1-padded": (lambda: nn.Conv2d(6, 8, 1, padding=1), (2, 6, 5, 5)),
    "conv1d-dilated": (lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2), (2, 4, 11)),
    "conv-reflect": (lambda: nn.Conv2d(3, 7, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
}


def _layer(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = LAYERS[name]
    return build().eval(), torch.randn(*shape)


@pytest.mark.parametrize("name", list(LAYERS))
def test_full_rank_reproduces_the_layer(name):
    layer, x = _layer(name)
    factors = factorize(layer, full_ranks(layer))
    with torch.no_grad():
        assert factors(x).shape == layer(x).shape
        torch.testing.assert_close(factors(x), layer(x), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_error_falls_as_the_rank_grows(name):
    layer, x = _layer(name)
    errors = []
    with torch.no_grad():
        reference = layer(x)
        for share in (0.2, 0.4, 0.6, 0.8, 1.0):
            ranks = plan_ranks(layer, LowRankConfig(rank=share), share)
            errors.append(float((factorize(layer, ranks)(x) - reference).norm() / reference.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5 and errors[0] > 0.1


def test_the_energy_criterion_keeps_the_least_rank_holding_the_share():
    values = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert kept_rank(values, LowRankConfig(criterion="energy", energy=0.7), 1.0) == 1
    assert kept_rank(values, LowRankConfig(criterion="energy", energy=0.8), 1.0) == 2
    assert kept_rank(values, LowRankConfig(criterion="energy", energy=20 / 22), 1.0) == 2
    assert kept_rank(values, LowRankConfig(criterion="energy", energy=0.99), 1.0) == 4
    assert kept_rank(values, LowRankConfig(rank=0.5), 0.5) == 2
    assert kept_rank(values, LowRankConfig(rank=0.01), 0.01) == 1


def test_a_rank_r_linear_layer_is_the_best_rank_r_approximation():
    torch.manual_seed(1)
    layer = nn.Linear(16, 10)
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w)
    factors = factorize(layer, (3,))
    product = (factors[1].weight @ factors[0].weight).double()
    torch.testing.assert_close(product, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    assert factors[0].bias is None and torch.equal(factors[1].bias, layer.bias)


# --------------------------------------------------------------------------- the technique


@pytest.fixture(scope="module")
def splits():
    return create_data(ComponentSpec(name="digits", kwargs={"size": 8}))


def _bench(splits) -> Workbench:
    torch.manual_seed(0)
    model = tiny_conv().eval()
    return Workbench(
        model, splits, logits_of(model, splits.train.x), find_classifier(model, splits.train.x[:1])
    )


def test_only_layers_that_get_smaller_are_factorized(splits):
    bench = _bench(splits)
    before = {n: copy.deepcopy(m) for n, m in prunable_layers(bench.model).items()}
    apply_plan(bench, CompressionPlan(lowrank=LowRankConfig(rank=0.5)))
    assert bench.factorized, "rank 0.5 factorizes some layer of the tiny CNN"
    assert bench.classifier not in bench.factorized  # the output layer stays whole
    layers = prunable_layers(bench.model)
    for name, layer in before.items():
        if name in bench.factorized:
            ranks = tuple(bench.factorized[name]["ranks"])
            assert ranks == plan_ranks(layer, LowRankConfig(rank=0.5), 0.5)
            assert factored_size(layer, ranks) < layer.weight.numel()
            assert name not in layers and f"{name}.0" in layers
        else:
            ranks = plan_ranks(layer, LowRankConfig(rank=0.5), 0.5)
            kept_whole = name == bench.classifier or getattr(layer, "groups", 1) > 1
            assert kept_whole or factored_size(layer, ranks) >= layer.weight.numel()
            assert name in layers


def test_the_file_rebuilds_the_factors_exactly(splits, tmp_path):
    plan = CompressionPlan(PruneConfig("channel", 0.25), LowRankConfig(rank=0.5), QuantConfig(4))
    bench = _bench(splits)
    apply_plan(bench, plan)
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["factorization"] == {
        n: {"kind": e["kind"], "ranks": e["ranks"]} for n, e in bench.factorized.items()
    }
    model = load_compressed(tmp_path / "m.safetensors", tiny_conv)
    x = splits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))


def test_factors_take_their_layer_s_bit_width_and_the_record_names_their_ranks(splits):
    bench = _bench(splits)
    names = list(prunable_layers(bench.model))
    bits = {n: (3 if i % 2 else 6) for i, n in enumerate(names)}
    plan = CompressionPlan(LowRankConfig(rank=0.5), QuantConfig(6, layer_bits=bits))
    apply_plan(bench, plan)
    for name in bench.factorized:
        factors = [n for n in prunable_layers(bench.model) if n.startswith(f"{name}.")]
        assert factors and all(bench.quantized[f"{f}.weight"].bits == bits[name] for f in factors)
        entry = bench.factorized[name]
        if entry["kind"] == "svd":
            assert bench.records["layer_rank"][f"{name}.0"] == [entry["ranks"][0], entry["full"][0]]
            assert bench.records["layer_rank"][f"{name}.1"] == [entry["ranks"][0], entry["full"][0]]
        else:
            assert bench.records["layer_rank"][f"{name}.0"] == [entry["ranks"][0], entry["full"][0]]
            assert bench.records["layer_rank"][f"{name}.2"] == [entry["ranks"][1], entry["full"][1]]
    rows = {r["layer"]: r for r in layer_rows(bench.records)}
    for layer, (rank, full) in bench.records["layer_rank"].items():
        assert (rows[layer]["rank"], rows[layer]["full_rank"]) == (rank, full)


def test_the_explorer_shows_each_factor_s_rank_and_each_clustered_layer_s_values(splits):
    from paretoopt.results.explore import layer_table
    from paretoopt.results.figures import layers_figure
    from paretoopt.study.trial import _layer_quant

    bench, plan = (
        _bench(splits),
        CompressionPlan(LowRankConfig(rank=0.5), QuantConfig(4, grid="kmeans")),
    )
    apply_plan(bench, plan)
    quant = {n: dataclasses.asdict(q) for n, q in _layer_quant(plan, bench, set(), {}).items()}
    table = layer_table({**bench.records, "layer_quant": quant}).set_index("layer")
    ranks = bench.records["layer_rank"]
    assert ranks and set(ranks) <= set(table.index)
    for name, row in table.iterrows():
        assert row["rank"] == (f"{ranks[name][0]}/{ranks[name][1]}" if name in ranks else "")
        assert row["clusters"] == 16 and row["bits"] == 4  # every layer shares 2^4 values
    bars = layers_figure(table.reset_index()).data
    labels = dict(
        zip((x for b in bars for x in b.x), (t for b in bars for t in b.text), strict=True)
    )
    for name in table.index:
        assert labels[name] == (f"r {table.loc[name, 'rank']} k 16" if name in ranks else "k 16")


def test_a_quant_layer_name_that_is_no_layer_is_still_refused(splits):
    plan = CompressionPlan(
        LowRankConfig(rank=0.5),
        QuantConfig(4, layer_bits={"nothing": 4}),
    )
    with pytest.raises(PlanError, match="'nothing'"):
        apply_plan(_bench(splits), plan)


def _rewrite(path, change):
    meta = {k: v for k, v in read_metadata(path).items()}
    arrays = load_file(str(path))
    change(meta)
    out = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    save_file(arrays, str(path), metadata=out)


@pytest.mark.parametrize(
    "ranks, rule",
    [([10**9, 1], r"rank 1000000000 is not in 1\.\."), ([0, 1], "rank 0"), ([2], "needs 2")],
)
def test_a_file_with_impossible_ranks_is_refused_before_anything_is_allocated(
    splits, tmp_path, ranks, rule
):
    plan = CompressionPlan(lowrank=LowRankConfig(rank=0.5))
    bench = _bench(splits)
    apply_plan(bench, plan)
    path = tmp_path / "m.safetensors"
    save_compressed(path, bench, plan)
    tucker = next(n for n, e in bench.factorized.items() if e["kind"] == "tucker2")

    def change(meta):
        meta["factorization"][tucker]["ranks"] = ranks

    _rewrite(path, change)
    with pytest.raises(ArtifactError, match=f"low-rank factorization does not replay.*{rule}"):
        load_compressed(path, tiny_conv)


# --------------------------------------------------------------------------- plan and space


def test_the_plan_round_trips_and_reads_in_its_summary():
    plan = CompressionPlan(lowrank=LowRankConfig(rank=0.25, layer_scale={"a": 2.0, "b": 0.5}))
    assert CompressionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert "rank 0.25 per-layer" in plan.summary()
    energy = CompressionPlan(lowrank=LowRankConfig(criterion="energy", energy=0.95))
    assert "rank e0.95" in energy.summary() and not energy.is_identity
    assert CompressionPlan(lowrank=LowRankConfig(rank=1.0)).is_identity
    assert plan.lowrank.share("a") == 0.5 and plan.lowrank.share("b") == 0.125


def test_a_stored_plan_of_version_3_reads_without_factorization():
    stored = CompressionPlan(QuantConfig(8)).to_dict()
    stored.pop("lowrank")
    stored["version"] = 3
    assert CompressionPlan.from_dict(stored).lowrank == LowRankConfig()


@pytest.mark.parametrize(
    "config, rule",
    [
        ({"rank": 0.0}, "lowrank.rank: 0 < rank <= 1"),
        ({"criterion": "tucker"}, "lowrank.criterion: 'tucker' is not supported"),
        ({"criterion": "energy", "energy": 0.9, "layer_scale": {"a": 1.0}}, "criterion ratio"),
    ],
)
def test_a_bad_config_says_the_rule(config, rule):
    with pytest.raises(PlanError, match=rule):
        LowRankConfig(**config)


@pytest.mark.parametrize(
    "prune",
    [
        PruneConfig("channel", 0.5, schedule="gradual", gradual_steps=2),
        PruneConfig("unstructured", 0.6),
    ],
    ids=["gradual-channel", "unstructured"],
)
def test_pruning_acts_on_the_factors_and_the_file_replays_both(splits, tmp_path, prune):
    plan = CompressionPlan(prune, LowRankConfig(rank=0.5), FinetuneConfig(epochs=1))
    bench = _bench(splits)
    apply_plan(bench, plan)
    layers = prunable_layers(bench.model)
    factors = [n for n in layers if n.rpartition(".")[0] in bench.factorized]
    assert factors
    if prune.structure == "unstructured":  # the factors are masked, not dense
        assert all(f"{n}.weight" in bench.masks for n in factors)
    else:  # the rank itself may narrow: the record reads the factors as they end
        for name, (rank, full) in bench.records["layer_rank"].items():
            assert rank <= full and rank in layers[name].weight.shape[:2]
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    model = load_compressed(tmp_path / "m.safetensors", tiny_conv)
    x = splits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))


def test_a_knob_that_cannot_act_is_an_error(tmp_path, tiny_doc):
    tiny_doc["space"]["lowrank"] = {"energy": {"low": 0.5, "high": 0.9}}
    with pytest.raises(SpaceError, match="space.lowrank.energy: searched, but the criterion"):
        load_space(write_space(tmp_path / "s.yaml", tiny_doc))


def test_a_study_searches_ranks_and_records_them(tmp_path, tiny_doc):
    from paretoopt.results.frames import layers_frame
    from paretoopt.study.search import search

    tiny_doc["search"] = {"trials": 4, "seed": 0, "anchors": 0}
    tiny_doc["space"]["pruning"] = {"sparsity": 0.0}
    tiny_doc["space"]["quantization"] = {"bits": [8, 32], "activations": ["float", "int8"]}
    tiny_doc["space"]["lowrank"] = {"rank": {"low": 0.2, "high": 0.6}}
    space = load_space(write_space(tmp_path / "s.yaml", tiny_doc))
    results = search(space, results_root=tmp_path / "r")
    done = results.trials[results.trials["state"] == "COMPLETE"]
    assert len(done) == 4, results.trials[["number", "state", "fail_reason"]]
    assert done["plan"].iloc[1:].str.contains("rank 0.").all()
    layers = layers_frame(results)
    factored = layers[layers["trial"] > 0]
    ranked = factored[factored["rank"].notna()]
    assert len(ranked) and (ranked["rank"] <= ranked["full_rank"]).all()
    assert layers.loc[layers["trial"] == 0, "rank"].isna().all()


# --------------------------------------------------------------------------- spatial


SPATIAL = {
    "conv3x3-strided": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv5x3-dilated": (
        lambda: nn.Conv2d(4, 5, (5, 3), stride=(2, 1), padding=(2, 3), dilation=(1, 2)),
        (2, 4, 11, 10),
    ),
}


@pytest.mark.parametrize("name", list(SPATIAL))
def test_a_spatial_split_at_full_rank_reproduces_the_layer_and_its_error_falls_with_rank(name):
    torch.manual_seed(0)
    build, shape = SPATIAL[name]
    layer, x = build().eval(), torch.randn(*shape)
    full = full_ranks(layer, "spatial")
    factors = factorize(layer, full, "spatial")
    assert [tuple(f.weight.shape[2:]) for f in factors] == [(layer.kernel_size[0], 1)] + [
        (1, layer.kernel_size[1])
    ]
    errors = []
    with torch.no_grad():
        reference = layer(x)
        torch.testing.assert_close(factors(x), reference, atol=2e-6, rtol=1e-5)
        for share in (0.2, 0.4, 0.6, 0.8, 1.0):
            ranks = plan_ranks(layer, LowRankConfig(rank=share), share, "spatial")
            out = factorize(layer, ranks, "spatial")(x)
            errors.append(float((out - reference).norm() / reference.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5 and errors[0] > 0.1


def test_a_spatially_factorized_model_rebuilds_from_its_file(splits, tmp_path):
    plan = CompressionPlan(LowRankConfig(rank=0.5, conv="spatial"), QuantConfig(4))
    bench = _bench(splits)
    apply_plan(bench, plan)
    kinds = {e["kind"] for e in bench.factorized.values()}
    assert "spatial" in kinds and "tucker2" not in kinds
    for name, entry in bench.factorized.items():
        if entry["kind"] == "spatial":  # both factors carry the rank
            rank = [entry["ranks"][0], entry["full"][0]]
            assert bench.records["layer_rank"][f"{name}.0"] == rank
            assert bench.records["layer_rank"][f"{name}.1"] == rank
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    model = load_compressed(tmp_path / "m.safetensors", tiny_conv)
    x = splits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))
    assert "rank 0.50 spatial" in plan.summary()

    def change(meta):  # a Linear layer cannot be split by its kernel
        linear = next(n for n, e in meta["factorization"].items() if e["kind"] == "svd")
        meta["factorization"][linear]["kind"] = "spatial"

    _rewrite(tmp_path / "m.safetensors", change)
    with pytest.raises(ArtifactError, match="takes a svd"):
        load_compressed(tmp_path / "m.safetensors", tiny_conv)
