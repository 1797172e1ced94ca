"""The trial record: what one trial measured, typed, frozen and serialised in one place.

``pipeline`` builds a ``TrialRecord``; ``to_attrs`` is the one form a study stores
(Optuna user attributes, JSON); ``from_attrs`` reads any stored version back, so the
frames, the baseline in ``run.json``, the model card, the terminal and the explorer all
read the same typed fields. Records read like mappings too (``record["latency"]["mode"]``),
so tests and scripts can index them as they index the stored form.

No torch, no numpy: the results layer reads records without the heavy stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

RECORD_VERSION = 1
VERSION_ATTR = "record_version"
# renamed or moved fields: (field, the name an older record stored it under)
RENAMED: tuple[tuple[str, str], ...] = ()


class _Readable:
    """Read access by field name, as on the stored dict (``record["accuracy"]``)."""

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:  # type: ignore[arg-type]
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in {f.name for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class Latency(_Readable):
    """One latency measurement: the candidate's own rounds, and the scale it is read on."""

    median_ms: float  # raw median of the candidate's timed runs
    p90_ms: float
    min_ms: float
    spread: float  # slowest round median / fastest round median
    runs: int
    batch_size: int
    latency_ms: float | None = None  # drift-corrected: reference x candidate/baseline ratio
    ratio_to_baseline: float | None = None
    baseline_median_ms: float | None = None  # the baseline's median in the same rounds
    reference_ms: float | None = None
    mode: str = "cpu"  # "cpu", "eager", "cuda-graph", "remote"
    peak_memory_bytes: int | None = None  # where the runtime reports it
    # the candidate/baseline ratio of each fresh runtime session it was timed in
    session_ratios: list[float] = field(default_factory=list)
    pairs: int = 0  # round pairs (candidate, baseline) timed
    # of them, with both rounds at the machine's quiet level (measure/protocol); the
    # ratio is read from those where quiet is True, from every pair where it is False
    quiet_pairs: int = 0
    quiet: bool | None = None  # None: timed before quiet rounds existed, or switched off
    tries: int = 1  # timings taken: one more each time the machine was never quiet
    # the quiet ratio's standard error, as a fraction of it (None: not a quiet reading,
    # or timed before it was recorded); target.quiet_precision is what it aims for
    error: float | None = None
    structure: str | None = None  # the deployed graph, weights aside (measure/structure)
    # the trial's latency_ms pools the sessions of every trial of its structure: how many
    pooled_trials: int = 1
    pooled_sessions: int = 1
    # timed on the plan's structure before fine-tuning (search.fidelity), which the
    # fine-tuned model's deployed graph matched: the trial did not time it twice
    before_training: bool = False


@dataclass(frozen=True)
class LayerQuant(_Readable):
    """One layer's weights as deployed: bit-width, number format, grid, and the kernel
    the runtime really ran it in (read from its optimised graph)."""

    bits: int
    format: str  # "int", "kmeans" (shared values), "float32", "float16", "bfloat16"
    kernel: str  # "int8" or "float32"
    granularity: str | None = None
    scheme: str | None = None
    exact_weights: bool | None = None  # the int8 model holds the trial's own codes
    int8_weights: str | None = None  # "s8" or "u8" (no saturation without VNNI): see isa


@dataclass(frozen=True)
class RuntimeFigures(_Readable):
    """The trial's compressed file measured in another runtime (target.compare): deployed
    from the same file, checked against the compressed model, evaluated, and timed
    against the baseline in that runtime. `error` says why it could not be, where it
    could not (the figures are then None)."""

    runtime: str
    version: str = ""
    accuracy: float | None = None  # validation, in this runtime
    test_accuracy: float | None = None
    deploy_gap: float | None = None  # against the PyTorch model, as the record's
    latency_ms: float | None = None  # this runtime's reference x candidate/baseline ratio
    latency: Latency | None = None
    runtime_file_bytes: int | None = None
    int_kernels: bool | None = None
    exact_weights: bool | None = None
    kernels: dict[str, str] = field(default_factory=dict)  # layer -> int8 or float32
    # per layer, whether its int8 weight holds the plan's codes there, and in which type
    exact_layers: dict[str, bool | None] = field(default_factory=dict)
    int8_layers: dict[str, str | None] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # its files (in <runtime>/) -> sha256
    error: str = ""

    @classmethod
    def from_attrs(cls, raw: Mapping[str, Any]) -> RuntimeFigures:
        values = _known(cls, raw)
        if isinstance(raw.get("latency"), Mapping):
            values["latency"] = _latency(raw["latency"], raw)
        return cls(**values)


@dataclass(frozen=True)
class TrialRecord(_Readable):
    """Everything one trial measured. Figures of the deployed model unless named torch_."""

    plan: dict[str, Any]
    accuracy: float  # validation, in the runtime: drives the search
    test_accuracy: float
    torch_accuracy: float  # the PyTorch model: weights quantized, float activations
    torch_test_accuracy: float
    deploy_gap: float  # what the runtime (int8 activations) costs or gains, in points
    size_bytes: int  # the compressed file's byte count
    runtime_file_bytes: int | None  # none for the torch runtime: it runs the module
    latency_ms: float
    latency: Latency
    runtime: str
    params: int
    macs: int  # multiply-accumulates of one sample, dense count
    nonzero_params: int
    # None where an older paretoopt did not record them
    int_kernels: bool | None = None  # every integer-quantized layer ran in an integer kernel
    exact_weights: bool | None = None  # the runtime model holds the compressed file's weights
    uncoded_bytes: int | None = None  # the file without lossless coding (None: not coded)
    layer_quant: dict[str, LayerQuant] = field(default_factory=dict)
    # what the techniques recorded (Workbench.records): per layer, and their own facts
    layer_bits: dict[str, int] = field(default_factory=dict)  # empty: float32 weights
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    layer_channels: dict[str, list[int]] = field(default_factory=dict)  # kept, original
    layer_rank: dict[str, list[int]] = field(default_factory=dict)  # factors: kept, full
    saliency: str | None = None
    finetune_loss: list[float] = field(default_factory=list)  # empty: no fine-tuning
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    artifact: str = ""  # the trial's folder, relative to the study folder
    plan_summary: str = ""
    # the same file measured in each runtime of target.compare
    compared: dict[str, RuntimeFigures] = field(default_factory=dict)

    def replace(self, **changes: Any) -> TrialRecord:
        return dataclasses.replace(self, **changes)

    def to_attrs(self) -> dict[str, Any]:
        """The stored form: plain JSON values, with the record's version."""
        return {**asdict(self), VERSION_ATTR: RECORD_VERSION}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        """Read a stored record of any version; fields an older paretoopt did not record
        take their defaults. KeyError when a field without a default is missing."""
        raw = dict(attrs)
        for new, old in RENAMED:
            if new not in raw and old in raw:
                raw[new] = raw.pop(old)
        values = _known(cls, raw)
        values["latency"] = _latency(raw.get("latency") or {}, raw)
        values["layer_quant"] = {
            name: LayerQuant(**_known(LayerQuant, entry))
            for name, entry in (raw.get("layer_quant") or {}).items()
        }
        values["compared"] = {
            name: RuntimeFigures.from_attrs(entry)
            for name, entry in (raw.get("compared") or {}).items()
            if isinstance(entry, Mapping)
        }
        values.setdefault("torch_test_accuracy", raw.get("test_accuracy"))
        missing = [f.name for f in fields(cls) if _required(f) and f.name not in values]
        if missing:
            raise KeyError(f"trial record: missing {', '.join(missing)}")
        return cls(**values)

    def in_runtime(self, runtime: str | None) -> TrialRecord:
        """The record as measured in one of its compared runtimes (target.compare): that
        runtime's accuracy, latency, runtime file and kernels in the fields the study's
        runtime fills (the record itself for its own runtime, or None). KeyError: it was
        not measured there; ValueError: measuring it there failed, with the reason."""
        if runtime is None or runtime == self.runtime:
            return self
        figures = self.compared[runtime]
        if figures.error or figures.latency is None or figures.accuracy is None:
            raise ValueError(figures.error or "no figures were recorded there")
        layers = {  # the kernels there, and whether each holds the plan's codes there
            name: dataclasses.replace(
                q,
                kernel=figures.kernels.get(name, q.kernel),
                exact_weights=figures.exact_layers.get(name),
                int8_weights=figures.int8_layers.get(name),
            )
            for name, q in self.layer_quant.items()
        }
        return self.replace(
            accuracy=figures.accuracy,
            test_accuracy=figures.test_accuracy,
            deploy_gap=figures.deploy_gap,
            latency_ms=figures.latency_ms,
            latency=figures.latency,
            runtime_file_bytes=figures.runtime_file_bytes,
            int_kernels=figures.int_kernels,
            exact_weights=figures.exact_weights,
            runtime=runtime,
            layer_quant=layers,
        )

    def baseline_view(self) -> dict[str, Any]:
        """The baseline's figures as run.json keeps them (every ratio is read against
        these)."""
        out = {k: getattr(self, k) for k in BASELINE_FIELDS}
        out["latency"] = asdict(self.latency)
        out["compared"] = {name: asdict(f) for name, f in self.compared.items()}
        return out


BASELINE_FIELDS = (
    "accuracy",
    "test_accuracy",
    "torch_accuracy",
    "size_bytes",
    "runtime_file_bytes",
    "latency_ms",
    "latency",
    "params",
    "macs",
)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _known(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `raw` that are fields of `cls` (a stored record may hold more: the
    trial's host and worker, the anchor rank)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _latency(raw: Mapping[str, Any], record: Mapping[str, Any]) -> Latency:
    values = _known(Latency, raw)
    for name, default in (("min_ms", raw.get("median_ms")), ("batch_size", 1)):
        values.setdefault(name, default)
    values.setdefault("latency_ms", record.get("latency_ms"))
    return Latency(**values)


TECHNIQUE_FIELDS = (
    "layer_bits",
    "layer_sparsity",
    "layer_channels",
    "layer_rank",
    "saliency",
    "finetune_loss",
)


def technique_fields(records: Mapping[str, Any]) -> dict[str, Any]:
    """What the techniques left in Workbench.records, checked: a technique may fill only
    the fields set aside for techniques, so it can never overwrite a measurement."""
    stray = sorted(set(records) - set(TECHNIQUE_FIELDS))
    if stray:
        raise ValueError(
            f"a technique recorded {', '.join(stray)}, which is not a technique field of "
            f"the trial record ({', '.join(TECHNIQUE_FIELDS)})"
        )
    return dict(records)


def quiet_reading(latency: Mapping[str, Any], lead: str = "") -> str:
    """How a latency was read, after `lead`, for captions and cards ("" where nobody
    looked: timed before quiet rounds existed, or with them switched off)."""
    pairs = latency.get("pairs", 0)
    if latency.get("quiet") is True:
        quiet = latency.get("quiet_pairs", 0)
        error = latency.get("error")
        known = f" (standard error {error:.1%})" if isinstance(error, float) else ""
        return f"{lead}read from {quiet} of {pairs} round pairs at the machine's quiet level{known}"
    if latency.get("quiet") is False:
        return f"{lead}the machine was never quiet while it was timed: read from all {pairs} pairs"
    return ""


LAYER_COLUMNS = (
    "layer",
    "sparsity",  # pruning: the share of its weights that are zero
    "channels_kept",  # channel pruning: output channels left ...
    "channels",  # ... of the original's
    "rank",  # low-rank factorization: the rank a factor layer carries ...
    "full_rank",  # ... of the most its layer had
    "bits",  # quantization: weight bit-width (32: float32)
    "format",  # int, kmeans (2^bits shared values: weight clustering), float16, ...
    "kernel",  # the kernel it ran in, read from the runtime's graph: int8 or float32
    "granularity",
    "scheme",
    "exact_weights",  # an int8 layer holds the trial's own codes (not re-rounded ones)
    "int8_weights",  # the type an int8 layer's codes are stored in: s8 or u8
)


def layer_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One tidy row per layer (LAYER_COLUMNS) from what the techniques recorded: the
    explorer's per-layer view and layers.csv read these."""
    sparsity = record.get("layer_sparsity") or {}
    channels = record.get("layer_channels") or {}
    quant = record.get("layer_quant") or {}
    ranks = record.get("layer_rank") or {}
    rows = []
    for name in dict.fromkeys([*sparsity, *channels, *quant]):
        kept, q = channels.get(name) or [None, None], quant.get(name) or {}
        rank = ranks.get(name) or [None, None]
        rows.append(
            {
                "layer": name,
                "sparsity": sparsity.get(name, 0.0),
                "channels_kept": kept[0],
                "channels": kept[1],
                "rank": rank[0],
                "full_rank": rank[1],
                "bits": q.get("bits", 32),
                **{k: q.get(k) for k in LAYER_COLUMNS[7:]},
            }
        )
    return rows


def frame_columns(record: TrialRecord | None) -> dict[str, Any]:
    """A trial's measured columns in the trials frame (None where it has no record)."""
    out: dict[str, Any] = {k: getattr(record, k) if record else None for k in FRAME_FIELDS}
    out |= latency_columns(record.latency if record else None)
    out["params"] = record.params if record else None
    out["macs"] = record.macs if record else None
    for name, figures in (record.compared if record else {}).items():
        out.update(compared_columns(name, figures))
    return out


# a compared runtime's figures in the trials frame, as "<column>@<runtime>"
COMPARED_FIELDS = (
    "accuracy",
    "test_accuracy",
    "deploy_gap",
    "latency_ms",
    "int_kernels",
    "exact_weights",
    "runtime_file_bytes",
)


def latency_columns(latency: Latency | None) -> dict[str, Any]:
    """A latency's detail columns in the trials frame (None where there is none)."""
    if latency is None:
        return dict.fromkeys(LATENCY_COLUMNS)
    return {
        # raw figures of the candidate's own rounds; latency_ms is drift-corrected
        "latency_raw_median_ms": latency.median_ms,
        "latency_raw_p90_ms": latency.p90_ms,
        "latency_spread": latency.spread,
        # latency_ms pools every trial of the structure; this trial's own sessions alone:
        "latency_own_ms": latency.latency_ms,
        "latency_pooled_trials": latency.pooled_trials,
        "latency_quiet": latency.quiet,
        "latency_structure": latency.structure,
    }


LATENCY_COLUMNS = (
    "latency_raw_median_ms",
    "latency_raw_p90_ms",
    "latency_spread",
    "latency_own_ms",
    "latency_pooled_trials",
    "latency_quiet",
    "latency_structure",
)


def compared_columns(runtime: str, figures: RuntimeFigures) -> dict[str, Any]:
    """A compared runtime's columns, each named "<column>@<runtime>" after the column of
    the study's runtime it stands for (see COMPARED_COLUMNS); its figures are not
    pooled, so its own latency is its latency."""
    out = {k: getattr(figures, k) for k in COMPARED_FIELDS}
    out |= {"error": figures.error, **latency_columns(figures.latency)}
    return {f"{k}@{runtime}": v for k, v in out.items()}


# every column a compared runtime gives the trials frame, under "<column>@<runtime>"
COMPARED_COLUMNS = (*COMPARED_FIELDS, "error", *LATENCY_COLUMNS)


FRAME_FIELDS = (
    "accuracy",
    "test_accuracy",
    "torch_accuracy",
    "deploy_gap",
    "int_kernels",
    "exact_weights",
    "size_bytes",
    "uncoded_bytes",
    "latency_ms",
)


def stored_record(attrs: Mapping[str, Any]) -> TrialRecord | None:
    """A trial's record, or None where it holds none (failed, running, or damaged)."""
    try:
        return TrialRecord.from_attrs(attrs)
    except (KeyError, TypeError):
        return None


def record_field_names() -> list[str]:
    """Every top-level field a record stores (for contract tests and documentation)."""
    return [f.name for f in fields(TrialRecord)]
