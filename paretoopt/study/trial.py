"""One study's fixed context (data, baseline, teacher) and one trial's pipeline.

``prepare`` checks everything a space file names (model, data, checkpoint) before anything
is written, then trains the baseline or takes it from the cache. ``run_trial`` copies the
baseline, applies the plan's techniques, writes the compressed file, rebuilds the model
from that file and measures the rebuilt model in the target runtime.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from paretoopt.compress.artifact import ARTIFACT, load_compressed, read_metadata, save_compressed
from paretoopt.compress.augment import Augment, mixable
from paretoopt.compress.recipe import Setup, load_setup, resolve_device
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier, prunable_layers
from paretoopt.compress.techniques.quantize import is_symmetric
from paretoopt.compress.train import (
    Recipe,
    Teacher,
    logits_of,
    partial_quality,
    split_quality,
    train,
)
from paretoopt.config.knobs import Choice, Range
from paretoopt.config.metrics import quality_metric, quality_name
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import RecipeSpec, Space, section_to_dict, space_to_dict
from paretoopt.errors import SpaceError, StudyError, TrialError, one_line
from paretoopt.measure import Runner, runtime_quality
from paretoopt.measure.backends import Deployment, DeployRequest
from paretoopt.measure.backends.base import untimed
from paretoopt.measure.backends.onnxruntime import ONNX_FILE
from paretoopt.measure.gate import MeasurementGate
from paretoopt.measure.target import Target
from paretoopt.results.record import (
    Latency,
    LayerQuant,
    RuntimeFigures,
    TrialRecord,
    technique_fields,
)
from paretoopt.study.fidelity import Fidelity, rung_steps
from paretoopt.workload.data import Splits, bounded, create_data
from paretoopt.workload.inputs import Inputs, as_args, call, describe_inputs, numpy
from paretoopt.workload.models import create_model, load_checkpoint
from paretoopt.workload.quality import TOP1, Quality, load_quality

RUNTIME_FILE = ONNX_FILE  # the file the default (onnxruntime) target loads and times


@dataclass
class StudyContext:
    space: Space
    splits: Splits
    baseline: nn.Module
    teacher_logits: Teacher  # the baseline's logits for distillation
    classifier: str
    baseline_source: str  # "checkpoint", "trained" or "cache"
    target: Target  # the runtime, the gate, the reference and the calibration
    setup: Setup = Setup()  # fine-tuning's device and the recipe's hooks
    quality: Quality = TOP1  # what the accuracy objective measures (metric:)
    # the other runtimes each trial is measured in (target.compare), by name
    compared: dict[str, Target] = field(default_factory=dict)

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.target.calibration

    def build_model(self) -> nn.Module:
        return create_model(self.space.model)

    @property
    def layer_names(self) -> list[str]:
        """Layers that get their own budget in per-layer search (all but the classifier)."""
        return [n for n in prunable_layers(self.baseline) if n != self.classifier]

    @property
    def quant_layers(self) -> list[str]:
        """Layers that get their own bit-width under mixed precision (all of them)."""
        return list(prunable_layers(self.baseline))


@dataclass(frozen=True)
class Checked:
    """What `check` built and tried: the model, the data, baseline training's and
    fine-tuning's setups, and the quality metric."""

    model: nn.Module
    splits: Splits
    baseline_setup: Setup
    finetune_setup: Setup
    quality: Quality


def check_inputs(space: Space) -> tuple[nn.Module, Splits]:
    """Build the model and data and run one forward pass; SpaceError on any fault."""
    checked = check(space)
    return checked.model, checked.splits


def check(space: Space) -> Checked:
    """Everything a space file names, built and tried once before anything is trained:
    model, data, a forward pass at two batch sizes, the devices, the recipe's hooks and
    the metric (SpaceError on any fault)."""
    splits = create_data(space.data)
    model = create_model(space.model)
    if space.model.checkpoint:
        load_checkpoint(model, space.model.checkpoint)
    out = _forward(model, splits, 2, "")
    _forward(model, splits, 1, " at batch size 1 (latency is timed at batch 1)")
    classes = _classes(splits)
    if out.dim() != 2 or out.shape[1] < classes:
        raise SpaceError(
            f"model: expected logits of shape (batch, {classes}) for the data's "
            f"{classes} classes, but got {list(out.shape)}"
        )
    if not prunable_layers(model):
        raise SpaceError("model: has no Conv1d, Conv2d or Linear layer to compress")
    _check_mixing(space, splits)
    width = int(out.shape[1])  # the model's logits: the hooks and the metric are tried at it
    baseline_setup, finetune_setup = setups(space, width)
    quality = load_quality(space.metric, classes=width)
    if space.target.device == "cuda" and not torch.cuda.is_available():
        raise SpaceError("target.device: cuda, but this machine has no usable CUDA device")
    return Checked(model, splits, baseline_setup, finetune_setup, quality)


def _classes(splits: Splits) -> int:
    """The classes the labels name: of every label where the splits are in memory, of a
    first batch of each where streamed (a later label out of range stops training with
    its own message)."""
    top = 0
    for split in (splits.train, splits.val, splits.test):
        for _, y, _ in split.batches(len(split) if split.in_memory else 256):
            top = max(top, int(y.max()))
            break
    return top + 1


def _check_mixing(space: Space, splits: Splits) -> None:
    """mixup and cutmix, where the space can turn them on, must fit the data's inputs."""
    for kind in ("mixup", "cutmix"):
        knob = getattr(space.space.finetune, kind)
        values = (
            [knob.high] if isinstance(knob, Range)
            else knob.options if isinstance(knob, Choice) else [knob.value]
        )  # fmt: skip
        reason = mixable(splits.layout, kind) if max(float(v) for v in values) > 0 else None
        if reason:
            raise SpaceError(f"space.finetune.{kind}: {reason}; set it to 0 (off) for these inputs")


def _forward(model: nn.Module, splits: Splits, batch: int, at: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            return call(model.eval(), splits.train.head(batch))
    except Exception as exc:
        raise SpaceError(
            f"model: a forward pass on the data's inputs {describe_inputs(splits.layout)} "
            f"failed{at}: {type(exc).__name__}: "
            f"{one_line(str(exc))[:300]}"
        ) from None


def prepare(
    space: Space,
    cache_dir: Path,
    log: Callable[[str], None] = print,
) -> StudyContext:
    checked = check(space)
    model, splits, quality = checked.model, checked.splits, checked.quality
    baseline_setup, finetune_setup = checked.baseline_setup, checked.finetune_setup
    target = Target(space.target, splits.val, splits.train.head(1))
    source = "checkpoint"
    if not space.model.checkpoint:
        source = _baseline_from_cache(
            model, space, splits, cache_dir, log, target.gate, baseline_setup, quality
        )
    model.eval()
    splits = _per_trial(splits, space)
    teacher = Teacher.of(model, splits.train)
    classifier = find_classifier(model, splits.train.head(1))
    return StudyContext(
        space,
        splits,
        model,
        teacher,
        classifier,
        source,
        target,
        finetune_setup,
        quality,
        target.compared(),
    )


def setups(space: Space, classes: int) -> tuple[Setup, Setup]:
    """Baseline training's and fine-tuning's devices, with the recipe's hooks (imported
    and tried once on logits of the model's width `classes`: SpaceError on a bad one)."""
    base = load_setup(space.recipe, space.baseline.device, "baseline.device", classes)
    device = resolve_device(space.space.finetune.device, "space.finetune.device")
    return base, replace(base, device=device)


def _per_trial(splits: Splits, space: Space) -> Splits:
    """The samples a trial fine-tunes on and is evaluated on (data.finetune_samples,
    data.eval_samples): the baseline trained on all of them; every trial, the baseline
    trial included, reads the same subsets."""
    seed, d = space.search.seed, space.data
    return Splits(
        bounded(splits.train, d.finetune_samples, seed),
        bounded(splits.val, d.eval_samples, seed + 1),
        bounded(splits.test, d.eval_samples, seed + 2),
        splits.transform,
    )


def baseline_key(space: Space) -> str:
    """Everything that decides the trained baseline, hashed: model, data, recipe, code."""
    from paretoopt._version import __version__

    doc = space_to_dict(space)
    parts: dict[str, Any] = {k: doc[k] for k in ("model", "data", "baseline")}
    for key in PER_TRIAL:  # how trials read the data does not change the baseline
        parts["data"].pop(key, None)
    # where it trains: the device's kind, not its name (auto and cpu alike train on the
    # CPU), so a cached CPU baseline is not taken for a GPU one; keys from before the
    # setting existed stay valid
    device = resolve_device(parts["baseline"].pop("device"), "baseline.device")
    recipe, default = doc["recipe"], section_to_dict(RecipeSpec())
    if device.type != "cpu":  # ... and the arithmetic it trains in there
        dtype = Setup(device=device, amp=space.recipe.amp).amp_dtype
        parts["device"] = f"{device.type}-{dtype or torch.float32}"
    else:  # mixed precision is CUDA's alone
        recipe, default = ({k: v for k, v in d.items() if k != "amp"} for d in (recipe, default))
    if recipe != default:  # a recipe of the user's: its hooks and settings
        parts["recipe"] = recipe
    parts["code"] = (__version__, torch.__version__)
    for key, factory in (
        ("model", doc["model"].get("factory", "")),
        ("data", doc["data"].get("factory", "")),
        ("transform", doc["data"].get("transform", "")),
        ("loss", doc["recipe"].get("loss") or ""),
        ("optimizer", doc["recipe"].get("optimizer") or ""),
    ):
        source = _factory_source(factory.rsplit(":", 1)[0]) if factory else None
        if source is not None:  # an edited factory must not reuse a stale baseline
            parts[f"{key}_source"] = hashlib.sha256(source.read_bytes()).hexdigest()
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


PER_TRIAL = ("memory_mb", "finetune_samples", "eval_samples")


def _factory_source(target: str) -> Path | None:
    """The file a factory lives in: a .py path, or the origin of an importable module."""
    if target.endswith(".py"):
        return Path(target) if Path(target).is_file() else None
    import importlib.util

    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def _baseline_from_cache(
    model: nn.Module,
    space: Space,
    splits: Splits,
    cache_dir: Path,
    log: Callable[[str], None],
    gate: MeasurementGate,
    setup: Setup,
    quality: Quality,
) -> str:
    path = cache_dir / f"baseline-{baseline_key(space)}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a damaged cache entry is retrained, not trusted
            log(
                f"baseline: the cached model {path} cannot be used ({type(exc).__name__}); "
                "training it again"
            )
        else:
            log(f"baseline: reusing the trained model cached in {path}")
            return "cache"
    b = space.baseline
    log(
        f"baseline: training {b.epochs} epochs on {setup.device} (no checkpoint given; "
        "cached afterwards)"
    )
    torch.manual_seed(b.seed)
    for m in model.modules():  # a seeded fresh init, so the cache key fully decides it
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    start = time.perf_counter()
    train(
        model,
        splits.train,
        Recipe(
            b.epochs,
            b.lr,
            b.batch_size,
            b.seed,
            augment=Augment(transform=splits.transform),
            setup=setup,
        ),
        step_guard=gate.computing,
    )
    val = split_quality(model, splits.val, quality)
    seconds, text = time.perf_counter() - start, quality_metric(space.metric).text(val)
    log(f"baseline: val {quality_name(space.metric)} {text} after {seconds:.0f} s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return "trained"


INT8_TOLERANCE = 0.15  # relative logit error of an int8 model; measured 0.008 on the conv study
CHECKED = 64  # validation samples the reload and runtime checks compare logit by logit


def calibrate(
    ctx: StudyContext,
    work: Path,
    reference_ms: float | None = None,
    compared_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Time the baseline in the target runtime, and in each compared runtime (under
    "compared", each on its own scale: `compared_ms`); see Target.calibrate."""
    calibration = ctx.target.calibrate(ctx.baseline, work, reference_ms)
    known = compared_ms or {}
    for runtime, target in ctx.compared.items():
        try:
            calibration.setdefault("compared", {})[runtime] = target.calibrate(
                ctx.baseline, work / runtime, known.get(runtime)
            )
        except StudyError:
            raise
        except Exception as exc:
            raise StudyError(
                f"target.compare: the baseline cannot be measured in {runtime}: "
                f"{type(exc).__name__}: {one_line(str(exc))[:300]}; take it out of "
                "target.compare, or fix what the reason names"
            ) from exc
    return calibration


# --------------------------------------------------------------------------- one trial


class Gauge(Protocol):
    """The study's side of a cost-aware trial (study/fidelity): it judges the plan's
    figures measured before fine-tuning and its partial accuracy at each rung, and
    raises fidelity.Stopped to end the trial there."""

    fidelity: Fidelity

    def measured(self, figures: dict[str, Any]) -> None:
        """Judge the untrained plan's structural figures (see `prescreen`)."""

    def rung(self, index: int, accuracy: float) -> None: ...


def run_trial(
    ctx: StudyContext,
    plan: CompressionPlan,
    out_dir: Path,
    seed: int,
    gauge: Gauge | None = None,
) -> TrialRecord:
    """Compress, write, rebuild from the file, measure. Writes out_dir atomically. With
    a gauge, the plan's structure is measured before fine-tuning and fine-tuning stops
    wherever the gauge says (fidelity.Stopped, with nothing written)."""
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        record = _run(ctx, plan, work, seed, gauge)
        # export hands over these very files, and checks them against these hashes
        files = {p.name: _sha256(p) for p in sorted(work.iterdir()) if p.is_file()}
        record = record.replace(files=files)
        shutil.rmtree(out_dir, ignore_errors=True)
        work.replace(out_dir)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


STAGES = {  # what each stage of a trial's time is made of (bench.timings keys)
    "train": ("distill",),  # fine-tuning, with gradual pruning and QAT inside it
    "compress": ("prune", "qat", "quantize", "write", "reload"),
    "export": ("export",),
    "calibrate": ("calibrate",),  # int8 activation ranges
    "measure": ("evaluate", "measure"),  # accuracy in the runtime, then latency
    "prescreen": ("prescreen",),  # the plan's structure measured before fine-tuning
    "compare": ("compare",),  # deployed, evaluated and timed in each runtime of target.compare
}


def _bench(ctx: StudyContext, seed: int) -> Workbench:
    torch.manual_seed(seed)
    return Workbench(
        copy.deepcopy(ctx.baseline),
        ctx.splits,
        ctx.teacher_logits,
        ctx.classifier,
        seed=seed,
        step_guard=ctx.target.gate.computing,
        setup=ctx.setup,
    )


def _run(
    ctx: StudyContext, plan: CompressionPlan, work: Path, seed: int, gauge: Gauge | None = None
) -> TrialRecord:
    known, spent = None, 0.0
    if gauge is not None and gauge.fidelity.prescreen and plan.finetune.epochs > 0:
        start = time.perf_counter()
        figures = prescreen(ctx, plan, work / "prescreen", seed)
        spent = time.perf_counter() - start
        gauge.measured(figures)  # raises Stopped where the plan cannot pay off
        known = figures["latency"]
    bench = _bench(ctx, seed)
    if spent:
        bench.timings["prescreen"] = spent
    if gauge is not None and gauge.fidelity.rungs:
        bench.step_hooks.append(_rung_hook(ctx, bench, gauge))
    apply_plan(bench, plan)
    checked = ctx.splits.val.head(CHECKED)
    # the checked samples as a batch of their own: the checks compare them to the last bit
    ours = logits_of(bench.model, checked)
    torch_val = split_quality(bench.model, ctx.splits.val, ctx.quality)
    torch_test = split_quality(bench.model, ctx.splits.test, ctx.quality)
    size = bench.timed("write", save_compressed, work / ARTIFACT, bench, plan)
    deployed = bench.timed("reload", load_compressed, work / ARTIFACT, ctx.build_model)
    reloaded = _check_reload(ours, deployed, checked)
    int8 = plan.quant.activations == "int8"
    with ctx.target.gate.computing():  # export and evaluation load the CPU too
        deployment = _deploy(ctx, deployed, work, plan, bench)
        runner, exact = deployment.runner, deployment.int8_weights
        # int8 activations and 16-bit CUDA arithmetic round: compared within that rounding
        rounded = int8 or getattr(runner, "dtype", torch.float32) != torch.float32
        _check_runtime(runner, reloaded, checked, rounded)
        val, test = bench.timed("evaluate", _evaluate, runner, ctx.splits, ctx.quality)
    runtime_file = deployment.file  # none for the torch runtime: it runs the module
    structure = ctx.target.structure(deployment)  # see pooling
    if known is not None and structure is not None and known.get("structure") == structure:
        latency = {**known, "before_training": True}  # the same graph: timed once, untrained
    else:
        latency = bench.timed("measure", settled_latency, ctx, runner, runtime_file, structure)
    latency["structure"] = structure
    layers = _layer_quant(plan, bench, ctx.target.integer_weights(deployment), exact)
    compared = {
        name: bench.timed(
            "compare",
            _measured_in,
            ctx,
            target,
            copy.deepcopy(deployed),  # each runtime's conversion starts from the file's model
            work,
            plan,
            bench,
            (reloaded, torch_val),
        )
        for name, target in ctx.compared.items()
    }
    return TrialRecord(
        plan=plan.to_dict(),
        accuracy=val,
        test_accuracy=test,
        torch_accuracy=torch_val,
        torch_test_accuracy=torch_test,
        deploy_gap=val - torch_val,
        size_bytes=size,
        uncoded_bytes=read_metadata(work / ARTIFACT).get("uncoded_bytes"),
        runtime_file_bytes=_runtime_bytes(ctx, work) if runtime_file else None,
        latency_ms=latency["latency_ms"],
        latency=Latency(**latency),
        runtime=runner.name,
        int_kernels=_int_kernels(layers),
        # False: some layer was re-rounded by the int8 converter, so the runtime model is
        # not the file's model
        exact_weights=all(kind is not None for kind in exact.values()),
        layer_quant=layers,
        params=sum(p.numel() for p in deployed.parameters()),
        macs=_macs(deployed, ctx.splits.train.head(1)),
        nonzero_params=sum(int((p != 0).sum()) for p in deployed.parameters()),
        # what the techniques recorded: per-layer sparsity, channels kept, saliency, ...
        **technique_fields(bench.records),
        timings={k: round(v, 4) for k, v in bench.timings.items()},
        stages={
            stage: round(sum(bench.timings.get(k, 0.0) for k in keys), 4)
            for stage, keys in STAGES.items()
        },
        compared=compared,
    )


def _measured_in(
    ctx: StudyContext,
    target: Target,
    model: nn.Module,
    work: Path,
    plan: CompressionPlan,
    bench: Workbench,
    expected: tuple[torch.Tensor, float],
) -> RuntimeFigures:
    """The compressed file's model in a compared runtime (target.compare), written to
    <work>/<runtime>/: checked against the compressed model's logits and evaluated as in
    the study's runtime, timed against the baseline there. A runtime that cannot take
    the model is recorded with its reason; the trial stands on its own runtime."""
    runtime, (logits, torch_val) = target.backend.name, expected
    folder = work / runtime
    folder.mkdir()
    try:
        with target.gate.computing():
            deployment = _deploy(ctx, model, folder, plan, bench, target)
            _check_runtime(deployment.runner, logits, ctx.splits.val.head(CHECKED), _rounds(plan))
            val, test = _evaluate(deployment.runner, ctx.splits, ctx.quality)
        structure = target.structure(deployment)
        latency = settled_latency(ctx, deployment.runner, deployment.file, structure, target)
        integer_weights = target.integer_weights(deployment)  # an agent's report, maybe
        files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
        file_bytes = sum((folder / n).stat().st_size for n in target.backend.files) or None
    except Exception as exc:  # any runtime's fault: the reason is the record
        shutil.rmtree(folder, ignore_errors=True)
        reason = f"{type(exc).__name__}: {one_line(str(exc))[:300]}"
        return RuntimeFigures(runtime, target.backend.version(), error=reason)
    layers = _layer_quant(plan, bench, integer_weights, deployment.int8_weights)
    return RuntimeFigures(
        runtime,
        target.backend.version(),
        accuracy=val,
        test_accuracy=test,
        deploy_gap=val - torch_val,
        latency_ms=latency["latency_ms"],
        latency=Latency(**{**latency, "structure": structure}),
        runtime_file_bytes=file_bytes,
        int_kernels=_int_kernels(layers),
        exact_weights=all(kind is not None for kind in deployment.int8_weights.values()),
        kernels={name: entry.kernel for name, entry in layers.items()},
        exact_layers={name: entry.exact_weights for name, entry in layers.items()},
        int8_layers={name: entry.int8_weights for name, entry in layers.items()},
        files=files,
    )


def _int_kernels(layers: dict[str, LayerQuant]) -> bool:
    """Every integer-quantized layer ran in an integer kernel (and there is one)."""
    integer = [n for n, e in layers.items() if e.format == "int"]
    return bool(integer) and all(layers[n].kernel == "int8" for n in integer)


def _rounds(plan: CompressionPlan) -> bool:
    """Whether the deployed model rounds (int8 activations): checked within that."""
    return plan.quant.activations == "int8"


def prescreen(ctx: StudyContext, plan: CompressionPlan, work: Path, seed: int) -> dict[str, Any]:
    """The plan's structural figures, before any fine-tuning: the plan applied without
    it (pruned at once, quantized post-training: the same shapes, bit-widths and
    deployed graph), written, deployed and timed with the study's protocol. Returns the
    file's size, the latency figure (with its structure) and the MACs; writes nothing
    that outlives the call."""
    untrained = _untrained(plan)
    bench = _bench(ctx, seed)
    apply_plan(bench, untrained)
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = save_compressed(work / ARTIFACT, bench, untrained)
        deployed = load_compressed(work / ARTIFACT, ctx.build_model)
        with ctx.target.gate.computing():
            deployment = _deploy(ctx, deployed, work, plan, bench)
        structure = ctx.target.structure(deployment)
        latency = settled_latency(ctx, deployment.runner, deployment.file, structure)
        latency["structure"] = structure
        macs = _macs(deployed, ctx.splits.train.head(1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "size_bytes": size,
        "latency_ms": latency["latency_ms"],
        "latency": latency,
        "macs": macs,
        "structure": structure,
    }


def _untrained(plan: CompressionPlan) -> CompressionPlan:
    """The plan with no fine-tuning: QAT becomes PTQ at the same bits and grid, whose
    deployed graph is the same."""
    quant = plan.quant
    if quant.method == "qat":
        quant = replace(quant, method="ptq")
    return plan.replace(finetune=replace(plan.finetune, epochs=0), quant=quant)


def _rung_hook(ctx: StudyContext, bench: Workbench, gauge: Gauge) -> Callable[[int, int], bool]:
    """A fine-tuning step hook: at each rung's step, the partial accuracy on the
    validation samples goes to the gauge, which may stop the trial there."""
    steps: dict[int, int] | None = None

    def hook(step: int, total: int) -> bool:
        nonlocal steps
        if steps is None:
            steps = rung_steps(gauge.fidelity, total)
        if step in steps:
            view = bench.weight_view  # QAT: read through the quantized weights it trains
            quality = partial_quality(bench.model, ctx.splits.val, ctx.quality, view)
            gauge.rung(steps[step], quality)
        return False  # no parameter was replaced

    return hook


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _evaluate(runner: Runner, splits: Splits, quality: Quality) -> tuple[float, float]:
    return runtime_quality(runner, splits.val, quality), runtime_quality(
        runner, splits.test, quality
    )


def _deploy(
    ctx: StudyContext,
    model: nn.Module,
    work: Path,
    plan: CompressionPlan,
    bench: Workbench,
    target: Target | None = None,
) -> Deployment:
    """The model in the target's runtime (`target`: a compared one). Int8: activations
    calibrated on training samples, the plan's own weights."""
    clock = bench.timed if target is None else untimed  # compared: counted under "compare"
    target = target or ctx.target
    cfg = plan.quant
    request = DeployRequest(
        model,
        work,
        cfg,
        calibration=ctx.splits.train.head(cfg.calibration_samples),
        codes=bench.quantized,
        timed=clock,
        int8=target.int8_recipe() if cfg.activations == "int8" else None,
    )
    return target.backend.deploy(request)


def _layer_quant(
    plan: CompressionPlan,
    bench: Workbench,
    integer: set[str],
    int8_weights: dict[str, str | None],
) -> dict[str, LayerQuant]:
    """Per layer: bit-width, number format, grid, and the kernel it really ran in
    (`integer`: the weights the runtime ran in integer kernels, read from its graph;
    `int8_weights`: the type each int8 layer holds the plan's codes in, None if it does
    not hold them)."""
    cfg = plan.quant
    out: dict[str, LayerQuant] = {}
    for name in prunable_layers(bench.model):
        bits, param = cfg.layer(name), f"{name}.weight"
        quantized = param in bench.quantized
        shared = quantized and bench.quantized[param].codebook is not None
        scheme = "symmetric" if is_symmetric(cfg, bits) else "affine"
        out[name] = LayerQuant(
            bits=bits,
            # kmeans: 2^bits shared float values (weight clustering)
            format={32: "float32", 16: cfg.half_type}.get(bits, "kmeans" if shared else "int"),
            # on this target, float32 kernels also run 16-bit and dequantized integer weights
            kernel="int8" if param in integer else "float32",
            granularity=cfg.granularity if quantized else None,
            scheme=None if shared or not quantized else scheme,
            # the int8 model holds the trial's own codes, not re-rounded ones
            exact_weights=None if param not in int8_weights else int8_weights[param] is not None,
            int8_weights=int8_weights.get(param),
        )
    return out


def _runtime_bytes(ctx: StudyContext, work: Path) -> int:
    """Bytes of every file the target's runtime loads (an OpenVINO IR is two)."""
    return sum((work / name).stat().st_size for name in ctx.target.backend.files)


def _macs(model: nn.Module, example: Inputs) -> int:
    """Multiply-accumulates of one sample through the deployed model (dense count: masked
    weights still cost a MAC in a dense kernel)."""
    import torch_pruning as tp

    args, kwargs = as_args(example)  # Torch-Pruning unpacks a bare tensor: pass a tuple
    macs, _ = tp.utils.count_ops_and_params(model, kwargs or args)
    return int(macs)


def confirm(ctx: StudyContext, directory: Path, structure: str | None = None) -> dict[str, Any]:
    """Time a kept trial's deployed model again, against the baseline (end of a search):
    exactly the file the trial measured, where its runtime has one."""
    backend = ctx.target.backend
    with ctx.target.gate.computing():
        runner = backend.reload(directory, ctx.build_model)
    file = directory / backend.file if backend.file else None
    return settled_latency(ctx, runner, file, structure)


def settled_latency(
    ctx: StudyContext,
    runner: Runner,
    file: Path | None,
    structure: str | None = None,
    target: Target | None = None,
) -> dict[str, Any]:
    """The target's latency figure; a timing that never found the machine quiet is taken
    again, QUIET_TRIES times at most (`tries`), unless target.quiet_s is 0 (no time to
    look for a quiet machine is given). On the AVX2 EPYC VM one int8 file timed 12 times
    for 5 s each read 0.292-0.307 of the baseline where quiet, but 0.42 in the one timing
    that never got quiet (a disturbed stretch of more than 5 s): its figure is a draw
    from the other state, so it is not kept while another try can do better."""
    tries, target = 0, target or ctx.target
    while True:
        figure, tries = target.latency(runner, file, structure), tries + 1
        settled = figure["quiet"] is not False or ctx.space.target.quiet_s == 0
        if settled or tries == QUIET_TRIES:
            return {**figure, "tries": tries}


QUIET_TRIES = 3


def _check_reload(expected: torch.Tensor, deployed: nn.Module, x: Inputs) -> torch.Tensor:
    """The file must give back the very model that was compressed (`expected`: that
    model's logits on `x`). Returns the reloaded model's logits."""
    got = logits_of(deployed, x)
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
        raise TrialError(
            f"the compressed file does not reproduce the model: max logit "
            f"difference {float((expected - got).abs().max()):.3g}"
        )
    return got


def _check_runtime(runner: Runner, expected: torch.Tensor, x: Inputs, rounded: bool) -> None:
    """The runtime model must compute what the compressed model computes (`expected`: its
    logits on `x`): to float rounding, or, with int8 activations, to within their
    rounding (a broken conversion is off by the size of the logits themselves)."""
    ours = expected.numpy()
    theirs = runner(numpy(x))
    if rounded:
        error = float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(ours), 1e-12))
        if error > INT8_TOLERANCE:
            raise TrialError(
                f"the {runner.name} model (int8 or 16-bit arithmetic) disagrees with the "
                f"compressed model: relative logit error {error:.3g} (at most "
                f"{INT8_TOLERANCE} expected); try target.int8_recipe: u8u8 (int8 kernels "
                "that never saturate), fewer weight bits, or activations: float"
            )
        return
    if not np.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
        raise TrialError(
            f"the {runner.name} model disagrees with the compressed model: max "
            f"logit difference {float(np.abs(ours - theirs).max()):.3g}"
        )
