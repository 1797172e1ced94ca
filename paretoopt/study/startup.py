"""Start-up, the same for ``search`` and for every worker: the study context (the baseline,
trained or from the cache), the calibration on the study's latency scale, and a sampler of
the process's own.

Refused before anything is trained or written: a baseline the target runtime cannot
measure fails here with one line, before the study folder is touched.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from paretoopt.config.space import Space
from paretoopt.errors import StudyError, one_line
from paretoopt.results.report import Reporter
from paretoopt.study.loop import REASON_LIMIT
from paretoopt.study.sampling import make_sampler
from paretoopt.study.session import check_devices, compared_references, study_reference

if TYPE_CHECKING:
    from paretoopt.study.trial import StudyContext


@dataclass(frozen=True)
class Started:
    ctx: StudyContext
    sampler: optuna.samplers.BaseSampler


def start(space: Space, results_root: Path, seed: int, reporter: Reporter) -> Started:
    """Prepare the baseline, calibrate against the study's reference, seed a sampler."""
    from paretoopt.study.trial import prepare  # torch is imported only once the space is valid

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_devices(space, results_root / space.study)  # before a baseline is trained
    ctx = prepare(space, results_root / ".cache", log=reporter.log)
    calibrate_study(space, results_root / space.study, ctx, reporter)
    return Started(ctx, make_sampler(space, seed, ctx.layer_names, ctx.quant_layers))


def calibrate_study(space: Space, directory: Path, ctx: StudyContext, reporter: Reporter) -> None:
    """Calibrate the target on the study's latency scale, and say how it went."""
    from paretoopt.study.trial import calibrate

    reference = study_reference(directory)  # a resumed study keeps its latency scale
    try:
        with tempfile.TemporaryDirectory(prefix="paretoopt-") as tmp:
            cal = calibrate(ctx, Path(tmp), reference, compared_references(directory))
    except StudyError:  # already says which setting, and why
        raise
    except Exception as exc:
        raise StudyError(
            f"the baseline cannot be measured in the target runtime "
            f"({space.target.runtime}): {type(exc).__name__}: "
            f"{one_line(str(exc))[:REASON_LIMIT]}"
        ) from exc
    rounds = ", ".join(f"{m:.4f}" for m in cal["medians_ms"])
    if reference is not None:
        reporter.log(
            f"calibration: baseline latency now {rounds} ms; the study's reference "
            f"stays {cal['reference_ms']:.4f} ms (candidates are timed against the "
            "baseline)"
        )
    else:
        reporter.log(
            f"calibration: baseline latency {cal['reference_ms']:.4f} ms "
            f"(rounds {rounds}; spread {cal['spread']:.2f})"
        )
    _warn_spread(cal, "", space.target.max_spread, reporter)
    for runtime, their in cal.get("compared", {}).items():
        their_rounds = ", ".join(f"{m:.4f}" for m in their["medians_ms"])
        reporter.log(
            f"calibration: baseline latency in {runtime} {their['reference_ms']:.4f} ms "
            f"(rounds {their_rounds}; spread {their['spread']:.2f}; target.compare: every "
            "trial is measured there too)"
        )
        _warn_spread(their, f" in {runtime}", space.target.max_spread, reporter)
    _warn_slow_protocol(space, cal["reference_ms"], reporter)


def _warn_spread(cal: dict[str, Any], where: str, limit: float, reporter: Reporter) -> None:
    """Warn where the baseline's round medians differ by more than target.max_spread."""
    if cal["spread"] > 1.0 + limit:  # too noisy to rank candidates
        reporter.log(
            f"[yellow]warning[/]: the baseline's latency{where} varies by "
            f"{(cal['spread'] - 1) * 100:.0f} % between rounds (target.max_spread "
            f"{limit * 100:.0f} %); latency ranks will be noisy. Stop other work on this "
            "machine for a fair comparison."
        )


SLOW_MEASUREMENT_S = 60.0  # a candidate's timing alone; a conv trial here takes 1-5 s


def _warn_slow_protocol(space: Space, baseline_ms: float, reporter: Reporter) -> None:
    """Say what the protocol settings cost, where a candidate's timing alone would take
    more than SLOW_MEASUREMENT_S: `repeats` x `iterations` runs of the candidate and of
    the baseline in every session, before warm-up and quiet rounds."""
    t = space.target
    runs = 2 * t.repeats * t.iterations * max(t.sessions, 1)
    seconds = runs * baseline_ms / 1000 + t.warmup_s * max(t.sessions, 1)
    if seconds > SLOW_MEASUREMENT_S:
        hours = seconds * space.search.trials / 3600
        reporter.log(
            f"[yellow]warning[/]: each candidate's timing takes at least {seconds:.0f} s "
            f"(target.repeats {t.repeats} x target.iterations {t.iterations} runs of it and "
            f"of the baseline at {baseline_ms:.3g} ms, in {max(t.sessions, 1)} session(s), "
            f"plus target.warmup_s {t.warmup_s:g}): {hours:.1f} h over "
            f"{space.search.trials} trials"
        )
