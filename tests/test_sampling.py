from __future__ import annotations

import optuna
import pytest

from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import parse_space
from paretoopt.study.sampling import grid_space, lattice, make_sampler, sample_plan

from .conftest import TINY

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
    "grid": optuna.samplers.GridSampler,
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_drives_plan_sampling(name):
    doc = {**TINY, "search": {"sampler": name, "seed": 3}}
    doc["space"] = {
        **TINY["space"],
        "pruning": {**TINY["space"]["pruning"], "distribution": "per_layer"},
        "quantization": {"bits": {"low": 2, "high": 8}},
    }
    space = parse_space(doc)
    sampler = make_sampler(space, offset=0, layer_names=["conv1", "fc"])
    assert isinstance(sampler, SAMPLERS[name])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=space.directions, sampler=sampler)
    plans = []
    for _ in range(12):
        trial = study.ask()
        plan = sample_plan(trial, space, ["conv1", "fc"])
        trial.set_constraint("accuracy_drop", plan.prune.sparsity - 0.5)
        study.tell(
            trial, [100 - 50 * plan.prune.sparsity, plan.quant.bits, 1.0 - plan.prune.sparsity]
        )
        plans.append(plan)
    assert all(isinstance(p, CompressionPlan) for p in plans)
    assert all(0.1 <= p.prune.sparsity <= 0.6 and 2 <= p.quant.bits <= 8 for p in plans)
    assert all(set(p.prune.layer_scale) == {"conv1", "fc"} for p in plans)
    params = set().union(*(t.params for t in study.trials))
    assert {"prune.structure", "quant.bits", "finetune.lr", "prune.layer.fc"} <= params
    assert "finetune.epochs" not in params  # a fixed knob is not a parameter


def test_parameters_that_cannot_matter_are_not_sampled():
    doc = {
        **TINY,
        "space": {
            "quantization": {"bits": [16, 32]},
            "distillation": {"alpha": 0.0},
            "finetune": {"epochs": 1},
        },
    }
    space = parse_space(doc)
    study = optuna.create_study(directions=space.directions)
    trial = study.ask()
    plan = sample_plan(trial, space, [])
    assert plan.distill.alpha == 0.0 and plan.distill.temperature == 1.0
    assert "quant.granularity" not in trial.params and "distill.temperature" not in trial.params


def test_a_resumed_study_draws_new_points():
    space = parse_space({**TINY, "search": {"sampler": "random", "seed": 0}})
    first, later = make_sampler(space, 0), make_sampler(space, 5)
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    study = optuna.create_study()
    a = first.sample_independent(study, optuna.trial.create_trial(value=0.0), "x", dist)
    b = later.sample_independent(study, optuna.trial.create_trial(value=0.0), "x", dist)
    assert a != b


def test_the_grid_holds_every_parameter_at_evenly_spaced_values():
    doc = {**TINY, "search": {"sampler": "grid", "grid_levels": 3}}
    doc["space"] = {
        **TINY["space"],
        "pruning": {**TINY["space"]["pruning"], "distribution": "per_layer"},
        "quantization": {"bits": {"low": 2, "high": 8}},
        "finetune": {"epochs": 1, "lr": {"low": 0.0001, "high": 0.01, "log": True}},
    }
    grid = grid_space(parse_space(doc), ["conv1", "fc"])
    assert grid["prune.structure"] == ["unstructured", "channel"]
    assert grid["prune.channel.sparsity"] == pytest.approx([0.1, 0.35, 0.6])
    assert grid["prune.unstructured.sparsity"] == pytest.approx([0.1, 0.35, 0.6])
    assert grid["quant.bits"] == [2, 5, 8]
    assert grid["finetune.lr"] == pytest.approx([0.0001, 0.001, 0.01])  # log scale
    # parameters that exist only under others are found too
    assert {"prune.layer.conv1", "prune.layer.fc", "distill.temperature"} <= set(grid)
    assert "finetune.epochs" not in grid


def test_lattice_respects_steps_and_small_ranges():
    from optuna.distributions import FloatDistribution, IntDistribution

    assert lattice(IntDistribution(1, 2), 3) == [1, 2]
    assert lattice(IntDistribution(0, 12, step=4), 3) == [0, 8, 12]  # 1.5 steps round to 2
    assert lattice(FloatDistribution(0.0, 1.0, step=0.25), 3) == [0.0, 0.5, 1.0]


def test_the_grid_sampler_draws_distinct_lattice_points():
    doc = {**TINY, "search": {"sampler": "grid", "seed": 1, "grid_levels": 2}}
    space = parse_space(doc)
    grid = grid_space(space, ["conv1", "fc"])
    study = optuna.create_study(
        directions=space.directions, sampler=make_sampler(space, 0, ["conv1", "fc"])
    )
    seen = []
    for _ in range(10):
        trial = study.ask()
        sample_plan(trial, space, ["conv1", "fc"])
        assert all(value in grid[name] for name, value in trial.params.items())
        study.tell(trial, [1.0, 1.0, 1.0])
        seen.append(study.trials[-1].system_attrs["grid_id"])
    assert len(set(seen)) == 10


def test_an_exhausted_grid_keeps_drawing_and_every_worker_shares_one_order():
    doc = {**TINY, "search": {"sampler": "grid", "seed": 4, "grid_levels": 2}}
    doc["space"] = {"quantization": {"bits": [4, 8]}, "finetune": {"epochs": 0}}
    space = parse_space(doc)
    study = optuna.create_study(directions=space.directions)
    first, other = make_sampler(space, 0, []), make_sampler(space, 7, [])
    assert first._all_grids == other._all_grids  # the offset does not reorder the grid
    study.sampler = first
    for _ in range(3):  # two points, three trials: the third must not stop the study
        trial = study.ask()
        sample_plan(trial, space, [])
        study.tell(trial, [1.0, 1.0, 1.0])
    assert len(study.trials) == 3


def test_a_grid_too_large_to_list_is_refused():
    from paretoopt.errors import SpaceError

    doc = {**TINY, "search": {"sampler": "grid", "grid_levels": 20}}
    doc["space"] = {
        **TINY["space"],
        "pruning": {**TINY["space"]["pruning"], "distribution": "per_layer"},
    }
    layers = [f"l{i}" for i in range(8)]
    with pytest.raises(SpaceError, match="lower grid_levels"):
        grid_space(parse_space(doc), layers)


# --------------------------------------------------------------------------- anchors


def _conv_like(objectives: list[str] | None = None, trials: int = 60) -> dict:
    doc = {**TINY, "search": {"trials": trials, "seed": 0}}
    if objectives:
        doc["objectives"] = objectives
    doc["space"] = {
        "pruning": {
            "structure": ["unstructured", "channel"],
            "sparsity": {"low": 0.0, "high": 0.9},
        },
        "quantization": {
            "bits": {"low": 2, "high": 8},
            "activations": ["float", "int8"],
            "method": ["ptq", "qat"],
        },
        "distillation": {
            "temperature": {"low": 1.0, "high": 8.0},
            "alpha": {"low": 0.0, "high": 0.9},
        },
        "finetune": {"epochs": 3, "lr": {"low": 0.0003, "high": 0.003, "log": True}},
    }
    return doc


def test_anchor_plans_go_from_light_to_strong_with_the_knobs_that_move_the_objectives():
    from paretoopt.study.anchors import anchor_params

    anchors = anchor_params(parse_space(_conv_like()), ["conv1", "fc"])
    assert [a["prune.channel.sparsity"] for a in anchors] == pytest.approx([0.225, 0.45, 0.675])
    assert [a["quant.bits"] for a in anchors] == [6, 5, 4]  # 6.5 and 3.5 round to even
    for a in anchors:  # latency counts: what dense kernels run faster
        assert (a["prune.structure"], a["quant.activations"], a["quant.method"]) == (
            "channel",
            "int8",
            "qat",
        )
        assert a["distill.alpha"] == pytest.approx(0.45)
        assert a["finetune.lr"] == pytest.approx(0.003**0.5 * 0.0003**0.5)  # log middle
    small = anchor_params(parse_space(_conv_like(["accuracy", "size"])), ["conv1", "fc"])
    assert {(a["prune.structure"], a["quant.activations"]) for a in small} == {
        ("unstructured", "float")
    }
    assert [a["prune.unstructured.sparsity"] for a in small] == pytest.approx([0.225, 0.45, 0.675])


def test_anchors_factorize_more_as_they_grow_stronger_and_try_the_survey_s_first_options():
    """Low-rank ranks fall with strength like bits; each choice of the newer techniques
    starts where it helps (ratio ranks, Tucker-2, the linear grid, OBS on a mask), listed
    last in the file on purpose."""
    from paretoopt.study.anchors import anchor_params

    for objectives, structure in ((None, "channel"), (["accuracy", "size"], "unstructured")):
        doc = _conv_like(objectives)
        doc["space"]["lowrank"] = {
            "rank": {"low": 0.25, "high": 1.0},
            "criterion": ["energy", "ratio"],
            "energy": {"low": 0.5, "high": 1.0},
            "conv": ["spatial", "tucker2"],
        }
        doc["space"]["quantization"]["grid"] = ["kmeans", "uniform"]
        doc["space"]["pruning"]["reconstruction"] = ["none", "obs"]
        anchors = anchor_params(parse_space(doc), ["conv1", "fc"])
        assert [a["lowrank.rank"] for a in anchors] == pytest.approx([0.8125, 0.625, 0.4375])
        for a in anchors:
            assert (a["lowrank.criterion"], a["lowrank.conv"], a["quant.grid"]) == (
                "ratio",
                "tucker2",
                "uniform",
            )
            assert "lowrank.energy" not in a  # asked only of the energy criterion
            assert a["prune.structure"] == structure
            # OBS updates the weights a mask leaves: asked of unstructured pruning only
            assert a.get("prune.reconstruction") == ("obs" if structure == "unstructured" else None)


def test_listed_values_are_taken_by_strength_and_per_layer_knobs_each_get_one():
    from paretoopt.study.anchors import anchor_params

    doc = _conv_like()
    doc["space"]["quantization"] = {"bits": [4, 8, 32], "distribution": "per_layer"}
    doc["space"]["pruning"]["distribution"] = "per_layer"
    anchors = anchor_params(parse_space(doc), ["conv1", "conv2", "fc"])
    assert [a["quant.bits.layer.conv1"] for a in anchors] == [32, 8, 4]  # mildest first
    assert all(a["prune.layer.fc"] == 1.0 for a in anchors)  # the middle of 0.5..1.5
    assert all(a["quant.bits.layer.fc"] == a["quant.bits.layer.conv2"] for a in anchors)


def test_anchors_are_queued_once_and_drawn_as_the_plans_they_were_built_as():
    from paretoopt.study.anchors import ANCHOR_ATTR, anchor_count, anchor_params, queue_anchors

    space = parse_space(_conv_like())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=space.directions, sampler=make_sampler(space, 0))
    assert queue_anchors(study, space, ["conv1", "fc"]) == 3
    expected = anchor_params(space, ["conv1", "fc"])
    for rank in (1, 2, 3):
        trial = study.ask()
        plan = sample_plan(trial, space, ["conv1", "fc"])
        assert trial.user_attrs[ANCHOR_ATTR] == rank and trial.params == expected[rank - 1]
        assert plan.prune.structure == "channel" and plan.quant.activations == "int8"
        study.tell(trial, [99.0, 1.0, 1.0])
    assert queue_anchors(study, space, ["conv1", "fc"]) == 0  # a resumed study: none again
    assert anchor_count(parse_space(_conv_like(trials=8))) == 1  # a quarter of the trials
    assert anchor_count(parse_space({**_conv_like(), "search": {"sampler": "grid"}})) == 0


def test_anchor_values_lie_on_optunas_own_grid():
    """A range that its step does not divide ends, for Optuna, at the last step inside
    it; an anchor never lands beyond it or between two steps."""
    from paretoopt.study.anchors import _AnchorTrial

    with pytest.warns(UserWarning, match="not divisible"):
        optunas = optuna.distributions.FloatDistribution(0.0, 0.78, step=0.2)
    for strength in (0.25, 0.5, 0.75, 1.0):
        trial = _AnchorTrial(strength, latency=True)
        value = trial.suggest_float("prune.channel.sparsity", 0.0, 0.78, step=0.2)
        assert optunas._contains(value)
        assert value in (0.0, 0.2, 0.4, 0.6)
        bits = trial.suggest_int("quant.bits", 2, 9, step=2)
        assert bits in (2, 4, 6, 8)


def test_an_unknown_sampler_is_refused_not_replaced_by_random(tiny_doc):
    """A sampler name the space file would refuse, set from Python, fails loudly."""
    from dataclasses import replace

    from paretoopt.errors import SpaceError

    space = parse_space(tiny_doc)
    space = replace(space, search=replace(space.search, sampler="cmaes"))
    with pytest.raises(SpaceError, match="'cmaes' is not supported; choose from grid, tpe"):
        make_sampler(space, 0)


def test_every_plan_part_has_a_draw():
    from paretoopt.config.plan import PARTS
    from paretoopt.study.sampling import DRAWS

    assert set(DRAWS) == set(PARTS)


def test_each_part_says_which_way_its_knobs_are_stronger_and_what_to_try_first():
    from paretoopt.study.sampling import preferred, stronger

    assert stronger("prune.channel.sparsity") == "up" and stronger("quant.bits.layer.fc") == "down"
    assert stronger("finetune.lr") is None and stronger("prune.layer.fc") is None
    assert preferred(dense=True)["prune.structure"] == ("channel",)
    assert preferred(dense=False)["quant.activations"] == ("float",)
