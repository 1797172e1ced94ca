from __future__ import annotations

import json

import pytest

from paretoopt.config.parts.distill import DistillConfig
from paretoopt.config.parts.finetune import FinetuneConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.errors import PlanError


def test_plan_round_trips_through_json():
    plan = CompressionPlan(
        PruneConfig("channel", 0.4, "hessian", "per_layer", {"a.b": 1.2}, "gradual", 3, round_to=8),
        QuantConfig(4, "per_tensor", "symmetric"),
        DistillConfig(3.0, 0.5),
        FinetuneConfig(2, 1e-3, 32),
    )
    assert CompressionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_identity_plan():
    assert CompressionPlan().is_identity
    assert not CompressionPlan(quant=QuantConfig(8)).is_identity
    assert CompressionPlan().summary() == "dense, fp32"
    plan = CompressionPlan(PruneConfig("channel", 0.5), QuantConfig(4, "per_tensor", "symmetric"))
    assert plan.summary() == "channel 0.50 l2 uniform, int4 per-tensor sym"
    gradual = PruneConfig("unstructured", 0.8, "taylor", "global", schedule="gradual")
    assert CompressionPlan(gradual).summary() == "unstructured 0.80 taylor global gradual, fp32"


def test_layer_sparsity_is_scaled_and_capped():
    cfg = PruneConfig(
        "unstructured", 0.6, distribution="per_layer", layer_scale={"x": 2.0, "y": 0.5}
    )
    assert cfg.layer_sparsity("x") == 0.99
    assert cfg.layer_sparsity("y") == pytest.approx(0.3)
    assert cfg.layer_sparsity("other") == 0.6


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: PruneConfig("filter", 0.5),
            "prune.structure: 'filter' is not supported; choose from unstructured, channel, nm",
        ),
        (
            lambda: PruneConfig("channel", 1.0),
            "prune.sparsity: 0 <= sparsity < 1 must hold, but got 1.0",
        ),
        (
            lambda: QuantConfig(12),
            "quant.bits: 12 is not supported; choose from 2, 3, 4, 5, 6, 7, 8, 16, 32",
        ),
        (
            lambda: PruneConfig("channel", 0.5, regrowth=True),
            "prune.regrowth: needs structure 'unstructured' and schedule 'one_shot' "
            "(sparsity stays constant), but got 'channel', 'one_shot'",
        ),
        (
            lambda: PruneConfig("channel", 0.5, saliency="random"),
            "prune.saliency: 'random' is not supported; choose from l1, l2, taylor, hessian",
        ),
        (
            lambda: PruneConfig("channel", 0.5, layer_scale={"a": 1.0}),
            "prune.layer_scale: given exactly when the distribution is per_layer, but got "
            "'uniform' with 1 multipliers",
        ),
        (lambda: DistillConfig(0.0, 0.5), "distill.temperature: must be > 0, got 0.0"),
        (lambda: DistillConfig(1.0, 1.5), "distill.alpha: 0 <= alpha <= 1 must hold, got 1.5"),
        (
            lambda: CompressionPlan.from_dict({"version": 99}),
            "plan: version 99 is not supported (this paretoopt reads versions 1 to 4)",
        ),
    ],
)
def test_invalid_plans(build, message):
    with pytest.raises(PlanError) as info:
        build()
    assert str(info.value) == message


def test_version_1_plans_keep_their_meaning():
    v1 = {"version": 1, "prune": {"structure": "unstructured", "sparsity": 0.5}}
    assert CompressionPlan.from_dict(v1).prune.distribution == "global"
    v1 = {
        "version": 1,
        "prune": {"structure": "channel", "sparsity": 0.5, "layer_scale": {"a": 1.2}},
    }
    assert CompressionPlan.from_dict(v1).prune.distribution == "per_layer"


def test_a_plan_is_a_mapping_of_technique_to_config():
    import copy
    import pickle

    from paretoopt.config.plan import PARTS

    plan = CompressionPlan(QuantConfig(4), PruneConfig("channel", 0.5))  # any order
    assert list(plan) == list(PARTS) and plan["quant"] is plan.quant and plan.quant.bits == 4
    assert plan.distill == DistillConfig()  # a part not given: its default does nothing
    assert pickle.loads(pickle.dumps(plan)) == plan == copy.deepcopy(plan)
    assert hash(plan) == hash(CompressionPlan(PruneConfig("channel", 0.5), QuantConfig(4)))
    eight = plan.replace(quant=QuantConfig(8))
    assert eight.quant.bits == 8 and eight.prune == plan.prune and plan.quant.bits == 4
    with pytest.raises(AttributeError):
        plan.quant = QuantConfig(8)  # frozen
    with pytest.raises(PlanError, match="unknown key"):
        CompressionPlan(ghost=QuantConfig(8))
    with pytest.raises(PlanError, match="quant must be a QuantConfig"):
        CompressionPlan(quant=PruneConfig())
    with pytest.raises(PlanError, match="quant is given twice"):
        CompressionPlan(QuantConfig(8), quant=QuantConfig(4))
