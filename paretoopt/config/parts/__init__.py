"""The parts of a compression plan, one module each: a technique's torch-free half.

A part owns its section of the space file (``space.<section>``: a frozen dataclass of
``setting``s), its frozen config in the plan (whose defaults do nothing), how a trial
draws that config from the section (``draw``), the rules its settings must meet across
the file (``check``), its words in a plan's one-line summary, and the hints the study's
first plans (``search/anchors``) read. The space, the plan and the sampler iterate over
the registry; none of them names a part. A technique's torch half (how it is applied,
what it records per layer, how the artifact replays it) is its module in
``compress/techniques``. No torch here, and no Optuna: a draw only calls
``knobs.suggest`` on the trial it is handed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paretoopt.errors import PlanError

if TYPE_CHECKING:
    import optuna

    from paretoopt.config.space import Space


@dataclass(frozen=True)
class Drawing:
    """What every part's draw reads: the trial, the space, the model's layers, and the
    fine-tuning epochs, drawn first since most knobs matter only with fine-tuning."""

    trial: optuna.Trial
    space: Space
    layer_names: list[str]  # per-layer pruning budgets
    quant_layers: list[str]  # per-layer bit-widths
    epochs: int

    def section(self, name: str) -> Any:
        """The space file's section of part `name` (``space.<section>``)."""
        return getattr(self.space.space, PARTS[name].section)


@dataclass(frozen=True)
class Part:
    """One plan part: see the module's docstring. The hints say how the study's first
    plans set its parameters: the options an engineer would try first, and which way is
    stronger."""

    name: str  # the plan's key, and the prefix of its Optuna parameters
    section: str  # its section of the space file, under space:
    doc: str
    settings: type  # the section: a frozen dataclass of settings
    config: type  # the plan part: a frozen dataclass whose defaults do nothing
    draw: Callable[[Drawing], Any]
    # position among the draws: a seeded sampler reproduces its plans only in one order
    draw_order: int
    changes_model: Callable[[Any], bool]  # does this config alone change the baseline?
    describe: Callable[[Mapping[str, Any]], str] = lambda plan: ""  # words in the summary
    check: Callable[[Space], list[str]] = lambda space: []  # cross-setting rules broken
    check_plan: Callable[[Mapping[str, Any]], str | None] = lambda plan: None
    prefer: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # parameter -> options
    # where a dense objective counts (latency, MACs: zeros skip no work), and where not
    prefer_dense: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    prefer_sparse: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    stronger: Mapping[str, str] = field(default_factory=dict)  # name prefix -> "up" | "down"


PARTS: dict[str, Part] = {}
BUILTIN = (
    "prune",
    "lowrank",
    "quant",
    "distill",
    "finetune",
    "coding",
)  # modules of this package, plan order


def register(part: Part) -> Part:
    """Add a part to every plan, space file and draw."""
    if part.name in PARTS:
        raise ValueError(f"plan part {part.name!r} is registered twice")
    PARTS[part.name] = part
    return part


def registered() -> dict[str, Part]:
    """Every plan part, in plan order (the built-ins first)."""
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")  # registers it
    return PARTS


def drawn() -> list[Part]:
    """Every plan part, in the order trials draw them."""
    return sorted(registered().values(), key=lambda p: p.draw_order)


def require(ok: bool, message: str) -> None:
    """A plan part's own rule (its config's __post_init__)."""
    if not ok:
        raise PlanError(message)


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
