"""Low-rank factorization: a layer becomes a product of thinner layers that computes a
rank-r approximation of it. A Linear layer (or a 1x1 convolution) of rank r becomes two
(truncated SVD); a KxK convolution becomes 1x1 -> KxK -> 1x1 with r_in and r_out channels
in the middle (Tucker-2), or Kx1 -> 1xK with r channels between (spatial). Pruning then
acts on the factors. How much rank each layer keeps is a share of its full rank, one for
every layer or a searched multiplier per layer group, or the least rank that keeps a share
of the weight's energy (its squared singular values). Applied by
``compress/techniques/lowrank``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from paretoopt.config.knobs import Fixed, Knob, Range, knob_values, setting, suggest
from paretoopt.config.parts import Drawing, Part, group_parameters, register, require

CRITERIA = ("ratio", "energy")
CONV_KINDS = ("tucker2", "spatial")  # how a KxK convolution is factorized
DISTRIBUTIONS = ("uniform", "per_layer")


@dataclass(frozen=True)
class LowRankSpace:
    rank: Knob = setting(
        Fixed(1.0),
        "share of each layer's full rank kept (criterion ratio); 1 = no factorization. A "
        "layer whose factors would not be smaller than itself is kept whole",
        kind=float,
        low=0.01,
        high=1.0,
        knob=True,
    )
    criterion: Knob = setting(
        Fixed("ratio"),
        "ratio (each layer keeps `rank` of its full rank) or energy (the least rank that "
        "keeps `energy` of the weight's squared singular values)",
        kind=str,
        options=CRITERIA,
        knob=True,
    )
    energy: Knob = setting(
        Fixed(1.0),
        "share of the squared singular values kept (criterion energy); 1 = no factorization",
        kind=float,
        low=0.1,
        high=1.0,
        knob=True,
    )
    conv: Knob = setting(
        Fixed("tucker2"),
        "how a KxK convolution is factorized: tucker2 (1x1 -> KxK -> 1x1, the channel "
        "modes) or spatial (Kx1 -> 1xK, the kernel's rows and columns)",
        kind=str,
        options=CONV_KINDS,
        knob=True,
    )
    distribution: Knob = setting(
        Fixed("uniform"),
        "uniform (one rank share) or per_layer (a searched multiplier of it per layer "
        "group; criterion ratio)",
        kind=str,
        options=DISTRIBUTIONS,
        knob=True,
    )
    layer_scale: Knob = setting(
        Range(0.5, 1.5),
        "per-layer multiplier of the rank share (distribution per_layer)",
        kind=float,
        low=0.0,
        high=100.0,
        knob=True,
    )
    layer_groups: int = setting(
        8,
        "most per-layer parameters: more layers than this are split into this many groups "
        "of consecutive layers, one multiplier each",
        kind=int,
        low=1,
        high=1024,
    )


@dataclass(frozen=True)
class LowRankConfig:
    rank: float = 1.0  # share of the full rank (criterion ratio)
    criterion: str = "ratio"
    energy: float = 1.0  # share of the squared singular values (criterion energy)
    # per-layer multipliers of `rank`; out of the hash so a plan stays hashable
    layer_scale: Mapping[str, float] = field(default_factory=dict, hash=False)
    conv: str = "tucker2"  # or "spatial": KxK convolutions as Kx1 -> 1xK

    def __post_init__(self) -> None:
        require(
            self.conv in CONV_KINDS,
            f"lowrank.conv: {self.conv!r} is not supported; choose from {', '.join(CONV_KINDS)}",
        )
        require(
            self.criterion in CRITERIA,
            f"lowrank.criterion: {self.criterion!r} is not supported; "
            f"choose from {', '.join(CRITERIA)}",
        )
        for name in ("rank", "energy"):
            value = getattr(self, name)
            require(0.0 < value <= 1.0, f"lowrank.{name}: 0 < {name} <= 1 must hold, got {value}")
        require(
            self.criterion == "ratio" or not self.layer_scale,
            "lowrank.layer_scale: per-layer multipliers scale the rank share (criterion "
            f"ratio), but the criterion is {self.criterion!r}",
        )
        for name, scale in self.layer_scale.items():
            require(scale > 0.0, f"lowrank.layer_scale[{name!r}]: must be > 0, got {scale}")

    def share(self, layer: str) -> float:
        """The share of `layer`'s full rank it keeps (criterion ratio), capped at 1."""
        return min(self.rank * self.layer_scale.get(layer, 1.0), 1.0)

    @property
    def active(self) -> bool:
        if self.criterion == "energy":
            return self.energy < 1.0
        return self.rank < 1.0 or any(self.share(n) < 1.0 for n in self.layer_scale)


def draw(d: Drawing) -> LowRankConfig:
    k = d.section("lowrank")
    criterion = str(suggest(d.trial, "lowrank.criterion", k.criterion))
    if criterion == "energy":
        energy = float(suggest(d.trial, "lowrank.energy", k.energy))
        conv = str(suggest(d.trial, "lowrank.conv", k.conv)) if energy < 1.0 else "tucker2"
        return LowRankConfig(criterion="energy", energy=energy, conv=conv)
    rank = float(suggest(d.trial, "lowrank.rank", k.rank))
    if rank == 1.0 and isinstance(k.rank, Fixed):  # factorization is off in this space
        return LowRankConfig()
    conv = str(suggest(d.trial, "lowrank.conv", k.conv))
    distribution = str(suggest(d.trial, "lowrank.distribution", k.distribution))
    scales: dict[str, float] = {}
    if distribution == "per_layer":
        for name, group in group_parameters(d.layer_names, k.layer_groups, "lowrank.scale"):
            scales.update(dict.fromkeys(group, float(suggest(d.trial, name, k.layer_scale))))
    return LowRankConfig(rank, layer_scale=scales, conv=conv)


def describe(plan: Mapping[str, Any]) -> str:
    """e.g. "rank 0.25", "rank 0.40 per-layer", "rank e0.95" ("" when not factorized)."""
    cfg = plan["lowrank"]
    if not cfg.active:
        return ""
    spatial = " spatial" if cfg.conv == "spatial" else ""
    if cfg.criterion == "energy":
        return f"rank e{cfg.energy:.2f}{spatial}"
    return f"rank {cfg.rank:.2f}" + (" per-layer" if cfg.layer_scale else "") + spatial


def check(space: Any) -> list[str]:
    """Settings that could never take effect: an error, not a silent no-op."""
    k, at = space.space.lowrank, "space.lowrank"
    criteria = set(knob_values(k.criterion))
    rules = [
        (
            criteria == {"energy"} and not isinstance(k.rank, Fixed),
            f"{at}.rank: searched, but the criterion is always energy; search energy instead",
        ),
        (
            "energy" not in criteria and not isinstance(k.energy, Fixed),
            f"{at}.energy: searched, but the criterion is never energy; add energy to it",
        ),
        (
            not isinstance(k.conv, Fixed) and k.rank == Fixed(1.0) and k.energy == Fixed(1.0),
            f"{at}.conv: searched, but rank and energy are fixed at 1 (no factorization)",
        ),
        (
            "per_layer" in knob_values(k.distribution) and k.rank == Fixed(1.0),
            f"{at}.distribution: per_layer scales the rank share, but rank is fixed at 1 (no "
            "factorization); give rank a value below 1 or a range",
        ),
    ]
    return [message for broken, message in rules if broken]


PART = register(
    Part(
        name="lowrank",
        section="lowrank",
        doc="low-rank factorization knobs",
        settings=LowRankSpace,
        config=LowRankConfig,
        draw=draw,
        draw_order=4,  # after the others: spaces without it draw as before
        changes_model=lambda cfg: cfg.active,
        describe=describe,
        check=check,
        prefer={
            "lowrank.distribution": ("uniform",),
            "lowrank.criterion": ("ratio",),
            "lowrank.conv": ("tucker2",),
        },
        stronger={"lowrank.rank": "down", "lowrank.energy": "down", "lowrank.scale": "down"},
    )
)
