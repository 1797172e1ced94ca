"""Plan sampling: one Optuna trial becomes one compression plan.

Each searched knob of the space file is one Optuna parameter (fixed knobs are not), and a
knob that cannot matter for the plan being drawn is not sampled at all. The sampler is
the space's (TPE by default), seeded so that a resumed study draws new points.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optuna

from paretoopt.config.knobs import suggest
from paretoopt.config.parts import Drawing, Part, drawn
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import Space
from paretoopt.errors import SpaceError


def sample_plan(
    trial: optuna.Trial,
    space: Space,
    layer_names: list[str],
    quant_layers: list[str] | None = None,
) -> CompressionPlan:
    """Turn one Optuna trial into a compression plan, one part at a time (``DRAWS``),
    the fine-tuning epochs first (most knobs matter only with fine-tuning).
    Fixed knobs are not parameters, and neither is a knob that cannot matter for this
    plan (no saliency without pruning, no temperature without distillation).
    `layer_names` get per-layer pruning budgets, `quant_layers` (by default the same)
    per-layer bit-widths."""
    epochs = int(suggest(trial, "finetune.epochs", space.space.finetune.epochs))
    quant_layers = layer_names if quant_layers is None else quant_layers
    drawing = Drawing(trial, space, layer_names, quant_layers, epochs)
    return CompressionPlan(**{name: part.draw(drawing) for name, part in DRAWS.items()})


# plan part -> how it is drawn (config/parts), in the order the parameters are suggested
# (a seeded sampler reproduces its plans only in the same order)
DRAWS: dict[str, Part] = {part.name: part for part in drawn()}


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
