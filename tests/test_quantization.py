"""Quantization: grids, QAT, mixed precision, and the int8 model ONNX Runtime really runs."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import optuna
import pytest
import torch
from onnx import numpy_helper

from paretoopt.compress.artifact import load_compressed, save_compressed
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier, prunable_layers
from paretoopt.compress.techniques.quantize import quantize_tensor
from paretoopt.compress.train import Recipe, accuracy, logits_of, train
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec, parse_space
from paretoopt.errors import PlanError, SpaceError
from paretoopt.measure import OrtRunner, export_onnx
from paretoopt.measure.int8 import int8_weight, integer_initializers, quantize_model
from paretoopt.measure.isa import Int8Recipe
from paretoopt.study.sampling import sample_plan
from paretoopt.study.trial import RUNTIME_FILE, calibrate, prepare, run_trial
from paretoopt.workload.data import create_data
from paretoopt.workload.models import mlp, tiny_conv

from .conftest import TINY


@pytest.fixture(scope="module")
def splits():
    return create_data(ComponentSpec(name="digits", kwargs={"size": 8}))


@pytest.fixture(scope="module")
def trained(splits):
    """tiny_conv trained for a few epochs: a model whose accuracy quantization can hurt."""
    torch.manual_seed(0)
    model = tiny_conv()
    train(model, splits.train, Recipe(6, 3e-3, 32, 0))
    return model.eval()


def _apply(model, splits, plan, seed=0):
    torch.manual_seed(seed)
    bench = Workbench(
        copy.deepcopy(model),
        splits,
        logits_of(model, splits.train.x),
        find_classifier(model, splits.train.x[:1]),
        seed=seed,
    )
    apply_plan(bench, plan)
    return bench


def _val(bench, splits):
    return accuracy(logits_of(bench.model, splits.val.x), splits.val.y)


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
def test_error_shrinks_as_bits_grow(granularity, scheme):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 2.0, 16).view(16, 1, 1, 1)
    errors = [
        float(
            (quantize_tensor(w, QuantConfig(b, granularity, scheme)).dequantize() - w).pow(2).mean()
        )
        for b in (2, 3, 4, 5, 6, 7, 8)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 1000  # 6 more bits: about 4**6 less squared error


@pytest.mark.parametrize("bits", [3, 4])
def test_per_channel_is_at_least_as_accurate_as_per_tensor(splits, bits):
    """The case per-channel scales exist for: output channels whose ranges differ (here by
    up to 32x, through a rescaling that ReLU lets the next layer undo exactly)."""
    torch.manual_seed(0)
    model = mlp(in_features=64, hidden=(64,))
    train(model, splits.train, Recipe(4, 3e-3, 32, 0))
    before = _val(_apply(model.eval(), splits, CompressionPlan()), splits)
    with torch.no_grad():
        f = 2.0 ** torch.arange(64).remainder(6).float()
        model[1].weight.mul_(f[:, None])
        model[1].bias.mul_(f)
        model[3].weight.div_(f[None, :])
    assert _val(_apply(model, splits, CompressionPlan()), splits) == before
    results = {
        g: _val(_apply(model, splits, CompressionPlan(quant=QuantConfig(bits, g))), splits)
        for g in ("per_channel", "per_tensor")
    }
    # measured: 3 bits 63.7 vs 10.0 %, 4 bits 78.5 vs 52.2 %
    assert results["per_channel"] >= results["per_tensor"] + 10.0, results


def test_qat_improves_on_ptq_at_3_bits(trained, splits):
    accuracies = {}
    for method in ("ptq", "qat"):
        plan = CompressionPlan(
            quant=QuantConfig(3, method=method), finetune=FinetuneConfig(2, 1e-3, 32)
        )
        accuracies[method] = _val(_apply(trained, splits, plan), splits)
    # measured: PTQ 83.0 %, QAT 94.1 % (baseline 95.2 %)
    assert accuracies["qat"] > accuracies["ptq"] + 5.0, accuracies


def test_qat_trains_through_the_quantized_weights(trained, splits):
    """The training forward pass sees the quantized weights: with lr 0 nothing moves,
    yet the loss is the quantized model's loss, not the float model's."""
    float_loss = _apply(trained, splits, CompressionPlan(finetune=FinetuneConfig(1, 1e-12)))
    qat_loss = _apply(
        trained,
        splits,
        CompressionPlan(quant=QuantConfig(2, method="qat"), finetune=FinetuneConfig(1, 1e-12)),
    )
    assert qat_loss.records["finetune_loss"][0] > float_loss.records["finetune_loss"][0] * 1.5


def test_eight_bit_weights_with_int8_activations_are_symmetric():
    w = torch.rand(4, 10) + 0.5  # all positive: affine would put the zero point at 0
    q = quantize_tensor(w, QuantConfig(8, activations="int8"))
    assert torch.all(q.zero_point == 128)
    assert int((q.codes - q.zero_point.view(-1, 1)).abs().max()) <= 127


# --------------------------------------------------------------------------- mixed, 16 bits


def test_mixed_precision_gives_each_layer_its_own_width(trained, splits, tmp_path):
    names = list(prunable_layers(trained))
    widths = dict(zip(names, [2, 8, 16, 32, 4, 3, 5, 6], strict=False))
    plan = CompressionPlan(quant=QuantConfig(8, layer_bits=widths))
    bench = _apply(trained, splits, plan)
    for name, bits in widths.items():
        q = bench.quantized.get(f"{name}.weight")
        assert (q.bits if q is not None else bits) == bits
        assert (q is not None) == (bits <= 8)
    assert bench.records["layer_bits"] == widths
    save_compressed(tmp_path / "m.safetensors", bench, plan)
    model = load_compressed(tmp_path / "m.safetensors", tiny_conv)
    x = splits.val.x[:32]
    assert torch.equal(logits_of(model, x), logits_of(bench.model, x))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_sixteen_bit_formats_round_trip_and_halve_the_weights(trained, splits, tmp_path, half):
    sizes = {}
    for bits in (16, 32):
        plan = CompressionPlan(quant=QuantConfig(bits, half_type=half))
        bench = _apply(trained, splits, plan)
        sizes[bits] = save_compressed(tmp_path / f"{bits}.safetensors", bench, plan)
        model = load_compressed(tmp_path / f"{bits}.safetensors", tiny_conv)
        assert torch.equal(logits_of(model, splits.val.x), logits_of(bench.model, splits.val.x))
    weights = sum(m.weight.numel() for m in prunable_layers(trained).values())
    assert sizes[32] - sizes[16] == pytest.approx(2 * weights, rel=0.01)
    rounded = _apply(trained, splits, CompressionPlan(quant=QuantConfig(16, half_type=half)))
    w = next(iter(prunable_layers(rounded.model).values())).weight
    dtype = torch.float16 if half == "float16" else torch.bfloat16
    assert torch.equal(w, w.to(dtype).float())


def test_mixed_precision_sampling_has_one_parameter_per_layer_group():
    doc = copy.deepcopy(TINY)
    doc["space"]["quantization"] = {
        "bits": [2, 4, 8],
        "distribution": "per_layer",
        "layer_groups": 2,
        "activations": ["float", "int8"],
    }
    space = parse_space(doc)
    layers = [f"l{i}" for i in range(5)]
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    trial = study.ask()
    plan = sample_plan(trial, space, layers[:-1], layers)
    quant = {k for k in trial.params if k.startswith("quant.")}
    assert quant == {"quant.bits.layers.l0..l1", "quant.bits.layers.l2..l4", "quant.activations"}
    assert set(plan.quant.layer_bits) == set(layers)
    assert plan.quant.layer_bits["l0"] == plan.quant.layer_bits["l1"]
    assert len({plan.quant.layer_bits[n] for n in ("l2", "l3", "l4")}) == 1
    assert plan.quant.bits == max(plan.quant.layer_bits.values())


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: CompressionPlan(quant=QuantConfig(4, method="qat")),
            "quant.method: 'qat' trains with fake-quantized weights, so it needs "
            "finetune.epochs > 0, but got 0",
        ),
        (
            lambda: QuantConfig(32, activations="int8"),
            "quant.activations: 'int8' needs integer weights (2-8 bits), but every layer "
            "has [32] bits",
        ),
        (
            lambda: QuantConfig(4, layer_bits={"conv": 12}),
            "quant.layer_bits['conv']: 12 is not supported; choose from 2, 3, 4, 5, 6, 7, 8, "
            "16, 32",
        ),
        (
            lambda: QuantConfig(4, half_type="float8"),
            "quant.half_type: 'float8' is not supported; choose from float16, bfloat16",
        ),
    ],
)
def test_invalid_quant_plans(build, message):
    with pytest.raises(PlanError) as info:
        build()
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("quantization", "finetune", "message"),
    [
        (
            {"bits": [16, 32], "activations": "int8"},
            1,
            "space.quantization.activations: int8 needs integer weights, but bits allows only "
            "[16, 32]; add a width of 2-8",
        ),
        (
            {"bits": 4, "method": ["ptq", "qat"]},
            0,
            "space.quantization.method: qat trains through the quantizer, but "
            "finetune.epochs is always 0",
        ),
        (
            {"bits": [4, 8], "half_type": ["float16", "bfloat16"]},
            1,
            "space.quantization.half_type: searched, but bits never takes 16 ([4, 8])",
        ),
        (
            {"bits": 4, "distribution": "per_layer"},
            1,
            "space.quantization.distribution: per_layer draws each layer's width from bits, "
            "but bits is fixed at 4; give bits a list or a range",
        ),
    ],
)
def test_quantization_choices_that_cannot_take_effect_are_refused(quantization, finetune, message):
    doc = copy.deepcopy(TINY)
    doc["space"]["quantization"] = quantization
    doc["space"]["finetune"] = {"epochs": finetune}
    with pytest.raises(SpaceError) as info:
        parse_space(doc)
    assert str(info.value) == message


def test_a_plan_naming_layers_the_model_lacks_fails_clearly(trained, splits):
    plan = CompressionPlan(quant=QuantConfig(4, layer_bits={"nope": 2}))
    with pytest.raises(PlanError) as info:
        _apply(trained, splits, plan)
    assert str(info.value).startswith(
        "quant.layer_bits: names ['nope'] that the model does not have; its layers: "
    )


def test_widths_count_the_default_for_unnamed_layers():
    cfg = QuantConfig(4, layer_bits={"x": 32})
    assert cfg.widths == {4, 32} and cfg.active and cfg.integer
    assert cfg.layer("x") == 32 and cfg.layer("y") == 4
    assert QuantConfig(16, layer_bits={"x": 32}).describe() == "fp16/fp32 mixed"


def test_int8_activations_need_a_runtime_with_int8_kernels():
    doc = copy.deepcopy(TINY)
    doc["target"]["runtime"] = "torch"
    doc["space"]["quantization"]["activations"] = ["float", "int8"]
    with pytest.raises(SpaceError) as info:
        parse_space(doc)
    assert str(info.value) == (
        "space.quantization.activations: int8 needs a runtime with int8 kernels "
        "(onnxruntime, openvino, executorch), but target.runtime is 'torch'"
    )


def test_plans_of_version_2_still_load():
    old = CompressionPlan(quant=QuantConfig(4)).to_dict()
    for key in ("half_type", "activations", "method", "layer_bits", "calibration_samples"):
        del old["quant"][key]
    old["version"] = 2
    assert CompressionPlan.from_dict(old) == CompressionPlan(quant=QuantConfig(4))


# --------------------------------------------------------------------------- int8 runtime


S8 = Int8Recipe("u8s8", saturates=False)
U8 = Int8Recipe("u8u8", saturates=False)
NO_VNNI = Int8Recipe("auto", saturates=True)  # what auto is on an AVX2-only CPU


@pytest.mark.parametrize("recipe", [S8, U8, NO_VNNI])
def test_int8_model_keeps_the_exact_weights(splits, tmp_path, recipe):
    """Without BatchNorm to fold, every int8 weight in the ONNX file, dequantized, is
    bit-for-bit the trial's weight, and every layer runs in an integer kernel, whether the
    codes are stored as s8 or as u8 around 128."""
    torch.manual_seed(0)
    model = mlp(in_features=64, hidden=(32, 16))
    train(model, splits.train, Recipe(2, 3e-3, 32, 0))
    for cfg in (QuantConfig(3, "per_tensor"), QuantConfig(8, activations="int8")):
        bench = _apply(model.eval(), splits, CompressionPlan(quant=cfg))
        export_onnx(bench.model, splits.train.x[:1], tmp_path / "f.onnx")
        types = quantize_model(
            tmp_path / "f.onnx",
            tmp_path / "q.onnx",
            splits.train.x[:64].numpy(),
            bench.quantized,
            [],
            recipe,
        )
        # auto without VNNI: u8 only where 8-bit codes would saturate s8 kernels
        want = "u8" if recipe is U8 or (recipe is NO_VNNI and cfg.bits == 8) else "s8"
        assert types == dict.fromkeys(bench.quantized, want) and len(types) == 3
        inits = {
            i.name: numpy_helper.to_array(i)
            for i in onnx.load(tmp_path / "q.onnx").graph.initializer
        }
        for param in bench.quantized:
            layer = dict(bench.model.named_parameters())[param].detach().numpy()
            codes, zero = inits[f"{param}_quantized"], inits[f"{param}_zero_point"]
            assert codes.dtype == zero.dtype == (np.uint8 if want == "u8" else np.int8)
            assert set(zero.tolist()) == {128 if want == "u8" else 0}
            ints = codes.astype(np.float32) - zero.astype(np.float32).reshape(-1, 1)
            scale = inits[f"{param}_scale"].reshape(-1, 1)
            np.testing.assert_allclose(ints * scale, layer, rtol=1e-6, atol=1e-7)
        used = integer_initializers(tmp_path / "q.onnx")
        assert {f"{p}_quantized" for p in bench.quantized} <= used


@pytest.fixture(scope="module")
def digits_ctx(tmp_path_factory):
    """The digits benchmark's model and data (search_spaces/conv.yaml), trained briefly."""
    doc = {
        "study": "digits-int8",
        "model": {"name": "conv"},
        "data": {"name": "digits", "kwargs": {"size": 16}},
        "baseline": {"epochs": 5},
        "target": {
            "threads": 1,
            "warmup": 5,
            "repeats": 3,
            "iterations": 40,
            "sessions": 2,
            "quiet_s": 0.0,
        },
    }
    context = prepare(parse_space(doc), tmp_path_factory.mktemp("cache"), log=lambda _: None)
    calibrate(context, tmp_path_factory.mktemp("calibration"))
    return context


@pytest.mark.parametrize(
    ("quant", "recipe"),
    [
        (QuantConfig(8, "per_channel", "symmetric", activations="int8"), "auto"),
        (QuantConfig(8, "per_channel", "symmetric", activations="int8"), "u8u8"),
        (QuantConfig(4, "per_tensor", "affine", activations="int8"), "auto"),
    ],
)
def test_int8_runtime_model_matches_its_fake_quantized_twin(
    digits_ctx, tmp_path, monkeypatch, quant, recipe
):
    """On any x86 CPU: auto picks weight types its int8 kernels compute exactly (an
    8-bit plan lost 1.5 points to saturated s8 kernels on an AVX2-only CPU)."""
    target = digits_ctx.target
    chosen = dataclasses.replace(target.int8_recipe(), name=recipe)
    monkeypatch.setattr(target, "_int8", chosen)
    plan = CompressionPlan(PruneConfig("channel", 0.25, round_to=8), quant)
    record = run_trial(digits_ctx, plan, tmp_path / "1", seed=0)
    assert abs(record["deploy_gap"]) <= 0.5, record["deploy_gap"]
    assert record["exact_weights"] is True
    assert record["int_kernels"] is True
    kinds = {}
    for name, entry in record["layer_quant"].items():
        assert entry["kernel"] == "int8" and entry["exact_weights"] is True
        assert entry["bits"] == quant.bits and entry["granularity"] == quant.granularity
        kinds[f"{name}.weight_quantized"] = entry["int8_weights"]
    if recipe == "u8u8" or quant.bits < 8:  # 4-bit codes never saturate s8 kernels
        assert set(kinds.values()) == {"u8" if recipe == "u8u8" else "s8"}
    types = {onnx.TensorProto.INT8: "s8", onnx.TensorProto.UINT8: "u8"}
    graph = onnx.load(tmp_path / "1" / RUNTIME_FILE).graph
    held = {i.name: types[i.data_type] for i in graph.initializer if i.name in kinds}
    assert held == kinds  # the record says what the file holds
    # the file holds one byte per weight instead of four
    assert record["runtime_file_bytes"] < record["params"] * 2


def test_layers_kept_in_float_run_float_kernels(digits_ctx, tmp_path):
    names = list(prunable_layers(digits_ctx.baseline))
    widths = {n: (16 if i == 0 else 32 if i == len(names) - 1 else 4) for i, n in enumerate(names)}
    plan = CompressionPlan(quant=QuantConfig(4, layer_bits=widths, activations="int8"))
    record = run_trial(digits_ctx, plan, tmp_path / "1", seed=0)
    kernels = {n: e["kernel"] for n, e in record["layer_quant"].items()}
    assert kernels == {n: ("int8" if b == 4 else "float32") for n, b in widths.items()}
    assert record["layer_quant"][names[0]]["format"] == "float16"
    assert record["int_kernels"] is True  # every integer layer did
    assert abs(record["deploy_gap"]) <= 1.0


def test_float_activations_run_dequantized_and_say_so(digits_ctx, tmp_path):
    record = run_trial(digits_ctx, CompressionPlan(quant=QuantConfig(3)), tmp_path / "1", seed=0)
    assert record["int_kernels"] is False
    assert {e["kernel"] for e in record["layer_quant"].values()} == {"float32"}
    assert record["deploy_gap"] == pytest.approx(0.0, abs=100 / len(digits_ctx.splits.val))


class _FoldedConv(torch.nn.Module):
    """Conv -> BatchNorm with negative and zero gammas, so folding flips signs and
    silences a channel; then a biased Linear whose int32 bias must be requantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.3, 1.0, -2.5]))
            self.bn.bias.uniform_(-0.5, 0.5)
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_int8_weights_survive_batchnorm_folding_with_any_gamma(splits, tmp_path):
    torch.manual_seed(0)
    model = _FoldedConv().eval()
    bench = _apply(model, splits, CompressionPlan(quant=QuantConfig(4, "per_tensor")))
    export_onnx(bench.model, splits.train.x[:1], tmp_path / "f.onnx")
    exact = quantize_model(
        tmp_path / "f.onnx",
        tmp_path / "q.onnx",
        splits.train.x[:128].numpy(),
        bench.quantized,
        [],
        S8,
    )
    assert exact == {"conv.weight": "s8", "fc.weight": "s8"}
    floats = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "f.onnx").graph.initializer
    }
    graph = onnx.load(tmp_path / "q.onnx").graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for param in ("conv.weight", "fc.weight"):
        ints, scale = inits[f"{param}_quantized"], inits[f"{param}_scale"]
        decoded = ints.astype(np.float64) * scale.reshape((-1,) + (1,) * (ints.ndim - 1))
        np.testing.assert_allclose(decoded, floats[param], rtol=1e-5, atol=1e-6)
    assert np.all(inits["conv.weight_quantized"][2] == 0)  # gamma 0: the channel is silent
    # every int32 bias sits on input_scale x weight_scale, within half a step of the float
    producers = {o: n for n in graph.node for o in n.output}
    biased = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert len(biased) == 2
    for node in biased:
        x_dq, w_dq, b_dq = (producers[i] for i in node.input)
        x_scale, w_scale = inits[x_dq.input[1]], inits[w_dq.input[1]]
        b_ints, b_scale = inits[b_dq.input[0]], inits[b_dq.input[1]]
        np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)
        error = np.abs(b_ints * b_scale.astype(np.float64) - floats[node.input[2]])
        assert np.all(error <= b_scale / 2 + 1e-9)
    ours = logits_of(bench.model, splits.val.x[:64]).numpy()
    theirs = OrtRunner(tmp_path / "q.onnx", 1)(splits.val.x[:64].numpy())
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(ours) < 0.05


def test_a_transposed_square_weight_is_matched_either_way_round():
    torch.manual_seed(0)
    q = quantize_tensor(torch.randn(6, 6), QuantConfig(3))
    straight = q.dequantize().numpy() * np.linspace(0.5, 2.0, 6)[:, None]
    weight = int8_weight(q, straight.T.astype(np.float32))
    assert weight is not None and weight.axis == 1
    decoded = weight.ints.T.astype(np.float64) * weight.scale[:, None]
    np.testing.assert_allclose(decoded, straight, rtol=1e-5, atol=1e-6)
    assert int8_weight(q, np.random.default_rng(0).normal(size=(6, 6))) is None
