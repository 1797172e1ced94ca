"""Pruning: which weights or whole channels go, how the budget spreads over layers, and
when (one shot or gradually, with or without regrowth). Applied by
``compress/techniques/prune``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from paretoopt.config.knobs import Choice, Fixed, Knob, Range, knob_values, setting, suggest
from paretoopt.config.parts import Drawing, Part, group_parameters, register, require

STRUCTURES = ("unstructured", "channel", "nm")
MASKED = ("unstructured", "nm")  # the structures that mask single weights
SALIENCIES = ("l1", "l2", "taylor", "hessian")
DISTRIBUTIONS = ("uniform", "global", "per_layer")
SCHEDULES = ("one_shot", "gradual")
RECONSTRUCTIONS = ("none", "obs")


@dataclass(frozen=True)
class PruningSpace:
    structure: Knob = setting(
        Choice(STRUCTURES[:2]),
        "unstructured (weights), channel (whole channels, physically removed) or nm "
        "(semi-structured: nm_keep of every nm_group consecutive weights of a row kept)",
        kind=str,
        options=STRUCTURES,
        knob=True,
    )
    nm_keep: int = setting(2, "weights kept in each group (structure nm)", kind=int, low=1, high=63)
    nm_group: int = setting(
        4,
        "consecutive weights of a row per group (structure nm): 2:4 by default",
        kind=int,
        low=2,
        high=64,
    )
    sparsity: Knob = setting(
        Range(0.0, 0.9),
        "fraction of weights (or channels) removed",
        kind=float,
        low=0.0,
        high=0.99,
        knob=True,
    )
    saliency: Knob = setting(
        Fixed("l2"),
        "which weights or channels go: l1 or l2 magnitude, taylor (|w x grad|), "
        "hessian (OBD: w^2 x diagonal Fisher)",
        kind=str,
        options=SALIENCIES,
        knob=True,
    )
    distribution: Knob = setting(
        Fixed("uniform"),
        "how the budget spreads over layers: uniform, global (one ranking across layers) "
        "or per_layer (a searched multiplier per layer group)",
        kind=str,
        options=DISTRIBUTIONS,
        knob=True,
    )
    layer_scale: Knob = setting(
        Range(0.5, 1.5),
        "per-layer multiplier of the global sparsity (distribution per_layer)",
        kind=float,
        low=0.0,
        high=10.0,
        knob=True,
    )
    layer_groups: int = setting(
        8,
        "most per-layer parameters: more prunable layers than this are split into this many "
        "groups of consecutive layers, one multiplier each",
        kind=int,
        low=1,
        high=1024,
    )
    schedule: Knob = setting(
        Fixed("one_shot"),
        "one_shot (prune, then fine-tune) or gradual (cubic schedule over fine-tuning)",
        kind=str,
        options=SCHEDULES,
        knob=True,
    )
    gradual_steps: int = setting(
        4, "pruning events of the gradual schedule", kind=int, low=1, high=1000
    )
    regrowth: Knob = setting(
        Fixed(False),
        "RigL-style drop-and-regrow at constant sparsity during fine-tuning (unstructured, "
        "one-shot)",
        kind=bool,
        options=(False, True),
        knob=True,
    )
    reconstruction: Knob = setting(
        Fixed("none"),
        "none, or obs (Optimal Brain Surgeon, layer-wise as in SparseGPT: weights go by "
        "w^2 / [H^-1]_jj and the rest are updated to make up for them, H from calibration "
        "inputs; unstructured)",
        kind=str,
        options=RECONSTRUCTIONS,
        knob=True,
    )
    regrowth_interval: int = setting(
        10, "optimizer steps between regrowth events", kind=int, low=1, high=1_000_000
    )
    saliency_batches: int = setting(
        4,
        "batches of 64 used to estimate gradients for taylor and hessian, and the inputs' "
        "Hessian for obs",
        kind=int,
        low=1,
        high=10_000,
    )
    round_to: int = setting(
        1, "keep channel counts at multiples of this (channel pruning)", kind=int, low=1, high=1024
    )


@dataclass(frozen=True)
class PruneConfig:
    structure: str = "unstructured"
    sparsity: float = 0.0
    saliency: str = "l2"
    distribution: str = "uniform"
    # per-layer multipliers (distribution per_layer); out of the hash so a plan stays hashable
    layer_scale: Mapping[str, float] = field(default_factory=dict, hash=False)
    schedule: str = "one_shot"
    gradual_steps: int = 4
    regrowth: bool = False
    regrowth_interval: int = 10
    reconstruction: str = "none"  # or "obs": Optimal Brain Surgeon's update (unstructured)
    nm_keep: int = 2  # structure nm: weights kept in every group of nm_group
    nm_group: int = 4
    saliency_batches: int = 4
    round_to: int = 1

    def __post_init__(self) -> None:
        for name, value, options in (
            ("structure", self.structure, STRUCTURES),
            ("saliency", self.saliency, SALIENCIES),
            ("distribution", self.distribution, DISTRIBUTIONS),
            ("schedule", self.schedule, SCHEDULES),
            ("reconstruction", self.reconstruction, RECONSTRUCTIONS),
        ):
            require(
                value in options,
                f"prune.{name}: {value!r} is not supported; choose from {', '.join(options)}",
            )
        require(
            0.0 <= self.sparsity < 1.0,
            f"prune.sparsity: 0 <= sparsity < 1 must hold, but got {self.sparsity}",
        )
        for name in ("round_to", "gradual_steps", "regrowth_interval", "saliency_batches"):
            require(
                getattr(self, name) >= 1, f"prune.{name}: must be >= 1, got {getattr(self, name)}"
            )
        require(
            not self.regrowth or (self.structure == "unstructured" and self.schedule == "one_shot"),
            "prune.regrowth: needs structure 'unstructured' and schedule 'one_shot' "
            f"(sparsity stays constant), but got {self.structure!r}, {self.schedule!r}",
        )
        require(
            self.reconstruction == "none" or self.structure in MASKED,
            "prune.reconstruction: 'obs' updates the weights left in a layer, which needs "
            f"structure 'unstructured' or 'nm', but got {self.structure!r}",
        )
        if self.structure == "nm":
            self._check_nm()
        require(
            bool(self.layer_scale) == (self.distribution == "per_layer" and self.active)
            or not self.active,
            "prune.layer_scale: given exactly when the distribution "
            f"is per_layer, but got {self.distribution!r} with "
            f"{len(self.layer_scale)} multipliers",
        )
        for name, scale in self.layer_scale.items():
            require(scale >= 0.0, f"prune.layer_scale[{name!r}]: must be >= 0, got {scale}")

    def _check_nm(self) -> None:
        require(
            1 <= self.nm_keep < self.nm_group <= 64,
            f"prune.nm_keep, nm_group: 1 <= keep < group <= 64 must hold, got "
            f"{self.nm_keep}:{self.nm_group}",
        )
        want = 1.0 - self.nm_keep / self.nm_group
        require(
            self.sparsity in (0.0, want),
            f"prune.sparsity: structure nm {self.nm_keep}:{self.nm_group} removes {want:g} of "
            f"the weights, but got {self.sparsity}",
        )
        require(
            self.distribution == "uniform" and self.schedule == "one_shot" and not self.regrowth,
            "prune.structure: nm keeps the same share of every group, at once: it needs "
            f"distribution uniform and schedule one_shot without regrowth, but got "
            f"{self.distribution!r}, {self.schedule!r}, regrowth {self.regrowth}",
        )

    def scale(self, layer: str) -> float:
        """One layer's multiplier; a factor of a factorized layer (``fc1.0`` of ``fc1``)
        takes its layer's."""
        while layer not in self.layer_scale and "." in layer:
            layer = layer.rpartition(".")[0]
        return self.layer_scale.get(layer, 1.0)

    def layer_sparsity(self, layer: str) -> float:
        """The budget of one layer: the global level scaled by its multiplier, capped."""
        return min(self.sparsity * self.scale(layer), 0.99)

    @property
    def active(self) -> bool:
        return self.sparsity > 0.0


def draw(d: Drawing) -> PruneConfig:
    trial, layer_names, epochs = d.trial, d.layer_names, d.epochs
    p = d.section("prune")
    structure = str(suggest(trial, "prune.structure", p.structure))
    fixed = {
        "round_to": p.round_to,
        "gradual_steps": p.gradual_steps,
        "regrowth_interval": p.regrowth_interval,
        "saliency_batches": p.saliency_batches,
        "nm_keep": p.nm_keep,
        "nm_group": p.nm_group,
    }
    if structure == "nm":  # the pattern fixes the sparsity, the spread and the schedule
        return PruneConfig(
            "nm",
            1.0 - p.nm_keep / p.nm_group,
            str(suggest(trial, "prune.saliency", p.saliency)),
            reconstruction=str(suggest(trial, "prune.reconstruction", p.reconstruction)),
            **fixed,
        )
    # One sparsity parameter per structure: 0.5 of the channels removes about 75 % of the
    # weights, so the two levels mean different things and the sampler must learn them apart.
    sparsity = float(suggest(trial, f"prune.{structure}.sparsity", p.sparsity))
    if sparsity == 0.0:
        return PruneConfig(structure, 0.0, **fixed)
    distribution = str(suggest(trial, "prune.distribution", p.distribution))
    if distribution == "per_layer" and not layer_names:  # only the classifier is prunable
        distribution = "uniform"
    scales = layer_multipliers(d) if distribution == "per_layer" else {}
    schedule = str(suggest(trial, "prune.schedule", p.schedule)) if epochs else "one_shot"
    regrowth = (
        bool(suggest(trial, "prune.regrowth", p.regrowth))
        if epochs and structure == "unstructured" and schedule == "one_shot"
        else False
    )
    saliency = str(suggest(trial, "prune.saliency", p.saliency))
    reconstruction = (
        str(suggest(trial, "prune.reconstruction", p.reconstruction))
        if structure == "unstructured"
        else "none"
    )
    return PruneConfig(
        structure,
        sparsity,
        saliency,
        distribution,
        scales,
        schedule,
        regrowth=regrowth,
        reconstruction=reconstruction,
        **fixed,
    )


def layer_multipliers(d: Drawing) -> dict[str, float]:
    """One pruning multiplier per layer group."""
    p = d.section("prune")
    out = {}
    for name, group in group_parameters(d.layer_names, p.layer_groups, "prune"):
        out.update(dict.fromkeys(group, float(suggest(d.trial, name, p.layer_scale))))
    return out


def describe(plan: Mapping[str, Any]) -> str:
    """e.g. "dense", "channel 0.50 l2 uniform", "unstructured 0.80 taylor global gradual"."""
    p = plan["prune"]
    if not p.active:
        return "dense"
    if p.structure == "nm":
        return " ".join(
            [f"{p.nm_keep}:{p.nm_group}", p.saliency]
            + (["obs"] if p.reconstruction == "obs" else [])
        )
    parts = [p.structure, f"{p.sparsity:.2f}", p.saliency, p.distribution.replace("_", "-")]
    parts += ["obs"] if p.reconstruction == "obs" else []
    parts += ["gradual"] if p.schedule == "gradual" else []
    parts += ["regrow"] if p.regrowth else []
    return " ".join(parts)


def check(space: Any) -> list[str]:
    """Choices that could never take effect: an error, not a silent no-op."""
    p = space.space.pruning
    if "nm" in knob_values(p.structure) and not p.nm_keep < p.nm_group:
        return [
            f"space.pruning.nm_keep: {p.nm_keep} of every nm_group {p.nm_group} keeps them "
            "all; nm_keep < nm_group must hold"
        ]
    if "obs" in knob_values(p.reconstruction) and not set(MASKED) & set(knob_values(p.structure)):
        allowed = list(knob_values(p.structure))
        return [
            "space.pruning.reconstruction: obs updates the weights left in a layer, which "
            f"needs structure unstructured or nm, but structure allows only {allowed}"
        ]
    return []


PART = register(
    Part(
        name="prune",
        section="pruning",
        doc="pruning knobs",
        settings=PruningSpace,
        config=PruneConfig,
        draw=draw,
        draw_order=1,
        changes_model=lambda cfg: cfg.active,
        describe=describe,
        check=check,
        prefer={
            "prune.distribution": ("uniform",),
            "prune.schedule": ("one_shot",),
            "prune.regrowth": (False,),
            "prune.reconstruction": ("obs",),  # it only ever helps a one-shot mask
        },
        prefer_dense={"prune.structure": ("channel",)},
        prefer_sparse={"prune.structure": ("unstructured",)},
        stronger={"prune.unstructured.sparsity": "up", "prune.channel.sparsity": "up"},
    )
)
