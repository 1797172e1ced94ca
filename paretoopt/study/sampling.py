"""Plan sampling: one Optuna trial becomes one compression plan.

Each searched knob of the space file is one Optuna parameter (fixed knobs are not), and a
knob that cannot matter for the plan being drawn is not sampled at all. The sampler is
the space's (TPE by default), seeded so that a resumed study draws new points.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from paretoopt.config.knobs import Choice, Fixed, Knob, Range, Scalar
from paretoopt.config.plan import (
    CompressionPlan,
    DistillConfig,
    FinetuneConfig,
    PruneConfig,
    QuantConfig,
)
from paretoopt.config.space import Space
from paretoopt.errors import SpaceError


def suggest(trial: optuna.Trial, name: str, knob: Knob) -> Scalar:
    if isinstance(knob, Fixed):
        return knob.value
    if isinstance(knob, Choice):
        return trial.suggest_categorical(name, list(knob.options))
    return _suggest_range(trial, name, knob)


def _suggest_range(trial: optuna.Trial, name: str, knob: Range) -> Scalar:
    if knob.integer:
        return trial.suggest_int(
            name, int(knob.low), int(knob.high), step=int(knob.step or 1), log=knob.log
        )
    return trial.suggest_float(name, knob.low, knob.high, step=knob.step, log=knob.log)


@dataclass(frozen=True)
class Drawing:
    """What every part's draw reads: the trial, the space, the model's layers, and the
    fine-tuning epochs, drawn first since most knobs matter only with fine-tuning."""

    trial: optuna.Trial
    space: Space
    layer_names: list[str]  # per-layer pruning budgets
    quant_layers: list[str]  # per-layer bit-widths
    epochs: int


Draw = Callable[[Drawing], Any]  # one plan part's config


@dataclass(frozen=True)
class Part:
    """How one plan part is sampled, and how the study's first plans (``anchors``) set
    its parameters: the options an engineer would try first, and which way is stronger."""

    draw: Draw
    prefer: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # parameter -> options
    # where a dense objective counts (latency, MACs: zeros skip no work), and where not
    prefer_dense: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    prefer_sparse: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    stronger: Mapping[str, str] = field(default_factory=dict)  # name prefix -> "up" | "down"


def sample_plan(
    trial: optuna.Trial,
    space: Space,
    layer_names: list[str],
    quant_layers: list[str] | None = None,
) -> CompressionPlan:
    """Turn one Optuna trial into a compression plan, one part at a time (``DRAWS``).
    Fixed knobs are not parameters, and neither is a knob that cannot matter for this
    plan (no saliency without pruning, no temperature without distillation).
    `layer_names` get per-layer pruning budgets, `quant_layers` (by default the same)
    per-layer bit-widths."""
    epochs = int(suggest(trial, "finetune.epochs", space.space.finetune.epochs))
    quant_layers = layer_names if quant_layers is None else quant_layers
    drawing = Drawing(trial, space, layer_names, quant_layers, epochs)
    return CompressionPlan(**{name: part.draw(drawing) for name, part in DRAWS.items()})


def _draw_distill(d: Drawing) -> DistillConfig:
    k = d.space.space.distillation
    alpha = float(suggest(d.trial, "distill.alpha", k.alpha)) if d.epochs else 0.0
    temperature = float(suggest(d.trial, "distill.temperature", k.temperature)) if alpha else 1.0
    return DistillConfig(temperature, alpha)


def _draw_prune(d: Drawing) -> PruneConfig:
    trial, space, layer_names, epochs = d.trial, d.space, d.layer_names, d.epochs
    p = space.space.pruning
    structure = str(suggest(trial, "prune.structure", p.structure))
    # One sparsity parameter per structure: 0.5 of the channels removes about 75 % of the
    # weights, so the two levels mean different things and the sampler must learn them apart.
    sparsity = float(suggest(trial, f"prune.{structure}.sparsity", p.sparsity))
    fixed = {
        "round_to": p.round_to,
        "gradual_steps": p.gradual_steps,
        "regrowth_interval": p.regrowth_interval,
        "saliency_batches": p.saliency_batches,
    }
    if sparsity == 0.0:
        return PruneConfig(structure, 0.0, **fixed)
    distribution = str(suggest(trial, "prune.distribution", p.distribution))
    if distribution == "per_layer" and not layer_names:  # only the classifier is prunable
        distribution = "uniform"
    scales = layer_multipliers(trial, space, layer_names) if distribution == "per_layer" else {}
    schedule = str(suggest(trial, "prune.schedule", p.schedule)) if epochs else "one_shot"
    regrowth = (
        bool(suggest(trial, "prune.regrowth", p.regrowth))
        if epochs and structure == "unstructured" and schedule == "one_shot"
        else False
    )
    return PruneConfig(
        structure,
        sparsity,
        str(suggest(trial, "prune.saliency", p.saliency)),
        distribution,
        scales,
        schedule,
        regrowth=regrowth,
        **fixed,
    )


def _draw_finetune(d: Drawing) -> FinetuneConfig:
    f = d.space.space.finetune
    lr = float(suggest(d.trial, "finetune.lr", f.lr)) if d.epochs else 1e-3
    return FinetuneConfig(d.epochs, lr, f.batch_size)


def layer_groups(layer_names: list[str], groups: int) -> list[list[str]]:
    """Consecutive layers in at most `groups` groups of near-equal size (depth order)."""
    n = len(layer_names)
    if n == 0:
        return []
    count = min(groups, n)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [layer_names[bounds[i] : bounds[i + 1]] for i in range(count)]


def group_parameters(
    layer_names: list[str], groups: int, prefix: str
) -> list[tuple[str, list[str]]]:
    """One Optuna parameter per layer group: `<prefix>.layer.<name>` for a group of one
    layer, `<prefix>.layers.<first>..<last>` for several."""
    return [
        (
            f"{prefix}.layer.{group[0]}"
            if len(group) == 1
            else f"{prefix}.layers.{group[0]}..{group[-1]}",
            group,
        )
        for group in layer_groups(layer_names, groups)
    ]


def layer_multipliers(
    trial: optuna.Trial,
    space: Space,
    layer_names: list[str],
) -> dict[str, float]:
    """One pruning multiplier per layer group."""
    p = space.space.pruning
    out = {}
    for name, group in group_parameters(layer_names, p.layer_groups, "prune"):
        out.update(dict.fromkeys(group, float(suggest(trial, name, p.layer_scale))))
    return out


def _draw_quant(d: Drawing) -> QuantConfig:
    trial, layer_names, epochs = d.trial, d.quant_layers, d.epochs
    q = d.space.space.quantization
    distribution = str(suggest(trial, "quant.distribution", q.distribution))
    layer_bits: dict[str, int] = {}
    if distribution == "per_layer" and layer_names:  # mixed precision, HAQ-style
        for name, group in group_parameters(layer_names, q.layer_groups, "quant.bits"):
            layer_bits.update(dict.fromkeys(group, int(suggest(trial, name, q.bits))))
        bits = max(layer_bits.values())
    else:
        bits = int(suggest(trial, "quant.bits", q.bits))
    widths = set(layer_bits.values()) or {bits}
    fixed = {"layer_bits": layer_bits, "calibration_samples": q.calibration_samples}
    half = str(suggest(trial, "quant.half_type", q.half_type)) if 16 in widths else "float16"
    if min(widths) > 8:  # no integer grid: granularity, scheme, activations cannot matter
        return QuantConfig(bits, half_type=half, **fixed)
    activations = str(suggest(trial, "quant.activations", q.activations))
    only_8 = {w for w in widths if w <= 8} == {8}
    return QuantConfig(
        bits,
        granularity=str(suggest(trial, "quant.granularity", q.granularity)),
        # 8-bit weights with int8 activations are always symmetric: nothing to choose
        scheme="symmetric"
        if activations == "int8" and only_8
        else str(suggest(trial, "quant.scheme", q.scheme)),
        half_type=half,
        activations=activations,
        method=str(suggest(trial, "quant.method", q.method)) if epochs else "ptq",
        **fixed,
    )


# plan part -> its draw, in the order the parameters are suggested (a seeded sampler
# reproduces its plans only in the same order); every part of plan.PARTS has one
DRAWS: dict[str, Part] = {
    "distill": Part(_draw_distill),
    "prune": Part(
        _draw_prune,
        prefer={
            "prune.distribution": ("uniform",),
            "prune.schedule": ("one_shot",),
            "prune.regrowth": (False,),
        },
        prefer_dense={"prune.structure": ("channel",)},
        prefer_sparse={"prune.structure": ("unstructured",)},
        stronger={"prune.unstructured.sparsity": "up", "prune.channel.sparsity": "up"},
    ),
    "quant": Part(
        _draw_quant,
        prefer={
            "quant.distribution": ("uniform",),
            "quant.granularity": ("per_channel",),
            "quant.scheme": ("symmetric",),
            "quant.method": ("qat",),  # only asked with fine-tuning
        },
        prefer_dense={"quant.activations": ("int8",)},
        prefer_sparse={"quant.activations": ("float",)},
        stronger={"quant.bits": "down"},  # per-layer widths too: quant.bits.layer...
    ),
    "finetune": Part(_draw_finetune),
}


def preferred(dense: bool) -> dict[str, tuple[Any, ...]]:
    """Every part's preferred options, for a study with (or without) a dense objective."""
    out: dict[str, tuple[Any, ...]] = {}
    for part in DRAWS.values():
        out |= {**part.prefer, **(part.prefer_dense if dense else part.prefer_sparse)}
    return out


def stronger(name: str) -> str | None:
    """Which way parameter `name` makes a plan stronger ("up", "down"), if it does."""
    for part in DRAWS.values():
        for prefix, way in part.stronger.items():
            if name.startswith(prefix):
                return way
    return None


def make_sampler(
    space: Space,
    offset: int,
    layer_names: list[str] | None = None,
    quant_layers: list[str] | None = None,
) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded so that a resumed study does not replay old draws. The
    grid sampler needs the model's layers, since per-layer knobs are parameters too."""
    seed = space.search.seed + offset
    name = space.search.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "grid":
            if layer_names is None:
                raise ValueError("the grid sampler needs the model's layer names")
            # one order of the points for every worker and session: grid ids are shared
            return _Grid(grid_space(space, layer_names, quant_layers), seed=space.search.seed)
        builders = {
            # multivariate: sparsity and bits interact
            "tpe": lambda: optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, n_startup_trials=10
            ),
            # a fixed population: --trials must not change it mid-study
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=16),
            "gp": lambda: optuna.samplers.GPSampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        }
        if name not in builders:  # a name the space file would have refused
            raise SpaceError(
                f"search.sampler: {name!r} is not supported; choose from grid, "
                f"{', '.join(builders)}"
            )
        return builders[name]()


GRID_PROBES = 512  # random plans drawn to find every parameter a plan can have
GRID_POINTS = 1_000_000  # Optuna lists every point in memory


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, minus its ``study.stop()`` once every point is visited: that works
    only inside ``optimize``. Past that, points are drawn again; the trial count ends
    the study."""

    def after_trial(self, *args: Any, **kwargs: Any) -> None:
        pass


def grid_space(
    space: Space, layer_names: list[str], quant_layers: list[str] | None = None
) -> dict[str, list[Any]]:
    """The lattice a user would lay out by hand: every parameter ``sample_plan`` can
    suggest, at ``search.grid_levels`` evenly spaced values each (every option of a
    choice). Some parameters exist only under others (no temperature without
    distillation), so they are found by drawing plans at random, with a fixed seed."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for _ in range(GRID_PROBES):
        trial = probe.ask()
        sample_plan(trial, space, layer_names, quant_layers)
        found.update(trial.distributions)
    grid = {name: lattice(d, space.search.grid_levels) for name, d in sorted(found.items())}
    points = math.prod(len(values) for values in grid.values())
    if points > GRID_POINTS:
        raise SpaceError(
            f"search.sampler: grid: {len(grid)} parameters at search.grid_levels "
            f"{space.search.grid_levels} make {points:.3g} points, more than "
            f"{GRID_POINTS:,}; lower grid_levels, fix some knobs or use fewer layer groups"
        )
    return grid


def lattice(distribution: optuna.distributions.BaseDistribution, levels: int) -> list[Any]:
    """`levels` evenly spaced values of a range (geometrically on a log scale, on its
    step where it has one); every option of a choice."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    d = distribution
    assert isinstance(d, (IntDistribution, optuna.distributions.FloatDistribution))
    space = np.geomspace if d.log else np.linspace
    points = space(d.low, d.high, levels)
    if d.step is not None:  # onto the step's grid, counted from low
        points = d.low + np.round((points - d.low) / d.step) * d.step
    if isinstance(d, IntDistribution):
        return sorted({int(round(p)) for p in points})
    return sorted({float(p) for p in points})
