"""The pure data layer over a study: trial frames, the Pareto front, baseline ratios.

The CLI's tables, the CSV files and the explorer app all read from here. No torch: this
module must stay cheap to import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

from paretoopt.config.metrics import DEFAULT_QUALITY, METRICS, Metric, ratios
from paretoopt.config.metrics import shown as shown_metrics
from paretoopt.config.yamlfile import load_yaml
from paretoopt.errors import SpaceError, StudyError, one_line, shown
from paretoopt.results.pooling import pool_study
from paretoopt.results.record import (
    COMPARED_COLUMNS,
    LAYER_COLUMNS,
    TrialRecord,
    frame_columns,
    layer_rows,
    stored_record,
)

BASELINE_ATTR = "paretoopt.baseline"
# a cost-aware trial (study/fidelity): its figures measured before fine-tuning, the
# partial accuracy at each rung it reached, why it ended early, and its wall seconds
PRESCREEN_ATTR = "paretoopt.prescreen"
RUNGS_ATTR = "paretoopt.rungs"
STOP_ATTR = "paretoopt.stop"
COMPUTE_ATTR = "paretoopt.compute_s"
METRIC_COLUMNS = {m.name: m.field for m in METRICS.values()}  # objective -> frame column
SPACE_FILE = "space.yaml"
RUN_FILE = "run.json"
JOURNAL_FILE = "study.journal"
INTERRUPTED = "interrupted: the process running this trial stopped before it finished"
STALE = "interrupted: its worker stopped sending heartbeats; the plan was queued again"
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class StudyResults:
    """What a study holds: every trial, the feasible Pareto front and the baseline."""

    name: str
    directory: Path
    trials: pd.DataFrame
    pareto: pd.DataFrame
    baseline: dict[str, Any]
    metadata: dict[str, Any]
    metrics: tuple[str, ...] = ("accuracy", "size", "latency")  # the study's objectives
    storage: str | None = None  # the storage URL it was read from (None: its journal)
    quality: str = DEFAULT_QUALITY  # what the accuracy objective measures (metric:)
    constraints: dict[str, Any] = field(default_factory=dict)  # the stored space's limits
    runtime: str = ""  # the runtime the study measured and ranked in (target.runtime)
    compared: tuple[str, ...] = ()  # the runtimes every trial was also measured in
    shown_runtime: str = ""  # the runtime these frames' figures are of (see for_target)

    @property
    def runtimes(self) -> list[str]:
        """Every runtime the study's trials were measured in, its own first."""
        return [r for r in (self.runtime, *self.compared) if r]

    @property
    def shown_metrics(self) -> list[Metric]:
        """The metrics tables and the explorer show, the quality one labelled by `metric`."""
        return shown_metrics(self.metrics, self.quality)

    def __repr__(self) -> str:
        return (
            f"StudyResults({self.name!r}: {len(self.trials)} trials, "
            f"{len(self.pareto)} on the Pareto front)"
        )


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Rows of `values` that no other row dominates (O(n^2); studies are small)."""
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    loss = values * signs  # every column minimised
    keep = np.ones(len(loss), dtype=bool)
    for i in range(len(loss)):
        no_worse = (loss <= loss[i]).all(axis=1)
        better = (loss < loss[i]).any(axis=1)
        if (no_worse & better).any():
            keep[i] = False
    return keep


def fail_reason(t: optuna.trial.FrozenTrial) -> str:
    """Why a trial failed. paretoopt records a reason with every failure it sees; a
    failed trial without one was failed by another worker, through the heartbeats."""
    reason = t.user_attrs.get("fail_reason", "")
    return reason or (STALE if t.state.name == "FAIL" else "")


def is_interrupted(t: optuna.trial.FrozenTrial) -> bool:
    """A trial lost with its process (not the plan's fault): replaced, not counted."""
    return t.state.name == "FAIL" and fail_reason(t).startswith("interrupted:")


def trials_frame(
    study: optuna.Study, baseline: dict[str, Any] | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per trial: state, measurements, ratios against the baseline, plan; and
    the baseline as the ratios read it (see `_pooled_baseline`)."""
    trials = study.get_trials(deepcopy=False)
    complete = [stored_record(t.user_attrs) if t.state.name == "COMPLETE" else None for t in trials]
    # trials of one deployed structure report one latency: the pool of all their sessions
    records = pool_study(complete)
    base = _pooled_baseline(trials, records, baseline or {})
    rows = [_row(t, r, base or None) for t, r in zip(trials, records, strict=True)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, base
    return frame.sort_values("number").reset_index(drop=True), base


def _pooled_baseline(
    trials: list[optuna.trial.FrozenTrial],
    records: list[TrialRecord | None],
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """The baseline with the latency of its structure's pool, which every trial of that
    structure reports (the stored figure is the baseline trial's own timing, which made
    a plan of the baseline's structure read 0.99x against itself)."""
    for trial, record in zip(trials, records, strict=True):
        if (
            trial.user_attrs.get(BASELINE_ATTR)
            and record is not None
            and baseline.get("latency_ms")
        ):
            return {**baseline, "latency_ms": record.latency_ms}
    return baseline


def _row(
    t: optuna.trial.FrozenTrial, record: TrialRecord | None, baseline: dict[str, Any] | None
) -> dict[str, Any]:
    a = t.user_attrs
    row: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
        "baseline": bool(a.get(BASELINE_ATTR, False)),
        "feasible": bool(
            t.state.name == "COMPLETE" and all(v <= 0 for v in (t.constraints or {}).values())
        ),
        **frame_columns(record),
        "plan": a.get("plan_summary", ""),  # set before the trial runs: failures have it too
        "duration_s": t.duration.total_seconds() if t.duration else None,
        "fail_reason": fail_reason(t),
        "artifact": record.artifact if record else "",
    }
    row.update(_early(t))
    if baseline and (record is not None or row["stopped"]):
        row.update(ratios(row, baseline))  # accuracy_change, size_ratio, speedup, ...
    for runtime, theirs in (baseline or {}).get("compared", {}).items():  # target.compare
        tag = f"@{runtime}"
        there = {k.removesuffix(tag): v for k, v in row.items() if k.endswith(tag)}
        if there.get("accuracy") is not None and (theirs or {}).get("accuracy") is not None:
            row.update({f"{k}{tag}": v for k, v in ratios(there, theirs).items()})
    for key, value in t.params.items():
        row[f"param.{key}"] = value
    return row


def _early(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A cost-aware trial's columns: how it ended early ("rejected" before fine-tuning,
    "stopped" at a rung, "" otherwise), the rung and partial accuracy, the reason, its
    compute seconds. A trial that ended early shows the size and latency it measured
    before fine-tuning (it is never feasible, so never on the front)."""
    a = t.user_attrs
    stop = a.get(STOP_ATTR) if t.state.name == "PRUNED" else None
    stop = stop if isinstance(stop, dict) else {}
    rung = stop.get("rung")
    out: dict[str, Any] = {
        "stopped": str(stop.get("kind", "")),
        "stop_rung": rung + 1 if isinstance(rung, int) else None,  # 1 = the first rung
        "partial_accuracy": stop.get("accuracy"),
        "stop_reason": str(stop.get("reason", "")),
        "compute_s": a.get(COMPUTE_ATTR),
    }
    figures = a.get(PRESCREEN_ATTR)
    if stop and isinstance(figures, dict):
        for key in ("size_bytes", "latency_ms", "macs"):
            out[key] = figures.get(key)
    return out


EARLY_WORDS = {"stopped": "stopped at a rung", "rejected": "rejected before fine-tuning"}


def early_text(frame: pd.DataFrame) -> str:
    """e.g. "5 stopped at a rung, 2 rejected before fine-tuning" ("" where none ended
    early): the trials the cost-aware search did not fine-tune in full."""
    if frame.empty or "stopped" not in frame:
        return ""
    counts = frame["stopped"].value_counts()
    return ", ".join(f"{int(counts[k])} {w}" for k, w in EARLY_WORDS.items() if counts.get(k))


def front(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    directions: Sequence[str],
) -> pd.DataFrame:
    """The feasible, completed trials that no other such trial dominates."""
    if frame.empty:
        return frame
    ok = frame[frame["feasible"]]
    columns = [METRIC_COLUMNS[m] for m in metrics]
    mask = pareto_mask(ok[columns].to_numpy(dtype=float), directions)
    return ok[mask].sort_values(METRICS["size"].field).reset_index(drop=True)


def for_target(results: StudyResults, runtime: str | None) -> StudyResults:
    """The study read in one of the runtimes it measured every trial in (target.compare):
    each trial's accuracy, latency and runtime file there, its ratios against the
    baseline there, its feasibility under the study's limits, and that runtime's front.
    The study's own runtime (or None) gives the study back. End-of-search confirmations
    were made in the study's runtime, so a compared view has none."""
    runtime = runtime.strip().lower() if runtime else None  # runtimes are named in lowercase
    if runtime is None or runtime == results.runtime:
        return results
    if runtime not in results.compared:
        raise StudyError(
            f"--target: study {results.name!r} measured its trials in "
            f"{', '.join(results.runtimes) or 'one runtime'}, not in {runtime!r}; choose "
            "one of those (the space file's target.runtime and target.compare)"
        )
    frame = results.trials.drop(columns=CONFIRM_COLUMNS, errors="ignore").copy()
    theirs = (results.baseline.get("compared") or {}).get(runtime)
    if results.baseline and not (theirs and theirs.get("accuracy") is not None):
        reason = (theirs or {}).get("error") or "it has no figures there"
        raise StudyError(
            f"--target: study {results.name!r} could not measure its baseline in {runtime} "
            f"({one_line(str(reason))[:200]}), so nothing there can be compared"
        )
    base = {**results.baseline, **(theirs or {})}
    if len(frame):
        for column in COMPARED_COLUMNS:
            named = f"{column}@{runtime}"
            frame[column] = frame.get(named)  # None: no trial was measured there
        frame = frame.apply(lambda row: _in_target(row, base, results.constraints), axis=1)
    directions = [METRICS[m].direction for m in results.metrics]
    return dataclasses.replace(
        results,
        trials=frame,
        pareto=front(frame, results.metrics, directions),
        baseline=base,
        shown_runtime=runtime,
    )


CONFIRM_COLUMNS = ["confirm_latency_ms", "confirm_spread", "confirm_quiet", "confirm_speedup"]


def _in_target(row: pd.Series, base: dict[str, Any], limits: dict[str, Any]) -> pd.Series:
    """A trial's ratios and feasibility from the figures of the runtime in its row."""
    measured = row["state"] == "COMPLETE" and not row.get("error") and _finite(row)
    row = row.copy()
    for m in METRICS.values():  # stale ratios of the study's runtime must not survive
        row[m.ratio_column] = None
    if not measured:
        row["feasible"] = False
        return row
    for key, value in ratios(row.to_dict(), base).items():
        row[key] = value
    row["feasible"] = all(
        m.violation(float(row[m.field]), base.get(m.field), float(limits[m.limit.key])) <= 0
        for m in METRICS.values()
        if limits.get(m.limit.key) is not None and row.get(m.field) is not None
    )
    return row


def _finite(row: pd.Series) -> bool:
    values = (row.get("accuracy"), row.get("latency_ms"))  # what a compared runtime measured
    return all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)


# --------------------------------------------------------------------------- storage


def journal_storage(directory: Path) -> optuna.storages.BaseStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(directory / JOURNAL_FILE)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def torn_tail(path: Path) -> int:
    """Bytes at the end of a journal after its last whole record: a line cut short (a
    crash or a full disk mid-write) or garbage appended. 0 when it ends cleanly. Optuna
    skips such a tail silently (a COMPLETE trial read as RUNNING), and the next append
    glued a record onto it, which made the journal unreadable from then on."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = len(data)
    for line in reversed(data.splitlines(keepends=True)):
        if line.endswith(b"\n") and _is_record(line):
            break
        end -= len(line)
    return len(data) - end


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return False


def cut_torn_tail(directory: Path) -> str | None:
    """Cut a torn journal tail back to the last whole record, keeping the whole file as a
    backup beside it; the one line to say so, or None when there was none. Call under
    the study's lock: nothing may append meanwhile."""
    path = directory / JOURNAL_FILE
    torn = torn_tail(path)
    if not torn:
        return None
    backup = path.with_name(f"{JOURNAL_FILE}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copyfile(path, backup)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - torn)
        f.flush()
        os.fsync(f.fileno())
    return (
        f"{path}: its last {torn} bytes were not a whole record (a crash or a full disk "
        f"mid-write); cut back to the last whole one, the file as it was kept as "
        f"{backup.name}. A trial whose end was in them is run again."
    )


def redact(url: str) -> str:
    """A storage URL fit for a message or a file: any password (between "user:" and the
    last "@", or a password= query parameter) replaced by ***."""
    url = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", url)
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


def open_storage(url: str | None, directory: Path) -> optuna.storages.BaseStorage:
    """The study's storage: an Optuna URL, or the embedded journal file by default."""
    if url is None:
        return journal_storage(directory)
    return optuna.storages.RDBStorage(url)  # its engine is ours to close (reading_study)


@contextmanager
def reading_study(name: str, url: str | None, directory: Path) -> Iterator[optuna.Study]:
    """The study, read; a database's connections are closed when the block ends. Each
    read opens its own engine, whose pooled connections otherwise stay open until the
    garbage collector finds it: a process that reads a shared study often (a search's
    tables after every trial, a polling client) ran the server out of connection slots."""
    try:
        storage = open_storage(url, directory)
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:
        raise StudyError(
            f"{directory}: cannot open study {name!r}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        yield study
    finally:
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.engine.dispose()


def load_results(directory: str | Path, storage: str | None = None) -> StudyResults:
    """Open a study folder under results/ read-only and return its frames."""
    directory = Path(directory)
    space_file = directory / SPACE_FILE
    if not space_file.is_file():
        parent = directory.parent
        found = sorted(p.name for p in parent.glob("*") if (p / SPACE_FILE).is_file())
        listing = ", ".join(found) if found else "none"
        raise StudyError(
            f"{directory}: not a paretoopt study folder (no {SPACE_FILE}); "
            f"studies in {parent}: {listing}"
        )
    try:
        space = load_yaml(space_file.read_text(), stored=True)
    except (SpaceError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StudyError(f"{space_file} cannot be read: {one_line(str(exc))[:200]}") from None
    if not isinstance(space, dict) or "study" not in space or "objectives" not in space:
        raise StudyError(f"{space_file} is damaged; it does not name a study and objectives")
    metadata = read_json(directory / RUN_FILE)
    search = space.get("search")
    url, named = storage, search.get("storage") if isinstance(search, dict) else None
    if url is None and named:  # a folder is data: what it names is not opened, or created
        raise StudyError(
            f"{directory}: study {shown(space['study'])} keeps its trials in a database "
            f"({shown(one_line(redact(str(named))))}); paretoopt opens no storage that a "
            "results folder names: pass --storage URL to read it"
        )
    if url is None and not (directory / JOURNAL_FILE).is_file():  # reading must not create it
        raise StudyError(f"{directory}: the study has no storage yet ({JOURNAL_FILE} is missing)")
    with reading_study(space["study"], url, directory) as study:
        frame, baseline = trials_frame(study, metadata.get("baseline") or None)
    frame = _with_confirmations(frame, metadata, baseline)
    if len(frame):  # artifacts of trials off the front are removed when a search ends
        frame["artifact"] = [a if a and (directory / a).is_dir() else "" for a in frame["artifact"]]
    metrics = list(space["objectives"])
    directions = [space["objectives"][m] for m in metrics]
    return StudyResults(
        space["study"],
        directory,
        frame,
        front(frame, metrics, directions),
        baseline,
        metadata,
        tuple(metrics),
        url,
        _quality(space.get("metric")),
        _constraints(space.get("constraints")),
        *_runtimes(space.get("target")),
    )


def _runtimes(stored: Any) -> tuple[str, tuple[str, ...], str]:
    """The stored space's runtime and compared runtimes (strings only: a folder is data)."""
    target = stored if isinstance(stored, dict) else {}
    runtime = target.get("runtime") if isinstance(target.get("runtime"), str) else ""
    listed = target.get("compare") if isinstance(target.get("compare"), list) else []
    compared = tuple(r for r in listed if isinstance(r, str) and r != runtime)
    return runtime or "", compared, runtime or ""


def _constraints(stored: Any) -> dict[str, Any]:
    """The stored space's numeric limits (a damaged entry is left out, not trusted)."""
    if not isinstance(stored, dict):
        return {}
    return {
        k: v
        for k, v in stored.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _quality(stored: Any) -> str:
    """The stored space's metric: top1 where it has none (written before `metric:`)."""
    return stored if isinstance(stored, str) and stored else DEFAULT_QUALITY


def _with_confirmations(
    frame: pd.DataFrame, metadata: dict[str, Any], baseline: dict[str, Any]
) -> pd.DataFrame:
    """Columns for the latency re-measured at the end of a session (front trials only)."""
    confirmed = metadata.get("confirmations", {})
    if not len(frame) or not confirmed:
        return frame
    found = [confirmed.get(str(n), {}) for n in frame["number"]]
    frame["confirm_latency_ms"] = [c.get("latency_ms") for c in found]
    frame["confirm_spread"] = [c.get("spread") for c in found]
    frame["confirm_quiet"] = [c.get("quiet") for c in found]  # None: before quiet rounds
    if baseline.get("latency_ms"):
        frame["confirm_speedup"] = [
            baseline["latency_ms"] / c["latency_ms"] if c.get("latency_ms") else None for c in found
        ]
    return frame


def trial_record(results: StudyResults, number: int) -> TrialRecord:
    """Everything a trial recorded (its plan, measurements, file hashes), read-only."""
    with reading_study(results.name, results.storage, results.directory) as study:
        trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.number == number:
            record = stored_record(trial.user_attrs)
            if record is None:
                raise StudyError(
                    f"trial {number} of study {results.name!r} holds no complete record "
                    f"({trial.state.name})"
                )
            return record
    raise StudyError(f"trial {number} is not in study {results.name!r}")


def hardware_text(hardware: dict[str, Any]) -> str:
    """The machine in a few words: CPU, cores, and how it multiplies int8 (the int8
    kernels, and their speed, depend on it; a study from before it was recorded says ?)."""
    dot = hardware.get("int8_dot")
    words = {"vnni": "VNNI", "amx": "AMX", "avx512": "AVX-512 without VNNI"}
    isa = words.get(dot, str(dot).upper() if dot else "?")
    return f"{hardware.get('cpu', '?')} ({hardware.get('cores', '?')} cores, int8 on {isa})"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def updating_json(path: Path) -> Iterator[dict[str, Any]]:
    """Read, change and write a JSON file under a lock: several workers (on several
    machines, through a shared folder) update run.json."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        data = read_json(path)
        yield data
        write_json(path, data)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def layers_frame(results: StudyResults) -> pd.DataFrame:
    """Every completed trial's per-layer records, one row per trial and layer (record.
    LAYER_COLUMNS after the trial number): what layers.csv holds."""
    with reading_study(results.name, results.storage, results.directory) as study:
        trials = study.get_trials(deepcopy=False)
    rows = []
    for trial in trials:
        record = stored_record(trial.user_attrs) if trial.state.name == "COMPLETE" else None
        if record is not None:
            rows += [{"trial": trial.number, **row} for row in layer_rows(record)]
    return pd.DataFrame(rows, columns=["trial", *LAYER_COLUMNS])


def write_tables(results: StudyResults) -> None:
    """trials.csv, pareto.csv and layers.csv beside the study, written atomically."""
    tables = [("trials.csv", results.trials), ("pareto.csv", results.pareto)]
    for name, frame in [*tables, ("layers.csv", layers_frame(results))]:
        tmp = results.directory / f"{name}.tmp"
        frame.to_csv(tmp, index=False)
        os.replace(tmp, results.directory / name)
