"""Export: what was measured is exactly what ships.

``export_trial`` hands over a trial's files in up to three formats, each checked before
anything is written to the output folder:

- ``onnx``: the very ``model.onnx`` the trial timed (float, or int8 QDQ), checked against
  the hash the trial recorded. A study measured in eager PyTorch has no such file, so
  one is exported afresh from the compressed file and verified;
- ``pt2``: the compressed model as a ``torch.export`` program (TorchScript is deprecated),
  made afresh from the compressed file and verified;
- ``safetensors``: the compressed file itself (bit-packed weights, plan, channel-removal
  history), checked against its recorded hash; ``load`` rebuilds the model from it.

Verification: every written model is loaded back in its own runtime and evaluated on
the study's test split; if its accuracy differs from the trial's recorded figure by more
than the tolerance, export fails with both figures and writes nothing. Beside the models
goes a model card (JSON and Markdown): the plan, the measured figures with their spread,
the baseline's, the target and its hardware fingerprint, versions and the study.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from paretoopt.config.metrics import (
    DEFAULT_QUALITY,
    Metric,
    is_user_quality,
    quality_metric,
    quality_name,
    shown,
)
from paretoopt.errors import StudyError, one_line
from paretoopt.errors import shown as quoted
from paretoopt.results.frames import (
    StudyResults,
    for_target,
    hardware_text,
    load_results,
    trial_record,
)
from paretoopt.results.pick import pick
from paretoopt.results.record import TrialRecord, quiet_reading

BASE_FORMATS = ("onnx", "pt2", "safetensors")  # exported by default
RUNTIME_FORMATS = ("openvino", "executorch")  # by default too, where a trial measured in it
FORMATS = BASE_FORMATS + RUNTIME_FORMATS
SUFFIX = {
    "onnx": ".onnx",
    "pt2": ".pt2",
    "safetensors": ".safetensors",
    "openvino": ".xml",
    "executorch": ".pte",
}
COMPANIONS = {"openvino": (".bin",)}  # files a format's model file needs beside it
ARTIFACT = "model.safetensors"  # as artifact names it
# format -> the trial file it is when the study measured in that format's runtime
MEASURED = {"onnx": "model.onnx", "openvino": "model.xml", "executorch": "model.pte"}
RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}


@dataclass(frozen=True)
class Exported:
    trial: int
    files: dict[str, Path]  # format -> written model
    card: Path  # the JSON model card (the Markdown one sits beside it)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> figures


def export_trial(
    study_dir: str | Path,
    out: str | Path,
    *,
    trial: int | None = None,
    rule: str | None = None,
    formats: tuple[str, ...] | None = None,
    force: bool = False,
    tolerance: float = 0.5,
    storage: str | None = None,
    space: str | Path | None = None,
    target: str | None = None,
) -> Exported:
    """Export one trial (by number, or by a pick rule such as "knee") into `out`.

    A results folder is data: the model and data factories its space.yaml names are not
    imported. A study built from user factories is exported with `space`, the space
    file the caller searched with (and trusts). `target`: one of the runtimes the study
    compared (target.compare): the pick reads its front, the card its figures, and its
    measured file is handed over by default."""
    results = for_target(load_results(study_dir, storage), target)
    untrusted = untrusted_factories(results) if space is None else []
    if untrusted:
        raise StudyError(
            f"{results.directory / 'space.yaml'} names {' and '.join(untrusted)}: a results "
            "folder is data, and paretoopt imports no code that it names; pass --space "
            "with the space file you searched with (its factories are yours)"
        )
    number = _choose(results, trial, rule)
    record = _checked_record(results, number)
    runtime = results.shown_runtime or record.runtime  # --target, as for_target names it
    if runtime in record.compared:
        try:
            record.in_runtime(runtime)
        except ValueError as exc:
            raise StudyError(
                f"--target: trial {number} could not be measured in {runtime} "
                f"({one_line(str(exc))[:200]}); export it without --target, or pick another"
            ) from None
    formats = default_formats(runtime) if formats is None else formats
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise StudyError(f"--format: {unknown or 'none'}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    stem = f"{results.name}-trial{number}"
    targets = {f: out / f"{stem}{SUFFIX[f]}" for f in formats}
    beside = [p.with_suffix(c) for f, p in targets.items() for c in COMPANIONS.get(f, ())]
    cards = (out / f"{stem}.card.json", out / f"{stem}.card.md")
    _check_destination(out, [*targets.values(), *beside, *cards], force)
    source = results.directory / record["artifact"]
    _check_hashes(source, record)
    staging = out / f".{stem}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        checks = _write_and_verify(
            results, source, record, staging, stem, formats, tolerance, space
        )
        card = model_card(
            results, number, record, {f: targets[f] for f in formats}, checks, runtime
        )
        (staging / cards[0].name).write_text(json.dumps(card, indent=2, default=str) + "\n")
        (staging / cards[1].name).write_text(card_markdown(card))
        for path in [*targets.values(), *beside, *cards]:
            (staging / path.name).replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(number, targets, cards[0], checks)


def default_formats(runtime: str) -> tuple[str, ...]:
    """ONNX, a PyTorch program and the compressed file; and the format of the runtime a
    trial was measured in, where it has its own (an OpenVINO IR, an ExecuTorch program)."""
    return BASE_FORMATS + ((runtime,) if runtime in RUNTIME_FORMATS else ())


def untrusted_factories(results: StudyResults) -> list[str]:
    """The code a study folder's space.yaml names (factories, a data transform, a user
    metric; built-in names need none):
    what exporting it would import, were it trusted. Read as plain data, not validated:
    a folder copied from elsewhere may name files that are not here."""
    from paretoopt.config.yamlfile import load_yaml

    raw = load_yaml((results.directory / "space.yaml").read_text(), stored=True)
    if not isinstance(raw, dict):
        return []
    named = [
        (f"{key}.{ref}", part.get(ref))
        for key in ("model", "data")
        if isinstance(part := raw.get(key), dict)
        for ref in ("factory", "transform")
    ]
    # a user's metric is code too (export scores the test split with it)
    named.append(("metric", raw.get("metric") if is_user_quality(str(raw.get("metric"))) else None))
    return [f"{where} {quoted(ref, 200)}" for where, ref in named if ref]


# --------------------------------------------------------------------------- choosing


def _choose(results: StudyResults, trial: int | None, rule: str | None) -> int:
    if (trial is None) == (rule is None):
        raise StudyError("give either --trial N or --pick RULE (e.g. --pick knee)")
    if trial is not None:
        return trial
    objectives = [m.name for m in shown(results.metrics)]
    return pick(results.pareto, str(rule), results.baseline.get("accuracy"), objectives)


def _checked_record(results: StudyResults, number: int) -> TrialRecord:
    frame = results.trials
    kept = [int(n) for n, a in zip(frame["number"], frame["artifact"], strict=True) if a]
    listing = ", ".join(map(str, kept)) or "none"
    rows = frame[frame["number"] == number] if len(frame) else frame
    if rows.empty:
        raise StudyError(
            f"trial {number} is not in study {results.name!r}; trials with files: {listing}"
        )
    row = rows.iloc[0]
    if row["state"] != "COMPLETE":
        reason = f" ({row['fail_reason']})" if row.get("fail_reason") else ""
        raise StudyError(f"trial {number} is {row['state']}{reason}; trials with files: {listing}")
    if not row["artifact"]:
        raise StudyError(
            f"trial {number} has no files left: a search keeps only the front's and the "
            f"baseline's; trials with files: {listing}"
        )
    return trial_record(results, number)


def _check_destination(out: Path, paths: list[Path], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out: {out} exists and is not a folder")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise StudyError(
            f"--out: {', '.join(existing)} already exist(s); pass --force to overwrite"
        )


def _check_hashes(source: Path, record: TrialRecord) -> None:
    """The trial's files must be the ones it measured (a later edit is refused), those of
    each compared runtime (in <runtime>/) too."""
    recorded_files = {source / name: sha for name, sha in record.files.items()}
    for runtime, figures in record.compared.items():
        recorded_files.update({source / runtime / n: sha for n, sha in figures.files.items()})
    for path, recorded in recorded_files.items():
        if path.exists() and _sha256(path) != recorded:
            raise StudyError(
                f"{path}: its sha256 differs from the one the trial recorded; the file was "
                "changed after it was measured, so it is not exported"
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- writing


def _write_and_verify(
    results: StudyResults,
    source: Path,
    record: TrialRecord,
    staging: Path,
    stem: str,
    formats: tuple[str, ...],
    tolerance: float,
    space_file: str | Path | None,
) -> dict[str, dict[str, Any]]:
    from paretoopt.config.space import load_space
    from paretoopt.workload.data import create_data
    from paretoopt.workload.quality import load_quality

    space = load_space(space_file or results.directory / "space.yaml")
    test = create_data(space.data).test
    quality, metric = load_quality(space.metric), quality_metric(space.metric)
    checks = {}
    for fmt in formats:
        path = staging / f"{stem}{SUFFIX[fmt]}"
        found = measured_file(fmt, source, record)
        fresh = _write(fmt, source, path, space, found)
        model = load(path, space=space)
        measured = model.split_quality(test, quality)
        # the runtime that measured the file decides which recorded figure applies
        key, recorded = _recorded(fmt, record, None if fresh else found)
        companions = [path.with_suffix(c) for c in COMPANIONS.get(fmt, ())]
        checks[fmt] = {
            "file": path.name,
            "sha256": _sha256(path),
            "bytes": sum(p.stat().st_size for p in [path, *companions]),  # all it loads
            "companions": {p.name: _sha256(p) for p in companions},
            "made_afresh": fresh,
            "metric": space.metric,  # what test_accuracy measures
            "test_accuracy": measured,
            "recorded_test_accuracy": recorded,
            "recorded_as": key,
        }
        if abs(measured - recorded) > tolerance:
            raise StudyError(
                f"export check failed: {path.name} scores {metric.text(measured)} "
                f"({quality_name(space.metric)}) on the test split in its runtime, but trial "
                f"{record.artifact} recorded {metric.text(recorded)} ({key}); tolerance "
                f"{tolerance} (in the metric's units). Nothing was written."
            )
    return checks


def measured_file(fmt: str, source: Path, record: TrialRecord) -> Path | None:
    """The file of this format a runtime measured for the trial: in the trial's folder
    for the study's runtime, in <runtime>/ for a compared one; None where none did."""
    if fmt not in MEASURED:
        return None
    runtime = RUNTIME_OF[fmt]
    figures = record.compared.get(runtime)
    if figures is not None and not figures.error:
        return source / runtime / MEASURED[fmt]
    own = source / MEASURED[fmt]
    return own if own.exists() and record.runtime == runtime else None


def _recorded(fmt: str, record: TrialRecord, found: Path | None) -> tuple[str, float]:
    """The recorded test figure a written file is checked against, and its name: that
    of the runtime that measured it, or the PyTorch model's (a file made afresh, the
    compressed file)."""
    if found is None:
        return "torch_test_accuracy", record.torch_test_accuracy
    figures = record.compared.get(RUNTIME_OF[fmt])
    if figures is not None and figures.test_accuracy is not None:  # measured in <runtime>/
        return f"compared.{figures.runtime}.test_accuracy", figures.test_accuracy
    return "test_accuracy", record.test_accuracy


def _write(fmt: str, source: Path, path: Path, space: Any, measured: Path | None) -> bool:
    """Write one format; True when it had to be made afresh (not the measured file)."""
    if fmt == "safetensors":
        shutil.copyfile(source / ARTIFACT, path)
        return False
    if measured is not None and measured.exists():  # the file a runtime measured
        shutil.copyfile(measured, path)
        for suffix in COMPANIONS.get(fmt, ()):  # an IR's weights, beside it
            shutil.copyfile(measured.with_suffix(suffix), path.with_suffix(suffix))
        return False
    import torch

    from paretoopt.compress.artifact import input_layout, load_compressed, read_metadata
    from paretoopt.workload import inputs as trees
    from paretoopt.workload.models import create_model

    model = load_compressed(source / ARTIFACT, lambda: create_model(space.model))
    layout = input_layout(read_metadata(source / ARTIFACT), source / ARTIFACT)
    if fmt in ("onnx", "openvino"):
        from paretoopt.measure.onnx_export import export_onnx

        onnx_path = path if fmt == "onnx" else path.with_suffix(".float.onnx")
        export_onnx(model, trees.zeros(layout), onnx_path)
        if fmt == "openvino":  # in float: the int8 graph is made in the runtime's trial
            from paretoopt.measure.backends.openvino_ir import write_ir

            write_ir(onnx_path, path)
            onnx_path.unlink()
        return True
    if fmt == "executorch":
        from paretoopt.measure.backends.executorch_pte import lower

        path.write_bytes(lower(model.eval(), trees.zeros(layout))[0])
        return True
    # batch 1 would be traced as a constant
    args, kwargs, shapes = trees.for_export(trees.zeros(layout, batch=2))
    program = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return True


# --------------------------------------------------------------------------- model card


def model_card(
    results: StudyResults,
    number: int,
    record: TrialRecord,
    files: dict[str, Path],
    checks: dict[str, dict[str, Any]],
    runtime: str | None = None,
) -> dict[str, Any]:
    """`runtime`: the runtime whose figures the card leads with (a compared one, or the
    study's own)."""
    from paretoopt._version import __version__
    from paretoopt.config.space import load_space, space_to_dict

    space = space_to_dict(load_space(results.directory / "space.yaml"))
    keys = ("accuracy", "test_accuracy", "torch_accuracy", "torch_test_accuracy", "deploy_gap")
    keys += ("size_bytes", "runtime_file_bytes", "latency_ms", "latency")
    versions = results.metadata.get("versions") or {}
    named = _runtime_named(space["target"], versions)
    confirmation = results.metadata.get("confirmations", {}).get(str(number))
    if runtime in record.compared:  # its figures there; confirmations were of the study's
        named = f"{runtime} {record.compared[runtime].version}".strip()
        confirmation = None
    stored = record.in_runtime(runtime).to_attrs()  # plain JSON values, nested ones too
    return {
        "study": results.name,
        "trial": number,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paretoopt": __version__,
        "model": space["model"],
        "data": space["data"],
        "input_shape": results.metadata.get("input_shape"),  # the first input's
        "inputs": results.metadata.get("inputs"),  # each input's name, shape and type
        "plan": record.plan,
        "plan_summary": record.plan_summary,
        "objectives": list(results.metrics),
        "metric": space.get("metric", DEFAULT_QUALITY),  # what "accuracy" measured
        "measured": {
            **{k: stored[k] for k in keys},
            "confirmation": confirmation,
            **{k: stored[k] for k in ("params", "macs", "int_kernels", "layer_quant")},
        },
        # the same file measured in every runtime: the study's own and target.compare's
        "compared": _every_runtime(record, str(versions.get(record.runtime, ""))),
        "baseline": results.baseline,
        "target": space["target"],
        "runtime": named,
        "hardware": results.metadata.get("hardware"),
        "versions": results.metadata.get("versions"),
        "files": {fmt: checks[fmt] for fmt in files},
    }


def _every_runtime(record: TrialRecord, version: str) -> dict[str, Any]:
    """Each runtime's figures of the trial, the study's own (at `version`) first."""
    keys = ("accuracy", "test_accuracy", "deploy_gap", "latency_ms", "latency")
    stored = record.to_attrs()
    own = {k: stored[k] for k in (*keys, "runtime_file_bytes", "int_kernels", "exact_weights")}
    return {
        record.runtime: {"runtime": record.runtime, "version": version, **own},
        **stored.get("compared", {}),
    }


def _runtime_named(target: dict[str, Any], versions: dict[str, Any]) -> str:
    """The runtime that measured the model, with its version, e.g. "openvino 2026.4.1"."""
    runtime = str(target.get("runtime", "onnxruntime"))
    version = versions.get(runtime)
    return f"{runtime} {version}" if version else runtime


def _card_row(metric: Metric, measured: dict[str, Any], base: dict[str, Any]) -> str:
    """One minimised metric against the baseline, e.g. "| size ... | 4.9x smaller |"."""
    ours, theirs = measured.get(metric.field), base.get(metric.field)
    ratio = f"{metric.ratio(ours, theirs):.1f}{metric.ratio_label}" if ours and theirs else "n/a"
    figure = (lambda v: f"{v:,} B") if metric.prefixed else metric.text
    shown_base = figure(theirs) if theirs is not None else "n/a"
    return f"| {metric.label} | {figure(ours)} | {shown_base} | {ratio} |"


def _runtime_rows(compared: dict[str, Any], q: Metric, name: str) -> list[str]:
    """The same file in each runtime it was measured in (none where only one)."""
    if len(compared) < 2:
        return []
    lines = [
        "",
        f"| runtime | validation {name} | latency ms | int8 kernels |",
        "|---|---|---|---|",
    ]
    for runtime, f in compared.items():
        if f.get("error"):
            lines.append(f"| {runtime} | failed: {f['error']} | | |")
            continue
        kernels = "yes" if f.get("int_kernels") else "no"
        lines.append(
            f"| {runtime} {f.get('version', '')} | {q.text(f['accuracy'])} | "
            f"{f['latency_ms']:.4f} | {kernels} |"
        )
    return lines


def card_markdown(card: dict[str, Any]) -> str:
    m, b, t = card["measured"], card["baseline"], card["target"]
    latency = m.get("latency") or {}
    quality = card.get("metric", DEFAULT_QUALITY)  # cards from before `metric:`: top-1
    name, q = quality_name(quality), quality_metric(quality)
    pts = " pts" if q.display_unit else ""  # built-ins are percent; a user metric has its units

    lines = [
        f"# {card['study']}, trial {card['trial']}",
        "",
        f"Plan: {card['plan_summary']}",
        "",
        "| | this model | baseline | ratio |",
        "|---|---|---|---|",
        f"| validation {name} (deployed) | {q.text(m['accuracy'])} | "
        f"{q.text(b.get('accuracy', float('nan')))} | "
        f"{m['accuracy'] - b.get('accuracy', 0):+.{q.decimals}f}{pts} |",
        f"| test {name} (deployed) | {q.text(m['test_accuracy'])} | "
        f"{q.text(b.get('test_accuracy', float('nan')))} | |",
        *(_card_row(x, m, b) for x in shown(card.get("objectives", ()))[1:]),
        "",
        f"Latency: {card.get('runtime') or t['runtime']} on {t['device']}, "
        f"{t['threads']} thread(s), batch "
        f"{t['batch_size']}; p90 {latency.get('p90_ms', float('nan')):.4f} ms, spread "
        f"{latency.get('spread', float('nan')):.3f} over {latency.get('runs', '?')} runs, "
        f"mode {latency.get('mode', 'cpu')}{quiet_reading(latency, '; ')}.",
    ]
    if m.get("confirmation"):
        again = m["confirmation"]
        lines.append(
            f"Re-measured at the end of the search: {again['latency_ms']:.4f} ms"
            f"{quiet_reading(again, '; ')}."
        )
    elif len(card.get("compared") or {}) > 1:
        lines.append("Timed once during the search (a compared runtime is not re-measured).")
    lines += _runtime_rows(card.get("compared") or {}, q, name)
    hardware = card.get("hardware") or {}
    lines += [
        f"Measured on: {hardware_text(hardware)}, {hardware.get('system', '')}.",
        f"PyTorch model (weights as deployed, float activations): validation {name} "
        f"{q.text(m['torch_accuracy'])}; deployed minus PyTorch: "
        f"{m.get('deploy_gap', 0):+.{q.decimals}f}{pts}.",
        "",
        f"| file | format | bytes | sha256 | test {name} here | recorded |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, check in card["files"].items():
        made = " (made afresh, verified)" if check["made_afresh"] else " (the measured file)"
        lines.append(
            f"| {check['file']} | {fmt}{made} | {check['bytes']:,} | {check['sha256'][:16]}... | "
            f"{q.text(check['test_accuracy'])} | {q.text(check['recorded_test_accuracy'])} |"
        )
    versions = ", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items())
    lines += ["", f"Versions: paretoopt {card['paretoopt']}, {versions}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading


def _as_input(x: Any) -> Any:
    """Inputs in the types the model was exported for: real values as float32, token
    ids and other integers as int64, flags as bool; a tuple or dict of arrays for a model
    of several inputs."""
    if isinstance(x, dict):
        return {k: _as_array(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and x and all(hasattr(v, "shape") for v in x):
        return tuple(_as_array(v) for v in x)
    return _as_array(x)


def _rows(x: Any, start: int, count: int) -> Any:
    """Rows start to start + count of every input, as numpy arrays."""
    if isinstance(x, dict):
        return {k: np.asarray(v)[start : start + count] for k, v in x.items()}
    if isinstance(x, (tuple, list)) and x and all(hasattr(v, "shape") for v in x):
        return tuple(np.asarray(v)[start : start + count] for v in x)
    return np.asarray(x)[start : start + count]


def _as_array(x: Any) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array)
    kind = np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32
    return np.ascontiguousarray(array, dtype=kind)


class LoadedModel:
    """An exported model, ready for inference: ``predict(x)`` returns logits."""

    def __init__(self, fmt: str, path: Path, run: Any, module: Any = None) -> None:
        self.format, self.path, self._run, self.module = fmt, path, run, module

    def predict(self, x: Any) -> np.ndarray:
        """Logits of a batch: an array, or a tuple or dict of arrays (several inputs)."""
        return np.asarray(self._run(_as_input(x)))

    def accuracy(self, x: Any, y: np.ndarray, batch_size: int = 256) -> float:
        logits = np.concatenate(
            [self.predict(_rows(x, i, batch_size)) for i in range(0, len(y), batch_size)]
        )
        return int((logits.argmax(axis=1) == y).sum()) * 100.0 / len(y)

    def split_quality(self, split: Any, quality: Any = None, batch_size: int = 256) -> float:
        """A quality metric (workload.quality.Quality; default top-1 accuracy in percent)
        over a paretoopt data split, read a batch at a time (a streamed split never all
        at once)."""
        from paretoopt.workload.quality import TOP1

        return (quality or TOP1).score(
            (self.predict(_rows(x, 0, len(y))), y.numpy()) for x, y, _ in split.batches(batch_size)
        )

    def split_accuracy(self, split: Any, batch_size: int = 256) -> float:
        """Top-1 accuracy in percent over a paretoopt data split."""
        return self.split_quality(split, batch_size=batch_size)

    def __repr__(self) -> str:
        return f"LoadedModel({self.format}: {self.path})"


def load(
    path: str | Path,
    *,
    space: Any = None,
    build: Callable[[], Any] | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load an exported model (.onnx, .pt2 or .safetensors) for inference.

    A file is data: loading it runs no code it names or holds. A .safetensors file is
    rebuilt on a fresh copy of the architecture from `build` (a function returning the
    model), from `space` (a Space or the space file's path: its model section), or from
    the built-in model the card beside it (``<stem>.card.json``) names; a card naming a
    factory is not imported. A .pt2 whose archive holds pickled objects beyond tensors
    is refused, unless `trust`.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such file")
    if path.suffix == ".onnx":
        from paretoopt.measure.backends.onnxruntime import OrtRunner

        return LoadedModel("onnx", path, OrtRunner(path, threads=1))
    if path.suffix == ".xml":  # an OpenVINO IR: its weights in the .bin of the same stem
        return LoadedModel("openvino", path, _openvino(path))
    if path.suffix == ".pte":  # an ExecuTorch program (a flatbuffer: data, no code)
        return LoadedModel("executorch", path, _executorch(path))
    if path.suffix == ".pt2":
        module = _load_program(path, trust).module()
        return LoadedModel("pt2", path, _torch_call(module), module)
    if path.suffix == ".safetensors":
        from paretoopt.compress.artifact import load_compressed

        module = load_compressed(path, build or _builder(path, space))
        return LoadedModel("safetensors", path, _torch_call(module), module)
    raise StudyError(
        f"{path}: unknown format {path.suffix!r}; expected .onnx, .pt2, .safetensors, .xml "
        "(OpenVINO) or .pte (ExecuTorch)"
    )


def _openvino(path: Path) -> Any:
    from paretoopt.measure.backends.base import require
    from paretoopt.measure.backends.openvino_ir import OpenVinoRunner

    require("openvino")
    if not path.with_suffix(".bin").is_file():
        raise StudyError(
            f"{path}: an OpenVINO IR keeps its weights in {path.with_suffix('.bin').name} "
            "beside it, which is missing"
        )
    try:
        return OpenVinoRunner(path, threads=1)
    except RuntimeError as exc:  # the runtime's own checks of the XML and the weights
        raise StudyError(f"{path}: not a readable OpenVINO IR ({_reason(exc)})") from None


def _executorch(path: Path) -> Any:
    from paretoopt.measure.backends.base import require
    from paretoopt.measure.backends.executorch_pte import ExecuTorchRunner

    require("executorch")
    try:  # the runtime verifies the program's internal consistency as it loads it
        return ExecuTorchRunner(path.read_bytes(), threads=1)
    except RuntimeError as exc:
        raise StudyError(f"{path}: not a readable ExecuTorch program ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    from paretoopt.errors import one_line

    return one_line(str(exc))[:200]


def _load_program(path: Path, trust: bool) -> Any:
    """torch.export.load, with every pickle in the archive read as weights only (torch
    falls back to full unpickling when that fails, which ran a crafted file's code)."""
    import torch

    if trust:
        return torch.export.load(str(path))
    _refuse_pickled_constants(path)
    with _WEIGHTS_ONLY_LOCK:  # the variable is the process's: one load at a time
        return _weights_only_load(path)


def _weights_only_load(path: Path) -> Any:
    import torch

    before = os.environ.get(WEIGHTS_ONLY)
    os.environ[WEIGHTS_ONLY] = "1"
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise StudyError(
            f"{path}: holds pickled objects that are not plain tensors "
            f"({type(exc).__name__}); a file is loaded without running code from it, "
            "so it is refused (load(path, trust=True) runs what it holds)"
        ) from None
    finally:
        if before is None:
            os.environ.pop(WEIGHTS_ONLY, None)
        else:
            os.environ[WEIGHTS_ONLY] = before


WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it at every call
_WEIGHTS_ONLY_LOCK = threading.Lock()
# constants torch.export.load unpickles without torch.load (pickle.loads, _pickle_load_obj)
_PICKLED_CONSTANTS = ("custom_obj_", "opaque_obj_")


def _refuse_pickled_constants(path: Path) -> None:
    """A .pt2 archive's constants that torch unpickles directly, outside torch.load and
    its weights-only rule, are refused before torch reads the archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            configs = [n for n in archive.namelist() if n.endswith("_config.json")]
            entries = [
                e
                for n in configs
                for e in (json.loads(archive.read(n)).get("config") or {}).values()
            ]
    except (zipfile.BadZipFile, ValueError, AttributeError, OSError) as exc:
        raise StudyError(f"{path}: not a readable .pt2 archive ({type(exc).__name__})") from None
    for entry in entries:
        name = str(entry.get("path_name", "")) if isinstance(entry, dict) else ""
        if name.startswith(_PICKLED_CONSTANTS):
            raise StudyError(
                f"{path}: holds pickled objects that are not plain tensors ({name[:40]}); a "
                "file is loaded without running code from it, so it is refused "
                "(load(path, trust=True) runs what it holds)"
            )


def _builder(path: Path, space: Any) -> Callable[[], Any]:
    from paretoopt.config.space import ComponentSpec, load_space
    from paretoopt.workload.models import create_model

    if isinstance(space, (str, Path)):  # the space file itself
        space = load_space(space)
    spec = space.model if space is not None else ComponentSpec(**_card_model(path))
    if space is None and spec.factory:
        raise StudyError(
            f"{path}: its card names model.factory {spec.factory!r}; a card is data, and "
            "paretoopt imports no code it names: pass build= (a function returning the "
            "architecture) or space= (the space you searched with)"
        )
    return lambda: create_model(spec)


def _torch_call(module: Any) -> Any:
    import torch

    from paretoopt.workload import inputs as trees

    def run(x: Any) -> np.ndarray:
        with torch.inference_mode():
            return trees.call(module, trees.tree_map(torch.from_numpy, x)).numpy()

    return run


def _card_model(path: Path) -> dict[str, Any]:
    card = path.with_name(path.name.removesuffix(".safetensors") + ".card.json")
    if not card.is_file():
        raise StudyError(
            f"{path}: its model card {card.name} is missing, so the architecture to rebuild "
            "is unknown; pass space= or keep the card beside the file"
        )
    model = json.loads(card.read_text())["model"]
    return {k: model.get(k) for k in ("name", "factory", "kwargs", "checkpoint") if k in model}
