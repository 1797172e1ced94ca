"""The plan parts (config/parts): the space file, the plan and the sampler are built from
the registry, so each part is one module that none of them names."""

from __future__ import annotations

from dataclasses import fields

import optuna
import pytest

from paretoopt.config.parts import PARTS, Part, drawn, register, registered
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import CompressionSpace, parse_space, space_to_dict
from paretoopt.errors import PlanError, SpaceError
from paretoopt.study.sampling import DRAWS, sample_plan

from .conftest import TINY


def test_the_space_file_has_one_section_per_part_in_plan_order():
    sections = [f.name for f in fields(CompressionSpace)]
    assert sections == [p.section for p in registered().values()]
    assert sections == ["pruning", "lowrank", "quantization", "distillation", "finetune", "coding"]
    normal = space_to_dict(parse_space(TINY))["space"]
    assert list(normal) == sections  # and the normal form writes each part's settings
    assert set(normal["pruning"]) == {f.name for f in fields(PARTS["prune"].settings)}


def test_a_part_at_its_defaults_changes_nothing():
    plan = CompressionPlan()
    parts = ["prune", "lowrank", "quant", "distill", "finetune", "coding"]
    assert list(plan) == list(registered()) == parts
    assert not any(p.changes_model(plan[n]) for n, p in registered().items())
    assert plan.is_identity and plan.summary() == "dense, fp32"


def test_parts_are_drawn_in_their_draw_order_and_fine_tuning_epochs_first():
    order = ["distill", "prune", "quant", "finetune", "lowrank", "coding"]
    assert [p.name for p in drawn()] == list(DRAWS) == order
    space = parse_space({**TINY, "space": {**TINY["space"], "finetune": {"epochs": [0, 1]}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        sample_plan(trial, space, ["a", "b"])
        assert next(iter(trial.params)) == "finetune.epochs"
        study.tell(trial, 0.0)


def test_a_part_rule_across_the_space_file_names_its_section():
    doc = {**TINY, "space": {**TINY["space"], "quantization": {"bits": 32, "activations": "int8"}}}
    with pytest.raises(SpaceError, match=r"^space\.quantization\.activations: int8 needs"):
        parse_space(doc)


def test_a_part_rule_across_the_plan_is_checked_when_the_plan_is_built():
    from paretoopt.config.parts.quant import QuantConfig

    with pytest.raises(PlanError, match="qat.*finetune.epochs > 0"):
        CompressionPlan(quant=QuantConfig(4, method="qat"))


def test_a_part_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register(Part("prune", "x", "", object, object, lambda d: None, 9, lambda c: False))
    assert PARTS["prune"].section == "pruning"  # the first one stays


def test_gptq_is_drawn_without_fine_tuning_and_never_on_a_kmeans_grid():
    from paretoopt.config.parts.quant import QuantConfig

    with pytest.raises(PlanError, match="'gptq' rounds to a uniform grid"):
        QuantConfig(4, method="gptq", grid="kmeans")
    assert QuantConfig(3, method="gptq").describe() == "int3 gptq"
    space = {"quantization": {"bits": [3], "method": ["ptq", "gptq"]}}
    space |= {"finetune": {"epochs": 0}, "pruning": {"sparsity": 0.0}}
    assert _methods({**TINY, "space": space}) == {("ptq", "uniform"), ("gptq", "uniform")}
    space["quantization"]["grid"] = ["uniform", "kmeans"]
    assert ("gptq", "kmeans") not in _methods({**TINY, "space": space})
    space["quantization"]["grid"] = "kmeans"
    with pytest.raises(SpaceError, match="method: gptq rounds to the uniform grid, but grid"):
        parse_space({**TINY, "space": space})


def _methods(doc: dict) -> set[tuple[str, str]]:
    space = parse_space(doc)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found = set()
    for _ in range(30):
        trial = study.ask()
        quant = sample_plan(trial, space, ["a", "b"]).quant
        found.add((quant.method, quant.grid))
        study.tell(trial, 0.0)
    return found
