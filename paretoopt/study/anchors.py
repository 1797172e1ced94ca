"""Anchor plans: the first trials of a study, queued before the sampler draws any.

A sampler starts with random trials, and in a space of a dozen knobs most random plans
spend a trial where no objective moves: unstructured pruning when latency counts (dense
kernels skip no zeros), float activations beside int8 kernels, PTQ at 2 bits. So a study
starts with a few plans an engineer would try first, from light to strong:

- each compression range at its share of the way from the mildest to the strongest end
  (sparsity up, bits down), by 1/(n+1), 2/(n+1), ... for n anchors;
- every other range at its middle (geometric for a log range);
- for each choice, the option that moves the study's objectives: channel pruning and
  int8 activations where latency is an objective, QAT when there is fine-tuning, uniform
  distributions, per-channel grids; otherwise the option listed first.

The anchors are drawn through `sample_plan` itself, so they hold exactly the parameters
a plan of their kind has (per-layer ones included), and the sampler learns from them as
from any trial. `search.anchors` sets how many; never more than a quarter of the trials,
and none for the grid sampler, whose order is the point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna

from paretoopt.config.metrics import METRICS
from paretoopt.config.space import Space
from paretoopt.results.frames import BASELINE_ATTR
from paretoopt.study.sampling import preferred, sample_plan, stronger

ANCHOR_ATTR = "paretoopt.anchor"  # user attr: the anchor's rank, 1 = lightest


class _AnchorTrial:
    """Answers `sample_plan`'s questions with one anchor's values, and keeps them."""

    def __init__(self, strength: float, latency: bool) -> None:
        self.strength = strength  # 0 mildest .. 1 strongest
        self.preferred = preferred(dense=latency)  # each part's options to try first
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        numbers = all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices)
        way = stronger(name)
        if numbers and way:  # listed values, e.g. bits: [4, 8, 32]
            ordered = sorted(choices, reverse=way == "down")  # mildest first
            return self._keep(name, ordered[round(self.strength * (len(ordered) - 1))])
        options = [c for c in self.preferred.get(name, ()) if c in choices]
        return self._keep(name, options[0] if options else choices[0])

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        high = low + (high - low) // step * step  # Optuna's own top of the range
        value = self._position(name, low, high, log)
        return self._keep(name, int(low + round((value - low) / step) * step))

    def suggest_float(
        self, name: str, low: float, high: float, step: float | None = None, log: bool = False
    ) -> float:
        if step:
            high = low + math.floor((high - low) / step + 1e-9) * step
        value = self._position(name, low, high, log)
        if step:  # on the grid, written as Optuna writes its points
            value = round(low + round((value - low) / step) * step, 12)
        return self._keep(name, float(min(max(value, low), high)))

    def _position(self, name: str, low: float, high: float, log: bool) -> float:
        way = stronger(name)
        if way == "up":  # e.g. more pruned
            return low + self.strength * (high - low)
        if way == "down":  # e.g. fewer bits
            return high - self.strength * (high - low)
        if log and low > 0:
            return math.sqrt(low * high)
        return (low + high) / 2

    def _keep(self, name: str, value: Any) -> Any:
        self.params[name] = value
        return value


def anchor_params(
    space: Space, layer_names: list[str], quant_layers: list[str] | None = None
) -> list[dict[str, Any]]:
    """The Optuna parameters of the space's anchor plans, lightest first; duplicates (a
    space whose only searched knobs do not change with strength) are dropped."""
    count = anchor_count(space)
    # an objective that dense kernels decide (latency, MACs): zeros do not move it
    latency = any(METRICS[m].dense for m in space.metrics)
    out: list[dict[str, Any]] = []
    for rank in range(1, count + 1):
        trial = _AnchorTrial(rank / (count + 1), latency)
        sample_plan(trial, space, layer_names, quant_layers)  # type: ignore[arg-type]
        if trial.params and trial.params not in out:
            out.append(trial.params)
    return out


def anchor_count(space: Space) -> int:
    """How many anchors a study of this space starts with."""
    if space.search.sampler == "grid":
        return 0
    return min(space.search.anchors, (space.search.trials - 1) // 4)


def queue_anchors(
    study: optuna.Study,
    space: Space,
    layer_names: list[str],
    quant_layers: list[str] | None = None,
    trials: list[optuna.trial.FrozenTrial] | None = None,
) -> int:
    """Queue the anchors in a study that holds nothing but its baseline (`trials`: a
    snapshot already read). Any other trial, in any state, means the study has had its
    start: a resumed study is not anchored again. Returns how many were queued."""
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    if any(not t.user_attrs.get(BASELINE_ATTR) for t in trials):
        return 0
    params = anchor_params(space, layer_names, quant_layers)
    for rank, fixed in enumerate(params, start=1):
        study.enqueue_trial(fixed, user_attrs={ANCHOR_ATTR: rank})
    return len(params)
