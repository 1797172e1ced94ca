"""A study's folder under results/: lock, storage, resume rules and run metadata.

One search process owns a study folder at a time (an exclusive lock on
``results/<study>/.lock``), so trials left RUNNING in the embedded storage can only belong
to a process that died: they are marked failed and replaced. No torch here.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import TrialState

from paretoopt._version import __version__
from paretoopt.config.space import BEFORE_IT_EXISTED, Space, dump_space, parse_space, space_to_dict
from paretoopt.config.yamlfile import load_yaml
from paretoopt.errors import SpaceError, StudyError
from paretoopt.results.frames import (
    BASELINE_ATTR,
    JOURNAL_FILE,
    RUN_FILE,
    SPACE_FILE,
    TRIALS_DIR,
    cut_torn_tail,
    is_interrupted,
    read_json,
    redact,
    updating_json,
)
from paretoopt.study import sharing
from paretoopt.study.sharing import writer_storage

if TYPE_CHECKING:
    from paretoopt.results.record import TrialRecord
    from paretoopt.study.trial import StudyContext

LOCK_FILE = ".lock"
SPACE_ATTR = "paretoopt.space"  # the space, in the study itself: a worker needs only the URL


@dataclass
class Session:
    space: Space
    directory: Path
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    lock: IO[str] | None = field(default=None, repr=False)
    repaired: str | None = None  # what opening it cut from a torn journal (cut_torn_tail)

    @property
    def embedded(self) -> bool:
        """The journal file in the study folder, owned by this process."""
        return self.space.search.storage is None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file releases the lock
            self.lock = None


def check_folder(directory: Path) -> None:
    """A study folder, and its trials/ folder, must be real folders inside the results
    root: the end of a search deletes the trials off the front, and through a link it
    deleted another folder's contents."""
    root = directory.parent.resolve()
    for path in (directory, directory / TRIALS_DIR):
        if path.is_symlink():
            raise StudyError(
                f"{path} is a symbolic link; paretoopt writes and deletes there, "
                "so it must be a real folder (move the link away)"
            )
        if path.exists() and not path.resolve().is_relative_to(root):
            raise StudyError(f"{path} resolves outside the results folder {root}")


def check_resumable(space: Space, directory: Path) -> None:
    """A study folder may be resumed only with the same space (the trial count aside)."""
    check_folder(directory)
    stored = directory / SPACE_FILE
    if not stored.is_file():
        leftovers = {LOCK_FILE, SPACE_FILE + ".tmp"}  # a start killed before the space landed
        if directory.exists() and any(p.name not in leftovers for p in directory.iterdir()):
            raise StudyError(
                f"{directory} exists and is not a paretoopt study; choose another "
                "study name or move the folder"
            )
        return
    try:
        before = load_yaml(stored.read_text(), stored=True)
    except (yaml.YAMLError, SpaceError):
        before = None
    if not isinstance(before, dict):
        raise StudyError(f"{stored} is damaged; delete the folder {directory} to start over")
    difference = space_difference(before, space)
    if difference:
        raise StudyError(
            f"study {space.study!r} in {directory} was started with a different "
            f"space ({difference}); use another study name, or delete the folder to "
            "start over"
        )


RESUMABLE = ("trials", "fidelity", "halving_eta", "halving_rungs")  # search settings


def space_difference(before: dict[str, Any], space: Space, *, where: bool = True) -> str:
    """The first setting that differs between a stored space and this one ("" if none).
    What a resume may change is left out: the trial count, the fidelity policy (it
    decides which plans are fine-tuned in full, not what a trial's figures mean) and, for
    a worker (``where=False``), the storage URL, which names the same server from
    elsewhere. The heartbeat may not change: every worker judges the others' silence by
    it."""
    now = space_to_dict(space)
    before = _completed(before)
    ignored = RESUMABLE + (() if where else ("storage",))
    for doc in (before, now):
        for key in ignored:
            doc.get("search", {}).pop(key, None)
    return _first_difference(before, now) if before != now else ""


def _completed(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored space with the settings added since it was written: at the value that
    reproduces what the study did then, or else at their default. A study started by an
    earlier version resumes, unless it now measures or searches differently."""
    doc = copy.deepcopy(stored)
    for path, value in BEFORE_IT_EXISTED.items():
        section, key = path.split(".")
        if isinstance(doc.get(section), dict):
            doc[section].setdefault(key, value)
    try:
        return space_to_dict(parse_space(doc))
    except SpaceError:  # no longer valid: compared as it is, the difference is named
        return stored


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}".lstrip("."))
    return f"{path}: {a!r} then, {b!r} now"


def open_session(space: Space, results_root: Path, sampler: optuna.samplers.BaseSampler) -> Session:
    """Lock the study folder, open its storage and queue the baseline where it is missing."""
    directory = results_root / space.study
    check_resumable(space, directory)  # again: another search may have started it meanwhile
    embedded = space.search.storage is None
    storage = None if embedded else _storage(space, directory)  # a bad URL writes nothing
    directory.mkdir(parents=True, exist_ok=True)
    lock = _lock(directory, space.study)
    try:
        if embedded:  # under the study's lock no other process writes the journal, so
            # a journal lock left by a process killed mid-write is stale (Optuna waited
            # 30 s for it to age)
            (directory / (JOURNAL_FILE + ".lock")).unlink(missing_ok=True)  # Optuna's name
        repaired = cut_torn_tail(directory) if embedded else None
        # the space first: a folder holding a journal but no space.yaml reads as foreign
        _write_text(directory / SPACE_FILE, dump_space(space))
        storage = storage or _storage(space, directory)
        study = optuna.create_study(
            study_name=space.study,
            storage=storage,
            load_if_exists=True,
            directions=space.directions,
            sampler=sampler,
        )
        study.set_user_attr(SPACE_ATTR, dump_space(space))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(space.metrics)
    except BaseException:
        lock.close()
        raise
    return Session(space, directory, study, storage, lock, repaired)


def stored_space(study: optuna.Study, url: str) -> Space:
    """The space a study was started with, as its database holds it (for workers)."""
    stored = study.user_attrs.get(SPACE_ATTR)
    if not stored:
        raise StudyError(
            f"study {study.study_name!r} in {redact(url)} was not started by paretoopt "
            "search (it holds no space)"
        )
    return parse_space(load_yaml(stored, stored=True), source=f"<study {study.study_name}>")


def check_storage(space: Space, directory: Path) -> None:
    """Open a storage URL once before any work, so a bad one fails first and writes
    nothing. A database may also hold a study of this name started from another results
    folder (its baseline and artifacts are there), or with another space."""
    if space.search.storage is None:
        return
    storage = _storage(space, Path("."))
    try:
        study_id = storage.get_study_id_from_name(space.study)
    except KeyError:
        return
    if storage.get_all_trials(study_id, deepcopy=False) and not (directory / SPACE_FILE).is_file():
        raise StudyError(
            f"study {space.study!r} already has trials in the database, but {directory} is "
            "not its results folder; use --results with the study's shared folder, or "
            "another study name"
        )
    stored = storage.get_study_user_attrs(study_id).get(SPACE_ATTR)
    difference = space_difference(load_yaml(stored, stored=True), space) if stored else ""
    if difference:
        raise StudyError(
            f"study {space.study!r} in the database was started with a different space "
            f"({difference}); use another study name"
        )


def _storage(space: Space, directory: Path) -> optuna.storages.BaseStorage:
    try:
        return writer_storage(space.search.storage, directory, space.search.heartbeat_s)
    except Exception as exc:
        raise StudyError(
            f"search.storage: cannot open {redact(space.search.storage or '')!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _lock(directory: Path, name: str) -> IO[str]:
    import fcntl

    handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 (held for the session)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StudyError(
            f"study {name!r} in {directory} is in use by another paretoopt "
            "process; wait for it to finish or stop it"
        ) from None
    return handle


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def existing_trials(space: Space, results_root: Path) -> int:
    """How many trials the study already holds (0 for a new one): seeds the sampler."""
    directory = results_root / space.study
    if space.search.storage is None and not (directory / JOURNAL_FILE).is_file():
        return 0
    storage = _storage(space, directory)
    try:
        study_id = storage.get_study_id_from_name(space.study)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def fail_interrupted(session: Session, pids: set[int] | None = None) -> int:
    """Trials left RUNNING in the embedded storage belong to a process that died: all of
    them when a session starts (it holds the study's lock), or those of the helper
    processes `pids` that died during the session."""
    if not session.embedded:
        return 0
    running = session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    stale = [t for t in running if pids is None or t.user_attrs.get("worker") in pids]
    return sharing.fail_interrupted(session.storage, session.space.study, stale)


def ensure_baseline(
    study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None
) -> None:
    """Queue the uncompressed baseline unless one is done, queued or running (in
    `trials`, a snapshot already read, or in the study)."""
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=live)
    if not any(t.user_attrs.get(BASELINE_ATTR) and t.state in live for t in trials):
        study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True})


def finished(study: optuna.Study) -> int:
    """Trials that count towards the study's total: interrupted ones and failed
    baselines are replaced, so they do not count."""
    return counted(study.get_trials(deepcopy=False))


def counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    """`finished`, on a snapshot of the trials already read."""
    return sum(1 for t in trials if _counts(t))


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):  # pruned: see study/fidelity
        return True
    return (
        t.state == TrialState.FAIL and not is_interrupted(t) and not t.user_attrs.get(BASELINE_ATTR)
    )


# --------------------------------------------------------------------------- run.json


def baseline(session: Session) -> dict[str, Any]:
    base = read_json(session.directory / RUN_FILE).get("baseline")
    if not base:
        raise StudyError("the study has no measured baseline yet")
    return base


def store_baseline(session: Session, record: TrialRecord) -> None:
    with updating_json(session.directory / RUN_FILE) as meta:
        meta["baseline"] = record.baseline_view()


def store_confirmations(session: Session, confirmations: dict[int, dict[str, Any]]) -> None:
    """End-of-session re-measurements of front trials, by trial number (the latest wins)."""
    with updating_json(session.directory / RUN_FILE) as meta:
        stored = meta.setdefault("confirmations", {})
        stored.update({str(n): c for n, c in confirmations.items()})


def training_devices(space: Space) -> dict[str, str]:
    """The kind of device ("cpu", "cuda") the baseline and the trials train on here."""
    from paretoopt.compress.recipe import resolve_device

    return {
        "baseline": resolve_device(space.baseline.device, "baseline.device").type,
        "finetune": resolve_device(space.space.finetune.device, "space.finetune.device").type,
    }


def check_devices(space: Space, directory: Path) -> None:
    """A study goes on training where it started: `auto` on another machine (or a worker
    with a GPU joining one that trained on CPUs) would mix the two in one front."""
    if not (directory / RUN_FILE).is_file():
        return
    # a study from before the device settings existed trained on the CPU
    before = read_json(directory / RUN_FILE).get("training") or {
        "baseline": "cpu",
        "finetune": "cpu",
    }
    now = training_devices(space)
    checked = [("finetune", "space.finetune.device", space.space.finetune.device)]
    if not space.model.checkpoint:  # a checkpoint is not trained here
        checked.append(("baseline", "baseline.device", space.baseline.device))
    for part, where, value in checked:
        then = before.get(part, "cpu")
        if then != now[part]:
            raise StudyError(
                f"{where}: study {space.study!r} has trained on {then} so far, but {value!r} "
                f"trains on {now[part]} here; set {where}: {then} to go on as it started, "
                "or use another study name"
            )


def study_reference(directory: Path) -> float | None:
    """The latency scale fixed by the study's first calibration, if there was one."""
    return read_json(directory / RUN_FILE).get("reference_ms")


def compared_references(directory: Path) -> dict[str, float]:
    """Each compared runtime's latency scale (target.compare), fixed likewise."""
    found = read_json(directory / RUN_FILE).get("compared_reference_ms")
    return dict(found) if isinstance(found, dict) else {}


def write_metadata(session: Session, ctx: StudyContext) -> None:
    """What the study ran on: fixed facts once, and one entry per session (a resume may
    run on another machine, with other versions)."""
    from paretoopt.measure import hardware_fingerprint

    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t = session.space.target
    hardware, versions = hardware_fingerprint(), _versions(t.runtime, *t.compare)
    facts = {
        "study": session.space.study,
        "seed": session.space.search.seed,
        "storage": redact(session.space.search.storage or f"journal:{JOURNAL_FILE}"),
        "classifier": ctx.classifier,
        "prunable_layers": ctx.layer_names,
        "input_shape": ctx.splits.layout["inputs"][0]["shape"],  # the first input's
        "inputs": ctx.splits.layout,  # how the model takes them; each one's shape and type
        "splits": {k: len(getattr(ctx.splits, k)) for k in ("train", "val", "test")},
        "hardware": hardware,
        "versions": versions,
        "training": training_devices(session.space),  # resumes must keep them (check_devices)
    }
    with updating_json(session.directory / RUN_FILE) as meta:
        meta.setdefault("created", now)
        for key, value in facts.items():
            meta.setdefault(key, value)
        if ctx.calibration:  # the scale the first session read every latency on
            meta.setdefault("reference_ms", ctx.calibration["reference_ms"])
            scales = meta.setdefault("compared_reference_ms", {})
            for runtime, cal in ctx.calibration.get("compared", {}).items():
                scales.setdefault(runtime, cal["reference_ms"])
        meta.setdefault("sessions", []).append(
            {
                "started": now,
                "paretoopt": __version__,
                "hardware": hardware,
                "versions": versions,
                "baseline_source": ctx.baseline_source,
                "calibration": ctx.calibration,
            }
        )


def _versions(*runtimes: str) -> dict[str, str]:
    """The packages the study ran on; an optional runtime's too, where it measured."""
    from importlib.metadata import PackageNotFoundError, version

    from paretoopt.measure.backends.base import OPTIONAL

    out = {}
    packages = ["torch", "torch-pruning", "optuna", "onnx", "onnxruntime", "numpy", "pandas"]
    packages += [OPTIONAL[r][0] for r in runtimes if r in OPTIONAL]
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
