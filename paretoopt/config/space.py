"""The search-space file: one YAML document that describes a whole study.

``load_space(path)`` reads, validates and normalises it into a frozen :class:`Space`.
Every rule lives in the field declarations below, so the validation, the defaults, the
normalised copy written to ``results/<study>/space.yaml`` and the README's reference all
come from one place. Messages name the YAML path, the rule and the value.

No torch here: the space is checked before anything heavy is imported.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from paretoopt.config.knobs import (
    Choice,
    Fixed,
    KnobRule,
    Range,
    parse_knob,
    section,
    setting,
)
from paretoopt.config.metrics import DEFAULT_OBJECTIVES, DEFAULT_QUALITY, QUALITY
from paretoopt.config.metrics import METRICS as METRIC_TABLE
from paretoopt.config.parts import registered
from paretoopt.config.yamlfile import load_yaml
from paretoopt.errors import SpaceError, shown

METRICS = {m.name: m.direction for m in METRIC_TABLE.values()}  # name -> direction
SAMPLERS = ("tpe", "nsga2", "random", "gp", "grid")
RUNTIMES = ("onnxruntime", "torch", "openvino", "executorch")
DEVICES = ("cpu", "cuda")
AGENT_RUNTIMES = ("onnxruntime", "openvino", "executorch")  # those whose files an agent takes
EXECUTORCH_MAX_BATCH = 256  # an ExecuTorch program's memory is planned for this batch
INT8_RECIPES = ("auto", "u8s8", "u8u8")  # int8 weight types: see measure/isa.py
FIDELITIES = ("auto", "full", "prescreen", "halving")  # see study/fidelity.py
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class BaselineSpec:
    epochs: int = setting(
        15, "epochs to train the baseline when no checkpoint is given", kind=int, low=1, high=10_000
    )
    lr: float = setting(
        0.002,
        "Adam learning rate of baseline training (cosine decay)",
        kind=float,
        low=1e-8,
        high=1.0,
    )
    batch_size: int = setting(64, "baseline training batch size", kind=int, low=1, high=65_536)
    seed: int = setting(0, "seed of baseline training", kind=int, low=0)
    device: str = setting(
        "auto",
        "device the baseline trains on: auto (a CUDA GPU where there is one), cpu, cuda, cuda:N",
        kind=str,
    )


@dataclass(frozen=True)
class RecipeSpec:
    """How baseline training and every fine-tuning run train (epochs and learning rates
    are the baseline's and the finetune part's)."""

    loss: str | None = setting(
        None,
        "'module:callable' (logits, labels) -> scalar loss tensor; null: cross-entropy",
        kind=str,
        nullable=True,
    )
    optimizer: str | None = setting(
        None,
        "'module:callable' (params, lr) -> torch.optim.Optimizer; null: Adam (AdamW with "
        "weight_decay), cosine decay either way",
        kind=str,
        nullable=True,
    )
    weight_decay: float = setting(
        0.0,
        "decoupled weight decay of the default optimizer (AdamW)",
        kind=float,
        low=0.0,
        high=1.0,
    )
    grad_clip: float | None = setting(
        None,
        "largest gradient norm of a step (clipped beyond it); null: never clipped",
        kind=float,
        low=0.0,
        nullable=True,
    )
    amp: bool = setting(
        True,
        "automatic mixed precision when training on CUDA (bfloat16 where the GPU has it, "
        "else float16 with gradient scaling); no effect on the CPU",
        kind=bool,
        options=(False, True),
    )


# Settings added after the first release -> the value that reproduces what paretoopt did
# before they existed; a stored study or an older agent client that lacks one meant this
# value, not the current default (a setting not listed behaved as its default all along).
BEFORE_IT_EXISTED = {
    "target.warmup_tolerance": 0.0,
    "target.int8_recipe": "u8s8",
    "target.sessions": 1,
    "target.quiet_rounds": 0,
    "target.quiet_tolerance": 0.1,  # no pair was told apart then
    "target.quiet_s": 0.0,
    "target.quiet_precision": 0.0,  # readings stopped at quiet_rounds pairs
}


@dataclass(frozen=True)
class TargetSpec:
    runtime: str = setting(
        "onnxruntime", "runtime the deployed model is measured in", kind=str, options=RUNTIMES
    )
    device: str = setting("cpu", "device latency is measured on", kind=str, options=DEVICES)
    threads: int = setting(1, "intra-op threads of the runtime", kind=int, low=1, high=256)
    batch_size: int = setting(
        1, "batch size of the latency measurement", kind=int, low=1, high=4096
    )
    warmup: int = setting(
        10,
        "untimed runs per warm-up block (0 with warmup_s 0: no warm-up)",
        kind=int,
        low=0,
        high=100_000,
    )
    warmup_s: float = setting(
        0.25,
        "untimed seconds before timing, at most: warm-up ends sooner once two blocks agree",
        kind=float,
        low=0.0,
        high=600.0,
    )
    warmup_tolerance: float = setting(
        0.03,
        "warm-up ends when each model's block median moved by at most this fraction "
        "(0: always the full warmup_s)",
        kind=float,
        low=0.0,
        high=1.0,
    )
    repeats: int = setting(
        5, "timed rounds; the spread is taken across them", kind=int, low=1, high=1000
    )
    iterations: int = setting(50, "timed runs per round", kind=int, low=1, high=100_000)
    sessions: int = setting(
        1,
        "fresh runtime sessions each candidate is timed in against the baseline (each with "
        "its own warm-up and repeats)",
        kind=int,
        low=1,
        high=100,
    )
    quiet_rounds: int = setting(
        5,
        "round pairs at the machine's quiet level that the latency ratio is read from (0: "
        "every pair, whatever the machine's state)",
        kind=int,
        low=0,
        high=10_000,
    )
    quiet_tolerance: float = setting(
        0.10,
        "a round pair is quiet when the baseline's round is within this fraction of its "
        "fastest round on this machine, and the candidate's of its own",
        kind=float,
        low=0.0,
        high=10.0,
    )
    quiet_s: float = setting(
        5.0,
        "seconds of extra rounds at most, to find quiet_rounds quiet pairs and reach "
        "quiet_precision (and at calibration, to find the baseline's quiet level); a "
        "candidate that finds too few is read from all its pairs and flagged",
        kind=float,
        low=0.0,
        high=120.0,
    )
    quiet_precision: float = setting(
        0.0075,
        "after quiet_rounds quiet pairs, rounds go on (within quiet_s) until the quiet "
        "ratio's standard error is at most this fraction of it (0: stop at quiet_rounds)",
        kind=float,
        low=0.0,
        high=1.0,
    )
    max_spread: float = setting(
        0.10,
        "calibration warns when the baseline's round medians differ by more than this "
        "fraction (latencies that vary more cannot rank candidates)",
        kind=float,
        low=0.0,
        high=100.0,
    )
    int8_recipe: str = setting(
        "auto",
        "int8 weight types: auto (s8 where the CPU's kernels are exact, u8 where s8 would "
        "saturate: 8-bit codes on CPUs without VNNI), u8s8 (always s8), u8u8 (always u8)",
        kind=str,
        options=INT8_RECIPES,
    )
    cuda_graphs: bool = setting(
        True,
        "device cuda: time a captured CUDA graph (no kernel-launch overhead) instead of "
        "eager launches",
        kind=bool,
        options=(False, True),
    )
    compare: tuple[str, ...] = setting(
        (),
        "other runtimes every trial is also deployed, checked and timed in, each against "
        "the baseline in that runtime, for one front per runtime (the search ranks by "
        "target.runtime)",
        kind=str,
        options=RUNTIMES,
        many=True,
    )
    agent: str | None = setting(
        None,
        "host:port of a paretoopt agent on the target machine that times the runtime file "
        "(ONNX, OpenVINO IR or ExecuTorch program; accuracy is still measured here)",
        kind=str,
        nullable=True,
    )
    agent_token_env: str = setting(
        "PARETOOPT_AGENT_TOKEN",
        "environment variable holding the agent's shared token (never the space file)",
        kind=str,
    )


def _constraint_settings() -> list[tuple[str, Any, Any]]:
    """One optional limit per metric (see metrics.Limit), in the metrics' order."""
    out = []
    for m in METRIC_TABLE.values():
        limit = m.limit
        rule = setting(
            limit.default, limit.doc, kind=limit.kind, low=limit.low, high=limit.high, nullable=True
        )
        out.append((limit.key, f"{limit.kind.__name__} | None", rule))
    return out


# the constraints section: its settings come from the metrics, so a new metric brings its
# limit with it
ConstraintsSpec = make_dataclass("ConstraintsSpec", _constraint_settings(), frozen=True)
ConstraintsSpec.__module__ = __name__  # make_dataclass takes `module=` only from 3.12


@dataclass(frozen=True)
class SearchSpec:
    trials: int = setting(
        40, "trials in the study, the baseline trial included", kind=int, low=1, high=1_000_000
    )
    sampler: str = setting(
        "tpe",
        "Optuna sampler (tpe is multivariate; grid draws, in a seeded order, from a lattice "
        "of grid_levels values per searched knob)",
        kind=str,
        options=SAMPLERS,
    )
    grid_levels: int = setting(
        3,
        "values per range knob for the grid sampler (choices: every option)",
        kind=int,
        low=2,
        high=20,
    )
    seed: int = setting(0, "sampler and fine-tuning seed", kind=int, low=0)
    anchors: int = setting(
        3,
        "plans the study starts with before the sampler draws, light to strong, built from "
        "the knobs that move its objectives (0: none; at most a quarter of the trials; "
        "none for the grid)",
        kind=int,
        low=0,
        high=10,
    )
    fidelity: str = setting(
        "auto",
        "what a plan costs before it is known: full (every plan fine-tuned in full), "
        "prescreen (size and latency measured before fine-tuning; a plan they already rule "
        "off the front is never trained), halving (prescreen, then successive halving over "
        "fine-tuning: only plans non-dominated at each rung go on), auto (halving where a "
        "full fine-tune runs at least 4 epochs, else full)",
        kind=str,
        options=FIDELITIES,
    )
    halving_eta: int = setting(
        3,
        "successive halving: about 1 in eta plans goes on at each rung",
        kind=int,
        low=2,
        high=10,
    )
    halving_rungs: int = setting(
        2,
        "successive halving: rungs before the full fine-tune, at 1/eta^rungs ... 1/eta of it",
        kind=int,
        low=1,
        high=4,
    )
    storage: str | None = setting(
        None,
        "Optuna storage URL (postgresql://... for workers on several machines); default: "
        "a journal file in results/<study>/",
        kind=str,
        nullable=True,
    )
    heartbeat_s: int = setting(
        30,
        "seconds between a running trial's heartbeats in a database storage; a trial "
        "silent for 4 heartbeats is marked failed and retried by another worker",
        kind=int,
        low=1,
        high=3600,
    )


# space: one section per plan part (config/parts), in plan order
CompressionSpace = make_dataclass(
    "CompressionSpace",
    [(p.section, p.settings, section(p.settings, p.doc)) for p in registered().values()],
    frozen=True,
)
CompressionSpace.__module__ = __name__  # so that a Space pickles (worker processes)


@dataclass(frozen=True)
class ComponentSpec:
    """A built-in name or a user factory, with keyword arguments (model or data)."""

    name: str | None = None
    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # model only
    memory_mb: float | None = None  # data only: larger splits are streamed (None: 1024)
    finetune_samples: int | None = None  # data only: a trial fine-tunes on at most these
    eval_samples: int | None = None  # data only: ... and is evaluated on at most these
    transform: str | None = None  # data only: "module:callable" run on each training batch


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class Space:
    study: str
    model: ComponentSpec
    data: ComponentSpec
    objectives: tuple[Objective, ...]
    metric: str = DEFAULT_QUALITY  # what the accuracy objective measures (config/metrics)
    baseline: BaselineSpec = field(default_factory=BaselineSpec)
    recipe: RecipeSpec = field(default_factory=RecipeSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    constraints: ConstraintsSpec = field(default_factory=ConstraintsSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    space: CompressionSpace = field(default_factory=CompressionSpace)
    source: str = ""  # the file it came from; relative paths are resolved against its folder

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def with_trials(self, trials: int) -> Space:
        return replace(self, search=replace(self.search, trials=trials))


TOP_LEVEL = (
    "study",
    "model",
    "data",
    "baseline",
    "recipe",
    "target",
    "objectives",
    "metric",
    "constraints",
    "search",
    "space",
)
_SECTIONS: dict[str, type] = {
    "baseline": BaselineSpec,
    "recipe": RecipeSpec,
    "target": TargetSpec,
    "constraints": ConstraintsSpec,
    "search": SearchSpec,
    "space": CompressionSpace,
}


# --------------------------------------------------------------------------- loading


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; raise SpaceError naming the YAML path on any fault."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"--space: file {str(path)!r} does not exist")
    try:
        doc = load_yaml(path.read_text())
    except SpaceError as exc:  # an alias, deep nesting or a duplicate key
        raise SpaceError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise SpaceError(f"{path}: not a text file") from None
    return parse_space(doc, source=path)


def parse_space(doc: Any, source: str | Path = "<space>") -> Space:
    """Validate an already-parsed YAML document (a dict) into a Space."""
    if not isinstance(doc, dict):
        raise SpaceError(
            f"{source}: expected a mapping of top-level keys "
            f"({', '.join(TOP_LEVEL)}), but got {type(doc).__name__}"
        )
    _check_keys(doc, TOP_LEVEL, "")
    root = Path(source).resolve().parent if str(source) != "<space>" else Path.cwd()
    for key in ("model", "data"):
        if key not in doc:
            raise SpaceError(f"{key}: required; give a built-in 'name' or a 'factory'")
    values: dict[str, Any] = {
        "study": _parse_study_name(doc.get("study", _default_study_name(source))),
        "model": _parse_component(doc["model"], "model", root, checkpoint=True),
        "data": _parse_component(doc["data"], "data", root, checkpoint=False, memory=True),
        "objectives": _parse_objectives(doc.get("objectives")),
        "metric": _parse_metric(doc.get("metric", DEFAULT_QUALITY), root),
        "source": str(source),
    }
    for key, cls in _SECTIONS.items():
        values[key] = _parse_section(cls, doc.get(key), key)
    values["recipe"] = _resolve_hooks(values["recipe"], root)
    space = Space(**values)
    _check_combinations(space)
    return space


def _resolve_hooks(recipe: RecipeSpec, root: Path) -> RecipeSpec:
    """The recipe's hooks as 'module:callable' or an absolute 'file.py:callable'."""
    hooks = {
        key: _parse_factory(getattr(recipe, key), f"recipe.{key}", root)
        for key in ("loss", "optimizer")
        if getattr(recipe, key) is not None
    }
    return replace(recipe, **hooks)


DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _is_address(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _check_combinations(space: Space) -> None:
    """Rules that span settings (each setting has already checked its own value): a
    choice that could never take effect is an error, not a silent no-op."""
    t = space.target
    rules = [
        (
            t.device == "cuda" and t.runtime != "torch",
            f"target.device: cuda is measured with runtime torch (ONNX Runtime has no CUDA "
            f"provider here), but target.runtime is {t.runtime!r}",
        ),
        (
            "executorch" in (t.runtime, *t.compare) and t.batch_size > EXECUTORCH_MAX_BATCH,
            f"target.batch_size: runtime executorch"
            f"{' (target.compare)' if t.runtime != 'executorch' else ''} takes at most "
            f"{EXECUTORCH_MAX_BATCH} (its programs are planned for that batch), but "
            f"batch_size is {t.batch_size}",
        ),
        (
            t.runtime in t.compare,
            f"target.compare: names target.runtime {t.runtime!r} itself; list the other "
            "runtimes the trials are also measured in",
        ),
        (
            bool(t.compare) and t.device != "cpu",
            f"target.compare: the compared runtimes run on the CPU, but target.device is "
            f"{t.device!r}",
        ),
        (
            t.agent is not None and bool(set(t.compare) - set(AGENT_RUNTIMES)),
            f"target.compare: with target.agent every runtime is timed on the agent, which "
            f"serves {', '.join(AGENT_RUNTIMES)}, but compare names "
            f"{', '.join(sorted(set(t.compare) - set(AGENT_RUNTIMES)))}",
        ),
        (
            t.agent is not None and (t.runtime not in AGENT_RUNTIMES or t.device != "cpu"),
            f"target.agent: an agent times runtime files on its CPU, so it needs device cpu "
            f"and a runtime from {', '.join(AGENT_RUNTIMES)}, but got {t.runtime!r} on "
            f"{t.device!r}",
        ),
        *(
            (
                not DEVICE_RE.match(device),
                f"{where}: {device!r} is not a device; choose from auto, cpu, cuda, cuda:N",
            )
            for where, device in (
                ("baseline.device", space.baseline.device),
                ("space.finetune.device", space.space.finetune.device),
            )
        ),
        (
            space.recipe.optimizer is not None and space.recipe.weight_decay > 0,
            "recipe.weight_decay: applies to the default optimizer (AdamW), but "
            "recipe.optimizer names your own; give the decay to that optimizer instead",
        ),
        (
            t.agent is not None and not _is_address(t.agent),
            f"target.agent: expected host:port (e.g. 192.168.1.20:8765), but got {t.agent!r}",
        ),
    ]
    messages = [message for broken, message in rules if broken]
    for part in registered().values():  # each plan part's own rules (config/parts)
        messages += part.check(space)
    if messages:
        raise SpaceError(messages[0])


def _default_study_name(source: str | Path) -> str:
    return "study" if str(source) == "<space>" else Path(source).stem


def _parse_study_name(raw: Any) -> str:
    if not isinstance(raw, str) or not _NAME_RE.match(raw):
        raise SpaceError(
            f"study: {shown(raw)} is not a valid study name; use letters, digits, "
            "'.', '_' and '-' (it names the folder results/<study>/)"
        )
    return raw


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...] | list[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            at = f"{where}." if where else ""
            # a key with spaces, line breaks or other odd characters is quoted, so the
            # message stays one readable line
            plain = isinstance(key, str) and key.isprintable() and key.strip() == key and key
            text = key if plain and len(key) <= 60 else shown(key)
            raise SpaceError(f"{at}{text}: unknown key{maybe}; allowed keys: {', '.join(allowed)}")


def _parse_section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: expected a mapping of settings, but got {shown(raw)}")
    _check_keys(raw, [f.name for f in fields(cls)], where)
    values = {}
    for f in fields(cls):
        if f.name in raw:
            values[f.name] = _parse_value(f.metadata, raw[f.name], f"{where}.{f.name}")
    return cls(**values)


def _parse_value(meta: Mapping[str, Any], raw: Any, where: str) -> Any:
    if "section" in meta:
        return _parse_section(meta["section"], raw, where)
    if raw is None:
        if meta["nullable"]:
            return None
        raise SpaceError(f"{where}: a value is required here (null is not allowed)")
    if meta["knob"]:
        return parse_knob(raw, meta["rule"], where)
    if meta.get("many"):
        return _parse_many(raw, meta["rule"], where)
    if isinstance(raw, (list, dict)):
        raise SpaceError(f"{where}: this setting cannot be searched; give a single value")
    return meta["rule"].check(raw, where)


def _parse_many(raw: Any, rule: KnobRule, where: str) -> tuple[Any, ...]:
    """A list of distinct values (one value alone counts as a list of one)."""
    items = raw if isinstance(raw, list) else [raw]
    values = tuple(rule.check(v, f"{where}[{i}]") for i, v in enumerate(items))
    if len(set(values)) != len(values):
        raise SpaceError(f"{where}: the values must be distinct, but got {shown(items)}")
    return values


def _parse_component(
    raw: Any, where: str, root: Path, *, checkpoint: bool, memory: bool = False
) -> ComponentSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise SpaceError(
            f"{where}: expected a built-in name or a mapping with 'name' or "
            f"'factory', but got {shown(raw)}"
        )
    keys = ["name", "factory", "kwargs"] + (["checkpoint"] if checkpoint else [])
    keys += ["memory_mb", "finetune_samples", "eval_samples", "transform"] if memory else []
    _check_keys(raw, keys, where)
    name, factory = raw.get("name"), raw.get("factory")
    if (name is None) == (factory is None):
        raise SpaceError(
            f"{where}: give exactly one of 'name' (built-in) or 'factory' "
            "('module.path:callable' or 'path/file.py:callable')"
        )
    if name is not None and not isinstance(name, str):
        raise SpaceError(f"{where}.name: expected a string, but got {shown(name)}")
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SpaceError(
            f"{where}.kwargs: expected a mapping of keyword arguments, "
            f"but got {shown(raw.get('kwargs'))}"
        )
    return ComponentSpec(
        name=name,
        factory=_parse_factory(factory, f"{where}.factory", root) if factory else None,
        kwargs=dict(kwargs),
        checkpoint=_parse_checkpoint(raw.get("checkpoint"), f"{where}.checkpoint", root),
        memory_mb=_parse_memory(raw.get("memory_mb"), f"{where}.memory_mb"),
        finetune_samples=_parse_samples(raw.get("finetune_samples"), f"{where}.finetune_samples"),
        eval_samples=_parse_samples(raw.get("eval_samples"), f"{where}.eval_samples"),
        transform=_parse_factory(raw["transform"], f"{where}.transform", root)
        if raw.get("transform")
        else None,
    )


def _parse_metric(raw: Any, root: Path) -> str:
    """A built-in quality metric, or a user's 'module:callable' (higher is better)."""
    if isinstance(raw, str) and raw in QUALITY:
        return raw
    if isinstance(raw, str) and ":" in raw:
        return _parse_factory(raw, "metric", root)
    raise SpaceError(
        f"metric: {shown(raw)} is not a quality metric; choose from {', '.join(QUALITY)}, or "
        "name your own as 'module.path:callable' or 'path/to/file.py:callable' "
        "((logits, labels) -> a number, higher is better)"
    )


def _parse_samples(raw: Any, where: str) -> int | None:
    """A bound on the samples a trial uses (null: all of them)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise SpaceError(f"{where}: expected a number of samples >= 1, or null, got {shown(raw)}")
    return raw


def _parse_memory(raw: Any, where: str) -> float | None:
    """Megabytes a split may take in memory; 0 streams every split."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw <= 1e7:
        raise SpaceError(
            f"{where}: expected megabytes from 0 (stream every split) to 10000000, but got "
            f"{shown(raw)}"
        )
    return float(raw)


def _parse_factory(raw: Any, where: str, root: Path) -> str:
    if not isinstance(raw, str) or raw.count(":") != 1 or not all(raw.split(":")):
        raise SpaceError(
            f"{where}: expected 'module.path:callable' or "
            f"'path/to/file.py:callable', but got {shown(raw)}"
        )
    target, attr = raw.split(":")
    if target.endswith(".py"):
        file = (root / target).resolve()
        if not file.is_file():
            raise SpaceError(f"{where}: file {target!r} does not exist (looked in {root})")
        return f"{file}:{attr}"
    return raw


def _parse_checkpoint(raw: Any, where: str, root: Path) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise SpaceError(f"{where}: expected a file path, but got {shown(raw)}")
    file = (root / raw).resolve()
    if not file.is_file():
        raise SpaceError(f"{where}: file {shown(raw)} does not exist (looked in {root})")
    return str(file)


def _parse_objectives(raw: Any) -> tuple[Objective, ...]:
    if raw is None:
        return tuple(Objective(m, METRICS[m]) for m in DEFAULT_OBJECTIVES)
    if isinstance(raw, list):
        bad = [m for m in raw if not isinstance(m, str)]
        if bad:
            raise SpaceError(
                f"objectives: expected metric names ({', '.join(METRICS)}), but got {shown(bad[0])}"
            )
        raw = {m: METRICS.get(m) for m in raw}
    if not isinstance(raw, dict):
        raise SpaceError(
            f"objectives: expected a list of metrics ({', '.join(METRICS)}) or "
            f"a mapping metric: direction, but got {shown(raw)}"
        )
    out = []
    for metric, direction in raw.items():
        if metric not in METRICS:
            raise SpaceError(
                f"objectives: unknown metric {shown(metric)}; choose from {', '.join(METRICS)}"
            )
        if direction != METRICS[metric]:
            raise SpaceError(
                f"objectives.{metric}: must be {METRICS[metric]!r}, but got {shown(direction)}"
            )
        out.append(Objective(metric, direction))
    if len(out) < 2:
        raise SpaceError(
            f"objectives: a Pareto search needs at least two metrics, but got "
            f"{[o.metric for o in out]}; choose from {', '.join(METRICS)}"
        )
    return tuple(out)


# --------------------------------------------------------------------------- normal form


def space_to_dict(space: Space) -> dict[str, Any]:
    """The normalised document: every default filled in, paths resolved."""
    return {
        "study": space.study,
        "model": _component_to_dict(space.model),
        "data": _component_to_dict(space.data),
        "objectives": {o.metric: o.direction for o in space.objectives},
        "metric": space.metric,
        **{key: section_to_dict(getattr(space, key)) for key in _SECTIONS},
    }


def _component_to_dict(spec: ComponentSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name} if spec.name else {"factory": spec.factory}
    out["kwargs"] = dict(spec.kwargs)
    if spec.checkpoint:
        out["checkpoint"] = spec.checkpoint
    for key in ("memory_mb", "finetune_samples", "eval_samples", "transform"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    return out


def section_to_dict(obj: Any) -> dict[str, Any]:
    """A section's settings as the normalised document writes them."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, (Fixed, Choice, Range)):
            out[f.name] = value.to_yaml()
        elif is_dataclass(value):
            out[f.name] = section_to_dict(value)
        elif isinstance(value, tuple):  # a list setting: YAML writes lists
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a stored space is read back by load_yaml, which refuses aliases


def dump_space(space: Space) -> str:
    return yaml.dump(space_to_dict(space), Dumper=_Dumper, sort_keys=False)


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(YAML path, default, searchable, description) for every setting: the README reference."""
    rows: list[tuple[str, str, str, str]] = []
    for key, cls in _SECTIONS.items():
        rows.extend(_reference(cls, key))
    return rows


def _reference(cls: type, where: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for f in fields(cls):
        path = f"{where}.{f.name}"
        if "section" in f.metadata:
            rows.extend(_reference(f.metadata["section"], path))
            continue
        default = f.default if f.default is not MISSING else None
        value = default.to_yaml() if isinstance(default, (Fixed, Choice, Range)) else default
        value = list(value) if isinstance(value, tuple) else value
        rows.append(
            (
                path,
                yaml.safe_dump(value, default_flow_style=True, sort_keys=False)
                .strip()
                .removesuffix("...")
                .strip(),
                "yes" if f.metadata["knob"] else "no",
                f.metadata["doc"] + _choices(f.metadata["rule"]),
            )
        )
    return rows


def _choices(rule: KnobRule) -> str:
    """The allowed values of a plain string setting, for the reference table."""
    if rule.options and rule.kind is str and not rule.searchable:
        return ": " + ", ".join(f"`{o}`" for o in rule.options)
    return ""
