"""Quantization: weight bit-widths (2-8 integer, 16-bit float, mixed per layer), their
grid, int8 activations, and post-training or quantization-aware. Applied by
``compress/techniques/quantize`` and ``qat``; deployed in int8 kernels by the runtime
backend (``measure/``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paretoopt.config.knobs import Choice, Fixed, Knob, knob_values, setting, suggest
from paretoopt.config.parts import Drawing, Part, group_parameters, register, require

if TYPE_CHECKING:
    from paretoopt.config.space import Space

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
GRANULARITIES = ("per_channel", "per_tensor")
SCHEMES = ("affine", "symmetric")
ACTIVATIONS = ("float", "int8")
QUANT_METHODS = ("ptq", "qat", "gptq")
HALF_TYPES = ("float16", "bfloat16")
QUANT_DISTRIBUTIONS = ("uniform", "per_layer")
GRIDS = ("uniform", "kmeans")
INT8_RUNTIMES = ("onnxruntime", "openvino", "executorch")  # runtimes with int8 kernels here


@dataclass(frozen=True)
class QuantizationSpace:
    bits: Knob = setting(
        Choice((2, 3, 4, 6, 8, 16, 32)),
        "weight bit-width: 2-8 integer, 16 float16 or bfloat16 (half_type), 32 unquantized",
        kind=int,
        options=SUPPORTED_BITS,
        knob=True,
    )
    grid: Knob = setting(
        Fixed("uniform"),
        "uniform (min-max integer codes and a scale) or kmeans (weight sharing: 2^bits "
        "shared values per layer or channel found by k-means, fine-tuned as shared values "
        "under qat; float activations only)",
        kind=str,
        options=GRIDS,
        knob=True,
    )
    granularity: Knob = setting(
        Fixed("per_channel"),
        "one scale (or codebook, on the kmeans grid) per output channel or per tensor",
        kind=str,
        options=GRANULARITIES,
        knob=True,
    )
    scheme: Knob = setting(
        Fixed("affine"),
        "affine min-max (with zero point) or symmetric; 8-bit weights with int8 "
        "activations are always symmetric (int8 kernels take no weight zero point)",
        kind=str,
        options=SCHEMES,
        knob=True,
    )
    half_type: Knob = setting(
        Fixed("float16"),
        "the 16-bit format: float16 or bfloat16",
        kind=str,
        options=HALF_TYPES,
        knob=True,
    )
    activations: Knob = setting(
        Fixed("float"),
        "float, or int8 (static: scales calibrated on training samples; the model runs in "
        "ONNX Runtime's int8 kernels)",
        kind=str,
        options=ACTIVATIONS,
        knob=True,
    )
    method: Knob = setting(
        Fixed("ptq"),
        "ptq (round to nearest after fine-tuning), qat (fake-quantized weights with a "
        "straight-through gradient during fine-tuning) or gptq (after fine-tuning, each "
        "column's rounding error compensated in the others from calibration inputs, as "
        "Optimal Brain Surgeon does)",
        kind=str,
        options=QUANT_METHODS,
        knob=True,
    )
    distribution: Knob = setting(
        Fixed("uniform"),
        "uniform (one bit-width for every layer) or per_layer (mixed precision: a searched "
        "bit-width per layer group, drawn from bits)",
        kind=str,
        options=QUANT_DISTRIBUTIONS,
        knob=True,
    )
    layer_groups: int = setting(
        8,
        "most per-layer bit-widths: more layers than this are split into this many groups "
        "of consecutive layers, one bit-width each",
        kind=int,
        low=1,
        high=1024,
    )
    calibration_samples: int = setting(
        256,
        "training samples that calibrate int8 activation scales (and GPTQ's input statistics)",
        kind=int,
        low=1,
        high=1_000_000,
    )


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 32  # every layer's bit-width, unless layer_bits names the layer
    granularity: str = "per_channel"
    scheme: str = "affine"
    half_type: str = "float16"  # the format of 16-bit weights
    activations: str = "float"  # or "int8": static, calibrated, run in int8 kernels
    method: str = "ptq"  # "qat": fake-quantized weights in fine-tuning; "gptq": OBS rounding
    # mixed precision: layer name -> bit-width; out of the hash so a plan stays hashable
    layer_bits: Mapping[str, int] = field(default_factory=dict, hash=False)
    calibration_samples: int = 256
    grid: str = "uniform"  # or "kmeans": shared values (weight clustering)

    def __post_init__(self) -> None:
        for where, bits in [("bits", self.bits)] + [
            (f"layer_bits[{n!r}]", b) for n, b in self.layer_bits.items()
        ]:
            require(
                bits in SUPPORTED_BITS,
                f"quant.{where}: {bits} is not supported; "
                f"choose from {', '.join(map(str, SUPPORTED_BITS))}",
            )
        for name, value, options in (
            ("granularity", self.granularity, GRANULARITIES),
            ("scheme", self.scheme, SCHEMES),
            ("half_type", self.half_type, HALF_TYPES),
            ("activations", self.activations, ACTIVATIONS),
            ("method", self.method, QUANT_METHODS),
            ("grid", self.grid, GRIDS),
        ):
            require(
                value in options,
                f"quant.{name}: {value!r} is not supported; choose from {', '.join(options)}",
            )
        require(
            isinstance(self.calibration_samples, int) and self.calibration_samples >= 1,
            f"quant.calibration_samples: must be >= 1, got {self.calibration_samples}",
        )
        require(
            self.grid == "uniform" or self.method != "gptq",
            "quant.method: 'gptq' rounds to a uniform grid; kmeans shares values of its own, "
            "so it needs method ptq or qat",
        )
        require(
            self.grid == "uniform" or self.activations == "float",
            "quant.grid: 'kmeans' shares float values, which no int8 kernel takes; it needs "
            f"activations 'float', but got {self.activations!r}",
        )
        for name, value in (
            ("activations", self.activations),
            ("method", self.method),
            ("grid", self.grid),
        ):
            require(
                value in ("float", "ptq", "uniform") or self.integer,
                f"quant.{name}: {value!r} needs integer weights (2-8 bits), "
                f"but every layer has {sorted(self.widths)} bits",
            )

    def layer(self, name: str) -> int:
        """The bit-width of one layer; a factor of a factorized layer (``fc1.0`` of
        ``fc1``) takes its layer's."""
        while name not in self.layer_bits and "." in name:
            name = name.rpartition(".")[0]
        return self.layer_bits.get(name, self.bits)

    @property
    def widths(self) -> set[int]:
        """Every bit-width the plan uses."""
        # `bits` counts too: it is the width of every layer that layer_bits does not name
        return set(self.layer_bits.values()) | {self.bits}

    @property
    def integer(self) -> bool:
        """Some layer is on an integer grid (2-8 bits)."""
        return min(self.widths) <= 8

    @property
    def active(self) -> bool:
        return min(self.widths) < 32

    def describe(self) -> str:
        """e.g. "fp32", "bf16", "int4 per-tensor sym", "int2-8 mixed int8-act qat"."""
        widths = sorted(self.widths)
        names = {32: "fp32", 16: "bf16" if self.half_type == "bfloat16" else "fp16"}
        if len(widths) > 1 and widths[0] > 8:
            text = "fp16/fp32 mixed"
        elif len(widths) > 1:
            text = f"int{widths[0]}-{widths[-1]} mixed"
        else:
            text = names.get(widths[0], f"int{widths[0]}")
        if self.integer and self.grid == "kmeans":  # "kmeans16": 16 shared values
            text = text.replace("int", "kmeans", 1)
            text = re.sub(r"kmeans(\d+)", lambda m: f"kmeans{2 ** int(m.group(1))}", text)
            text += " per-tensor" if self.granularity != "per_channel" else ""
        elif self.integer:
            text += " per-tensor" if self.granularity != "per_channel" else ""
            text += " sym" if self.scheme != "affine" else ""
            text += " int8-act" if self.activations == "int8" else ""
            text += f" {self.method}" if self.method != "ptq" else ""
        return text


def draw(d: Drawing) -> QuantConfig:
    trial, layer_names, epochs = d.trial, d.quant_layers, d.epochs
    q = d.section("quant")
    distribution = str(suggest(trial, "quant.distribution", q.distribution))
    layer_bits: dict[str, int] = {}
    if distribution == "per_layer" and layer_names:  # mixed precision, HAQ-style
        for name, group in group_parameters(layer_names, q.layer_groups, "quant.bits"):
            layer_bits.update(dict.fromkeys(group, int(suggest(trial, name, q.bits))))
        bits = max(layer_bits.values())
    else:
        bits = int(suggest(trial, "quant.bits", q.bits))
    widths = set(layer_bits.values()) or {bits}
    fixed = {"layer_bits": layer_bits, "calibration_samples": q.calibration_samples}
    half = str(suggest(trial, "quant.half_type", q.half_type)) if 16 in widths else "float16"
    if min(widths) > 8:  # no integer grid: granularity, scheme, activations cannot matter
        return QuantConfig(bits, half_type=half, **fixed)
    grid = str(suggest(trial, "quant.grid", q.grid))
    if grid == "kmeans":  # shared float values: no scheme, no int8 kernels
        return QuantConfig(
            bits,
            granularity=str(suggest(trial, "quant.granularity", q.granularity)),
            half_type=half,
            method=_method(trial, q, epochs, kmeans=True),
            grid=grid,
            **fixed,
        )
    activations = str(suggest(trial, "quant.activations", q.activations))
    only_8 = {w for w in widths if w <= 8} == {8}
    return QuantConfig(
        bits,
        granularity=str(suggest(trial, "quant.granularity", q.granularity)),
        # 8-bit weights with int8 activations are always symmetric: nothing to choose
        scheme="symmetric"
        if activations == "int8" and only_8
        else str(suggest(trial, "quant.scheme", q.scheme)),
        half_type=half,
        activations=activations,
        method=_method(trial, q, epochs),
        **fixed,
    )


def _method(trial: Any, q: QuantizationSpace, epochs: int, kmeans: bool = False) -> str:
    """The method drawn for a plan: qat only with fine-tuning to train through, gptq only
    on a uniform grid (each falls back to ptq, round to nearest, where it cannot apply)."""
    options = set(knob_values(q.method))
    if not epochs and not (options & {"gptq"} and not kmeans):
        return "ptq"  # nothing to draw: without fine-tuning, qat is ptq
    method = str(suggest(trial, "quant.method", q.method))
    if (method == "qat" and not epochs) or (method == "gptq" and kmeans):
        return "ptq"
    return method


def check(space: Space) -> list[str]:
    """Choices that could never take effect: an error, not a silent no-op."""
    q = space.space.quantization
    bits, epochs = set(knob_values(q.bits)), knob_values(space.space.finetune.epochs)
    at, runtime = "space.quantization", space.target.runtime
    rules = [
        (
            "int8" in knob_values(q.activations) and runtime not in INT8_RUNTIMES,
            f"{at}.activations: int8 needs a runtime with int8 kernels "
            f"({', '.join(INT8_RUNTIMES)}), but target.runtime is {runtime!r}",
        ),
        (
            "int8" in knob_values(q.activations) and not bits & set(range(2, 9)),
            f"{at}.activations: int8 needs integer weights, but bits allows only "
            f"{sorted(bits)}; add a width of 2-8",
        ),
        (
            "qat" in knob_values(q.method) and set(epochs) == {0},
            f"{at}.method: qat trains through the quantizer, but finetune.epochs is always 0",
        ),
        (
            "kmeans" in knob_values(q.grid) and knob_values(q.activations) == ("int8",),
            f"{at}.grid: kmeans shares float values, which no int8 kernel takes, but "
            "activations is always int8; add float to activations",
        ),
        (
            "gptq" in knob_values(q.method) and knob_values(q.grid) == ("kmeans",),
            f"{at}.method: gptq rounds to the uniform grid, but grid is always kmeans; add "
            "uniform to grid",
        ),
        (
            "kmeans" in knob_values(q.grid) and not bits & set(range(2, 9)),
            f"{at}.grid: kmeans shares 2^bits values, but bits allows only {sorted(bits)}; "
            "add a width of 2-8",
        ),
        (
            not isinstance(q.half_type, Fixed) and 16 not in bits,
            f"{at}.half_type: searched, but bits never takes 16 ({sorted(bits)})",
        ),
        (
            "per_layer" in knob_values(q.distribution) and isinstance(q.bits, Fixed),
            f"{at}.distribution: per_layer draws each layer's width from bits, but bits is "
            f"fixed at {sorted(bits)[0] if bits else q.bits}; give bits a list or a range",
        ),
    ]
    return [message for broken, message in rules if broken]


def check_plan(plan: Mapping[str, Any]) -> str | None:
    if plan["quant"].method == "qat" and plan["finetune"].epochs == 0:
        return (
            "quant.method: 'qat' trains with fake-quantized weights, so it needs "
            "finetune.epochs > 0, but got 0"
        )
    return None


PART = register(
    Part(
        name="quant",
        section="quantization",
        doc="quantization knobs",
        settings=QuantizationSpace,
        config=QuantConfig,
        draw=draw,
        draw_order=2,
        changes_model=lambda cfg: cfg.active,
        describe=lambda plan: plan["quant"].describe(),
        check=check,
        check_plan=check_plan,
        prefer={
            "quant.distribution": ("uniform",),
            "quant.granularity": ("per_channel",),
            "quant.scheme": ("symmetric",),
            "quant.method": ("qat",),  # only asked with fine-tuning
            "quant.grid": ("uniform",),
        },
        prefer_dense={"quant.activations": ("int8",)},
        prefer_sparse={"quant.activations": ("float",)},
        stronger={"quant.bits": "down"},  # per-layer widths too: quant.bits.layer...
    )
)
