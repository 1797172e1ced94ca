"""The search: thin glue between the space file, Optuna and the trial pipeline.

``search`` validates the space, prepares the baseline, opens (or resumes) the study in
``results/<study>/`` and runs trials until the study holds the requested number. Trial 0
is the uncompressed baseline, so every figure can be read relative to it. Constraints go
through Optuna 5's ``trial.set_constraint``, so infeasible trials never enter the front.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from . import __version__
from .errors import StudyError
from .knobs import Choice, Fixed, Knob, Range, Scalar
from .plan import CompressionPlan, DistillConfig, FinetuneConfig, PruneConfig, QuantConfig
from .report import Reporter, SilentReporter
from .results import (
    BASELINE_ATTR,
    JOURNAL_FILE,
    METRIC_COLUMNS,
    RUN_FILE,
    SPACE_FILE,
    TRIALS_DIR,
    StudyResults,
    load_results,
    open_storage,
    read_json,
    write_json,
    write_tables,
)
from .space import Space, dump_space, load_space, space_to_dict

INTERRUPTED = "interrupted: the process running this trial stopped before it finished"


# --------------------------------------------------------------------------- plan sampling


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


def sample_plan(trial: optuna.Trial, space: Space, layer_names: list[str]) -> CompressionPlan:
    """Turn one Optuna trial into a compression plan; fixed knobs are not parameters."""
    s = space.space
    structure = str(suggest(trial, "prune.structure", s.pruning.structure))
    # One sparsity parameter per structure: 0.5 of the channels removes about 75 % of the
    # weights, so the two levels mean different things and the sampler must learn them apart.
    sparsity = float(suggest(trial, f"prune.{structure}.sparsity", s.pruning.sparsity))
    scales = {}
    if s.pruning.per_layer and sparsity > 0:
        scales = {
            n: float(suggest(trial, f"prune.layer.{n}", s.pruning.layer_scale)) for n in layer_names
        }
    epochs = int(suggest(trial, "finetune.epochs", s.finetune.epochs))
    alpha = float(suggest(trial, "distill.alpha", s.distillation.alpha)) if epochs else 0.0
    temperature = (
        float(suggest(trial, "distill.temperature", s.distillation.temperature))
        if alpha > 0
        else 1.0
    )
    return CompressionPlan(
        prune=PruneConfig(structure, sparsity, scales, s.pruning.round_to),
        quant=QuantConfig(
            int(suggest(trial, "quant.bits", s.quantization.bits)),
            str(suggest(trial, "quant.granularity", s.quantization.granularity)),
            str(suggest(trial, "quant.scheme", s.quantization.scheme)),
        ),
        distill=DistillConfig(temperature, alpha),
        finetune=FinetuneConfig(
            epochs,
            float(suggest(trial, "finetune.lr", s.finetune.lr)) if epochs else 1e-3,
            s.finetune.batch_size,
        ),
    )


def make_sampler(space: Space, offset: int) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded so that a resumed study does not replay old draws."""
    seed = space.search.seed + offset
    name = space.search.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":  # multivariate: sparsity and bits interact
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, n_startup_trials=10
            )
        if name == "nsga2":
            size = max(4, min(20, space.search.trials // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=size)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


# --------------------------------------------------------------------------- study setup


@dataclass
class Session:
    space: Space
    directory: Path
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    embedded: bool


def open_session(space: Space, results_root: Path) -> Session:
    directory = results_root / space.study
    _check_resumable(space, directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPACE_FILE).write_text(dump_space(space))
    storage = open_storage(space.search.storage, directory)
    existing = _count(storage, space.study)
    study = optuna.create_study(
        study_name=space.study,
        storage=storage,
        load_if_exists=True,
        directions=space.directions,
        sampler=make_sampler(space, existing),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(space.metrics)
    if not study.trials:
        study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True})
    return Session(space, directory, study, storage, space.search.storage is None)


def _count(storage: optuna.storages.BaseStorage, name: str) -> int:
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(sid, deepcopy=False))


def _check_resumable(space: Space, directory: Path) -> None:
    """A study folder may be resumed only with the same space (the trial count aside)."""
    stored = directory / SPACE_FILE
    if not stored.is_file():
        if directory.exists() and any(directory.iterdir()):
            raise StudyError(
                f"{directory} exists and is not a paretoopt study; choose another "
                "study name or move the folder"
            )
        return
    import yaml

    before = yaml.safe_load(stored.read_text())
    now = space_to_dict(space)
    for doc in (before, now):
        doc.get("search", {}).pop("trials", None)
    if before != now:
        diff = _first_difference(before, now)
        raise StudyError(
            f"study {space.study!r} in {directory} was started with a different "
            f"space ({diff}); use another study name, or delete the folder to "
            "start over"
        )


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}".lstrip("."))
    return f"{path}: {a!r} then, {b!r} now"


def _fail_interrupted(session: Session) -> int:
    """Trials left RUNNING in the embedded storage belong to a process that died."""
    if not session.embedded:
        return 0
    storage = session.storage
    study_id = storage.get_study_id_from_name(session.space.study)
    stale = session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if t.user_attrs.get(BASELINE_ATTR):  # the baseline must run again
            session.study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True})
    return len(stale)


def _finished(study: optuna.Study) -> int:
    """Trials that count towards the study's total: all finished but interrupted ones."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE
        or (t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED)
    )


# --------------------------------------------------------------------------- the loop


def search(
    space: Space | str | Path,
    *,
    trials: int | None = None,
    results_root: str | Path = "results",
    reporter: Reporter | None = None,
) -> StudyResults:
    """Run (or resume) the study a space describes; return its results.

    ``trials`` overrides ``search.trials`` (the total, baseline included), so a finished
    study can be continued: ``search("conv.yaml", trials=60)``.
    """
    if not isinstance(space, Space):
        space = load_space(space)
    if trials is not None:
        space = space.with_trials(trials)
    reporter = reporter or SilentReporter()
    results_root = Path(results_root)
    from .pipeline import prepare  # torch is imported only once the space is valid

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = prepare(space, results_root / ".cache", log=reporter.log)
    session = open_session(space, results_root)
    if _finished(session.study) < space.search.trials:
        _calibrate(session, ctx, reporter)
    _write_metadata(session, ctx)
    lost = _fail_interrupted(session)
    if lost:
        reporter.log(
            f"resume: {lost} trial(s) interrupted earlier are marked failed and will be replaced"
        )
    try:
        _loop(session, ctx, reporter)
    finally:  # an interrupt must not leave a live progress display behind
        reporter.stop()
    return finish(session, reporter)


SPREAD_WARNING = 1.10


def _calibrate(session: Session, ctx: Any, reporter: Reporter) -> None:
    import tempfile

    from .pipeline import calibrate

    with tempfile.TemporaryDirectory(prefix="paretoopt-") as tmp:
        cal = calibrate(ctx, Path(tmp))
    rounds = ", ".join(f"{m:.4f}" for m in cal["medians_ms"])
    first = read_json(session.directory / RUN_FILE).get("reference_ms")
    if first:  # a resumed study keeps one scale: every latency is first reference x ratio
        cal["reference_ms"] = first
        reporter.log(
            f"calibration: baseline latency now {rounds} ms; the study's reference "
            f"stays {first:.4f} ms (candidates are timed against the baseline)"
        )
    else:
        reporter.log(
            f"calibration: baseline latency {cal['reference_ms']:.4f} ms "
            f"(rounds {rounds}; spread {cal['spread']:.2f})"
        )
    if cal["spread"] > SPREAD_WARNING:
        reporter.log(
            f"[yellow]warning[/]: the baseline's latency varies by "
            f"{(cal['spread'] - 1) * 100:.0f} % between rounds; latency ranks will be "
            "noisy. Stop other work on this machine for a fair comparison."
        )


def _loop(session: Session, ctx: Any, reporter: Reporter) -> None:
    study, space = session.study, session.space
    done = _finished(study)
    reporter.start(space, done)
    while done < space.search.trials:
        trial = study.ask()
        start = time.perf_counter()
        try:
            record = _evaluate(session, ctx, trial)
        except Exception as exc:  # a failed trial is data: record the reason, go on
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            reporter.trial_failed(trial.number, reason)
            if trial.user_attrs.get(BASELINE_ATTR):
                raise StudyError(
                    f"the baseline trial failed, so no figure can be read against it: {reason}"
                ) from exc
        else:
            values = [record[METRIC_COLUMNS[m]] for m in space.metrics]
            study.tell(trial, values)
            reporter.trial_done(
                trial.number, record, time.perf_counter() - start, _baseline(session)
            )
        done = _finished(study)
        reporter.advance(done)


def _evaluate(session: Session, ctx: Any, trial: optuna.Trial) -> dict[str, Any]:
    from .pipeline import run_trial

    is_baseline = bool(trial.user_attrs.get(BASELINE_ATTR))
    plan = CompressionPlan() if is_baseline else sample_plan(trial, session.space, ctx.layer_names)
    trial.set_user_attr("plan_summary", plan.summary())
    out_dir = session.directory / TRIALS_DIR / str(trial.number)
    record = run_trial(ctx, plan, out_dir, session.space.search.seed + trial.number)
    record["artifact"] = str(out_dir.relative_to(session.directory))
    record["plan_summary"] = plan.summary()
    if is_baseline:
        _store_baseline(session, record)
    for key, value in record.items():
        trial.set_user_attr(key, value)
    _set_constraints(trial, session, record)
    return record


def _set_constraints(trial: optuna.Trial, session: Session, record: dict[str, Any]) -> None:
    c = session.space.constraints
    base = _baseline(session)
    if c.max_accuracy_drop is not None:
        drop = base["accuracy"] - record["accuracy"]
        trial.set_constraint("accuracy_drop", drop - c.max_accuracy_drop)
    if c.max_size_bytes is not None:
        trial.set_constraint("size", record["size_bytes"] - c.max_size_bytes)
    if c.max_latency_ms is not None:
        trial.set_constraint("latency", record["latency_ms"] - c.max_latency_ms)


def _baseline(session: Session) -> dict[str, Any]:
    base = read_json(session.directory / RUN_FILE).get("baseline")
    if not base:
        raise StudyError("the study has no measured baseline yet")
    return base


def _store_baseline(session: Session, record: dict[str, Any]) -> None:
    meta = read_json(session.directory / RUN_FILE)
    keys = (
        "accuracy",
        "test_accuracy",
        "torch_accuracy",
        "size_bytes",
        "runtime_file_bytes",
        "latency_ms",
        "latency",
        "params",
    )
    meta["baseline"] = {k: record[k] for k in keys}
    write_json(session.directory / RUN_FILE, meta)


def _write_metadata(session: Session, ctx: Any) -> None:
    from .measure import hardware_fingerprint

    path = session.directory / RUN_FILE
    meta = read_json(path)
    meta.update(
        {
            "study": session.space.study,
            "paretoopt": __version__,
            "versions": _versions(),
            "hardware": hardware_fingerprint(),
            "seed": session.space.search.seed,
            "storage": session.space.search.storage or f"journal:{JOURNAL_FILE}",
            "baseline_source": ctx.baseline_source,
            "classifier": ctx.classifier,
            "prunable_layers": ctx.layer_names,
            "input_shape": list(ctx.splits.input_shape),
            "splits": {k: len(getattr(ctx.splits, k)) for k in ("train", "val", "test")},
        }
    )
    if ctx.calibration:
        meta.setdefault("calibrations", []).append(ctx.calibration)
        meta.setdefault("reference_ms", ctx.calibration["reference_ms"])
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(path, meta)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torch-pruning", "optuna", "onnx", "onnxruntime", "numpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def finish(session: Session, reporter: Reporter) -> StudyResults:
    """Keep only the front's (and the baseline's) artifacts, then write the tables."""
    results = load_results(session.directory, session.space.search.storage)
    frame = results.trials
    keep = set(results.pareto.get("number", [])) | set(
        frame.loc[frame["baseline"], "number"] if len(frame) else []
    )
    trials_dir = session.directory / TRIALS_DIR
    if trials_dir.is_dir():
        for child in trials_dir.iterdir():
            if not child.name.isdigit() or int(child.name) not in keep:
                shutil.rmtree(child, ignore_errors=True)
    results = load_results(session.directory, session.space.search.storage)
    write_tables(results)
    reporter.finish(results)
    return results
