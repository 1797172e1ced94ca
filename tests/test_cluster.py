"""Weight clustering (quant.grid: kmeans): the grid, the file and fine-tuning through
shared values."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.numpy import load_file, save_file

from paretoopt.compress.artifact import load_compressed, read_metadata, save_compressed
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier, prunable_layers
from paretoopt.compress.techniques.cluster import cluster_tensor, kmeans, shared
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec, load_space
from paretoopt.errors import ArtifactError, PlanError, SpaceError
from paretoopt.workload.data import create_data
from paretoopt.workload.models import tiny_conv

from .conftest import write_space

KMEANS4 = QuantConfig(4, grid="kmeans")


def test_values_on_k_levels_are_clustered_exactly():
    torch.manual_seed(0)
    levels = torch.tensor([-0.5, -0.1, 0.2, 0.7])
    values = levels[torch.randint(0, 4, (3, 200))]
    centroids, codes = kmeans(values, 4, zero=False)
    torch.testing.assert_close(centroids.gather(1, codes), values, atol=1e-6, rtol=0)


def test_the_error_falls_as_the_bits_grow():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    errors = [
        float((cluster_tensor(w, KMEANS4, b, zero=False).dequantize() - w).norm())
        for b in range(1, 7)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_k_means_beats_the_linear_grid_on_gaussian_weights():
    from paretoopt.compress.techniques.quantize import quantize_tensor

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for bits in (2, 3, 4):
        clustered = cluster_tensor(w, KMEANS4, bits, zero=False).dequantize()
        linear = quantize_tensor(w, QuantConfig(bits), bits).dequantize()
        assert (clustered - w).norm() < (linear - w).norm()


def test_every_row_shares_at_most_2_to_the_bits_values():
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    q = cluster_tensor(w, KMEANS4, 3, zero=False)
    assert q.codebook.shape == (6, 8) and int(q.codes.max()) <= 7
    assert all(len(torch.unique(row)) <= 8 for row in q.dequantize())
    tensor = cluster_tensor(w, QuantConfig(3, "per_tensor", grid="kmeans"), 3, zero=False)
    assert tensor.codebook.shape == (1, 8) and len(torch.unique(tensor.dequantize())) <= 8


def test_a_pruned_layer_keeps_its_zeros_on_an_exact_zero_value():
    torch.manual_seed(0)
    w = torch.randn(4, 40) * (torch.rand(4, 40) > 0.6)
    q = cluster_tensor(w, KMEANS4, 2, zero=True)
    assert torch.equal(q.dequantize() == 0, w == 0)
    assert (q.codebook[:, 0] == 0).all() and (q.zero_point == 0).all()


def test_a_shared_value_s_gradient_is_the_same_for_every_member():
    torch.manual_seed(0)
    w = torch.randn(3, 30, requires_grad=True)
    codes = cluster_tensor(w, KMEANS4, 2, zero=False).codes
    out = shared(w, codes, 4, False, KMEANS4)
    (out * torch.randn(3, 30)).sum().backward()
    for row, grad in zip(codes, w.grad, strict=True):
        for code in row.unique():
            assert len(torch.unique(grad[row == code])) == 1


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


@pytest.mark.parametrize(
    "plan",
    [
        CompressionPlan(QuantConfig(4, grid="kmeans")),
        CompressionPlan(
            PruneConfig("unstructured", 0.7), QuantConfig(3, "per_tensor", grid="kmeans")
        ),
        CompressionPlan(
            PruneConfig("unstructured", 0.5),
            QuantConfig(4, grid="kmeans", method="qat"),
            finetune=FinetuneConfig(epochs=1),
        ),
    ],
    ids=["ptq", "pruned-per-tensor", "qat"],
)
def test_the_file_holds_the_clustered_model_exactly(splits, tmp_path, plan):
    bench = _bench(splits)
    apply_plan(bench, plan)
    size = save_compressed(tmp_path / "m.safetensors", bench, plan)
    model = load_compressed(tmp_path / "m.safetensors", tiny_conv)
    x = splits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))
    layout = read_metadata(tmp_path / "m.safetensors")["layout"]
    clustered = [e for e in layout.values() if e.get("grid") == "kmeans"]
    assert len(clustered) == len(prunable_layers(bench.model)) and size > 0
    for name, layer in prunable_layers(bench.model).items():
        rows = layer.weight.reshape(len(layer.weight), -1)
        per_row = [len(torch.unique(r)) for r in rows]
        assert max(per_row) <= 2**plan.quant.bits, name
    if plan.prune.active:
        assert any(e.get("masked") for e in clustered)


def test_fine_tuning_trains_the_shared_values_and_keeps_the_pruned_at_zero(splits):
    plan = CompressionPlan(
        PruneConfig("unstructured", 0.5),
        QuantConfig(4, grid="kmeans", method="qat"),
        finetune=FinetuneConfig(epochs=1),
    )
    bench = _bench(splits)
    apply_plan(bench, plan)
    assert bench.clusters  # assignments fixed before fine-tuning ...
    for param, q in bench.quantized.items():
        assert torch.equal(q.codes[q.codes > 0], bench.clusters[param][q.codes > 0])  # ... kept
        weight = dict(bench.model.named_parameters())[param]
        assert torch.equal(weight == 0, bench.masks[param] == 0)


def test_kmeans_plans_never_take_int8_kernels():
    with pytest.raises(PlanError, match="quant.grid: 'kmeans' shares float values"):
        QuantConfig(4, grid="kmeans", activations="int8")
    with pytest.raises(PlanError, match="quant.grid: 'kmeans' needs integer weights"):
        QuantConfig(32, grid="kmeans")
    assert "kmeans16" in CompressionPlan(QuantConfig(4, grid="kmeans")).summary()


def test_a_space_whose_kmeans_could_never_run_is_refused(tmp_path, tiny_doc):
    tiny_doc["space"]["quantization"] = {"bits": [4, 8], "grid": "kmeans", "activations": "int8"}
    with pytest.raises(SpaceError, match="space.quantization.grid: kmeans shares float values"):
        load_space(write_space(tmp_path / "s.yaml", tiny_doc))


def test_a_codebook_of_the_wrong_shape_is_refused(splits, tmp_path):
    plan = CompressionPlan(QuantConfig(4, grid="kmeans"))
    bench = _bench(splits)
    apply_plan(bench, plan)
    path = tmp_path / "m.safetensors"
    save_compressed(path, bench, plan)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in read_metadata(path).items()}
    arrays = load_file(str(path))
    name = next(k for k in arrays if k.endswith("::codebook"))
    arrays[name] = arrays[name][:, :3].copy()
    save_file(arrays, str(path), metadata=meta)
    with pytest.raises(ArtifactError, match="a 4-bit codebook needs 16 values"):
        load_compressed(path, tiny_conv)


def test_a_kmeans_grid_without_integer_widths_is_refused(tmp_path, tiny_doc):
    tiny_doc["space"]["quantization"] = {"bits": 32, "grid": "kmeans"}
    with pytest.raises(SpaceError, match=r"grid: kmeans shares 2\^bits values, but bits allows"):
        load_space(write_space(tmp_path / "s.yaml", tiny_doc))
