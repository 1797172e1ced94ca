"""Optimal Brain Surgeon (prune.reconstruction: obs): the update, and what it is worth
before any fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier, prunable_layers
from paretoopt.compress.techniques.surgeon import input_hessians, surgeon
from paretoopt.compress.train import Recipe, logits_of, split_quality, train
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec, load_space
from paretoopt.errors import PlanError, SpaceError
from paretoopt.workload.data import Split, create_data
from paretoopt.workload.models import mlp

from .conftest import write_space


def _output_error(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - new) @ x.T).norm() / (w @ x.T).norm())


def test_the_update_makes_up_for_what_was_removed():
    """On correlated inputs, the surgeon's layer output is closer to the dense one than
    its own mask without the update."""
    torch.manual_seed(0)
    mix = torch.randn(24, 24)
    x = torch.randn(2000, 24) @ mix  # correlated inputs: where the update pays
    w = torch.randn(16, 24)
    new, keep = surgeon(w, x.T @ x / len(x), 0.7)
    assert abs(1 - float(keep.float().mean()) - 0.7) < 0.01
    assert torch.equal(new == 0, ~keep) or bool((new[~keep] == 0).all())
    assert _output_error(w, new, x) < 0.97 * _output_error(w, w * keep, x)


def test_nothing_removed_changes_nothing():
    torch.manual_seed(0)
    x = torch.randn(500, 10)
    w = torch.randn(4, 10)
    new, keep = surgeon(w, x.T @ x / len(x), 0.0)
    assert keep.all()
    torch.testing.assert_close(new, w)


def test_input_hessians_of_a_convolution_are_its_patches_second_moments():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(10, 2, 5, 5)
    split = Split(x, torch.zeros(10, dtype=torch.long))
    (h,) = input_hessians(model, {"0": conv}, split, 10).values()
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    torch.testing.assert_close(h, (patches.T @ patches / len(patches)).double())


@pytest.fixture(scope="module")
def digits():
    return create_data(ComponentSpec(name="digits", kwargs={"size": 8}))


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = mlp(in_features=64, hidden=(64, 32))  # narrow: magnitude pruning hurts it
    train(model, digits.train, Recipe(15, 3e-3, 32, 0))
    return model.eval()


def _accuracy_after(model, digits, prune: PruneConfig) -> float:
    bench = Workbench(
        copy.deepcopy(model),
        digits,
        logits_of(model, digits.train.x),
        find_classifier(model, digits.train.x[:1]),
    )
    apply_plan(bench, CompressionPlan(prune))
    for name, layer in prunable_layers(bench.model).items():
        zeros = float((layer.weight == 0).float().mean())
        # the same sparsity, other weights (and the weights of inputs never seen active)
        assert -0.02 < zeros - prune.sparsity < 0.05, name
    return split_quality(bench.model, digits.val)


def test_obs_at_70_percent_beats_magnitude_before_fine_tuning_by_5_points(trained, digits):
    dense = split_quality(trained, digits.val)
    magnitude = _accuracy_after(trained, digits, PruneConfig("unstructured", 0.7, "l2"))
    obs = _accuracy_after(
        trained, digits, PruneConfig("unstructured", 0.7, "l2", reconstruction="obs")
    )
    assert obs >= magnitude + 5.0, (dense, magnitude, obs)


def test_obs_needs_unstructured_pruning(tmp_path, tiny_doc):
    with pytest.raises(PlanError, match="prune.reconstruction: 'obs' updates the weights"):
        PruneConfig("channel", 0.5, reconstruction="obs")
    tiny_doc["space"]["pruning"] = {
        "structure": "channel",
        "sparsity": 0.5,
        "reconstruction": ["none", "obs"],
    }
    with pytest.raises(SpaceError, match="space.pruning.reconstruction: obs updates"):
        load_space(write_space(tmp_path / "s.yaml", tiny_doc))
    summary = CompressionPlan(PruneConfig("unstructured", 0.5, reconstruction="obs")).summary()
    assert "obs" in summary


# --------------------------------------------------------------------------- N:M


def _groups(weight: torch.Tensor, group: int) -> torch.Tensor:
    rows = weight.reshape(weight.shape[0], -1)
    full = rows.shape[1] // group * group
    return rows[:, :full].reshape(rows.shape[0], -1, group)


def test_nm_keeps_the_best_of_every_group_and_the_partial_one_whole():
    from paretoopt.compress.techniques.prune import nm_mask

    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0, 5.0, 0.5]])
    assert nm_mask(scores, 2, 4).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0, 1, 1]]


@pytest.mark.parametrize("reconstruction", ["none", "obs"])
def test_nm_pruning_leaves_the_pattern_and_the_file_holds_it(
    trained, digits, tmp_path, reconstruction
):
    from paretoopt.compress.artifact import load_compressed, save_compressed

    prune = PruneConfig("nm", 0.5, reconstruction=reconstruction)
    plan = CompressionPlan(prune)
    bench = Workbench(
        copy.deepcopy(trained),
        digits,
        logits_of(trained, digits.train.x),
        find_classifier(trained, digits.train.x[:1]),
    )
    apply_plan(bench, plan)
    for layer in prunable_layers(bench.model).values():
        assert ((_groups(layer.weight, 4) != 0).sum(dim=2) <= 2).all()
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    model = load_compressed(
        tmp_path / "m.safetensors", lambda: mlp(in_features=64, hidden=(64, 32))
    )
    x = digits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))
    assert plan.summary().startswith("2:4 l2")


def test_obs_beats_magnitude_at_2_4_before_fine_tuning(trained, digits):
    magnitude = _accuracy_after(trained, digits, PruneConfig("nm", 0.5))
    obs = _accuracy_after(trained, digits, PruneConfig("nm", 0.5, reconstruction="obs"))
    assert obs >= magnitude + 2.0, (magnitude, obs)


def test_nm_fixes_its_sparsity_and_schedule(tmp_path, tiny_doc):
    with pytest.raises(PlanError, match="structure nm 2:4 removes 0.5 of the weights"):
        PruneConfig("nm", 0.3)
    with pytest.raises(PlanError, match="nm keeps the same share of every group, at once"):
        PruneConfig("nm", 0.5, schedule="gradual")
    with pytest.raises(PlanError, match="1 <= keep < group <= 64"):
        PruneConfig("nm", 0.0, nm_keep=4, nm_group=4)
    tiny_doc["space"]["pruning"] = {"structure": "nm", "nm_keep": 1, "nm_group": 4}
    space = load_space(write_space(tmp_path / "s.yaml", tiny_doc))
    import optuna

    from paretoopt.study.sampling import sample_plan

    trial = optuna.create_study().ask()
    plan = sample_plan(trial, space, ["a"])
    assert (plan.prune.structure, plan.prune.sparsity) == ("nm", 0.75)


def test_an_nm_pattern_that_keeps_everything_is_refused(tmp_path, tiny_doc):
    tiny_doc["space"]["pruning"] = {"structure": "nm", "nm_keep": 4, "nm_group": 4}
    with pytest.raises(SpaceError, match="nm_keep: 4 of every nm_group 4 keeps them all"):
        load_space(write_space(tmp_path / "s.yaml", tiny_doc))


# --------------------------------------------------------------------------- GPTQ


def _grid(w: torch.Tensor, bits: int, scheme: str = "affine"):
    from paretoopt.compress.techniques.quantize import quantize_tensor
    from paretoopt.config.parts.quant import QuantConfig

    return quantize_tensor(w, QuantConfig(bits, scheme=scheme), bits)


def _span(bits: int, scheme: str) -> tuple[int, int]:
    half, top = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return (half - top, half + top) if scheme == "symmetric" else (0, 2**bits - 1)


@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(scheme):
    from paretoopt.compress.techniques.surgeon import surgeon_codes

    torch.manual_seed(0)
    w = torch.randn(8, 40)
    grid = _grid(w, 3, scheme)
    codes = surgeon_codes(w, torch.eye(40), grid.scale, grid.zero_point, _span(3, scheme))
    assert torch.equal(codes, grid.codes)  # no correlation: nothing to compensate


@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
def test_gptq_codes_sit_on_the_grid_and_beat_nearest_on_correlated_inputs(scheme):
    from paretoopt.compress.techniques.qtensor import QTensor
    from paretoopt.compress.techniques.surgeon import surgeon_codes

    torch.manual_seed(0)
    x = torch.randn(3000, 48) @ torch.randn(48, 48)
    w = torch.randn(16, 48)
    grid = _grid(w, 3, scheme)
    low, high = _span(3, scheme)
    codes = surgeon_codes(w, x.T @ x / len(x), grid.scale, grid.zero_point, (low, high))
    assert int(codes.min()) >= low and int(codes.max()) <= high
    ours = QTensor(codes, grid.scale, grid.zero_point, 3).dequantize()
    assert _output_error(w, ours, x) < 0.9 * _output_error(w, grid.dequantize(), x)


def test_gptq_keeps_pruned_weights_exactly_zero():
    from paretoopt.compress.techniques.qtensor import QTensor
    from paretoopt.compress.techniques.surgeon import surgeon_codes

    torch.manual_seed(0)
    x = torch.randn(2000, 32) @ torch.randn(32, 32)
    keep = torch.rand(8, 32) > 0.6
    w = torch.randn(8, 32) * keep
    grid = _grid(w, 4)
    codes = surgeon_codes(w, x.T @ x / len(x), grid.scale, grid.zero_point, (0, 15), keep)
    ours = QTensor(codes, grid.scale, grid.zero_point, 4).dequantize()
    assert bool((ours[~keep] == 0).all()) and bool((ours[keep] != 0).any())


def _quantized(model, digits, method: str, bits: int, tmp_path=None) -> float:
    from paretoopt.compress.artifact import load_compressed, save_compressed
    from paretoopt.config.parts.quant import QuantConfig

    plan = CompressionPlan(quant=QuantConfig(bits, method=method))
    bench = Workbench(
        copy.deepcopy(model),
        digits,
        logits_of(model, digits.train.x),
        find_classifier(model, digits.train.x[:1]),
    )
    apply_plan(bench, plan)
    if tmp_path is not None:  # the file holds exactly the codes GPTQ chose
        save_compressed(tmp_path / "m.safetensors", bench, plan)
        rebuilt = load_compressed(
            tmp_path / "m.safetensors", lambda: mlp(in_features=64, hidden=(64, 32))
        )
        x = digits.val.x[:64]
        assert torch.equal(logits_of(rebuilt, x), logits_of(bench.model, x))
    return split_quality(bench.model, digits.val)


def test_gptq_beats_round_to_nearest_at_2_bits_before_fine_tuning(trained, digits, tmp_path):
    nearest = _quantized(trained, digits, "ptq", 2)
    gptq = _quantized(trained, digits, "gptq", 2, tmp_path)
    assert gptq >= nearest + 5.0, (nearest, gptq)
