"""The CPU's instruction set, as far as int8 kernels care, and the int8 recipe it calls for.

ONNX Runtime's x86 int8 kernels (MLAS) multiply u8 activations by s8 weights ("u8s8").
With VNNI (AVX512-VNNI, AVX-VNNI) or AMX the products go straight into int32. Without it
(AVX2, AVX-512 without VNNI) the kernels use ``vpmaddubsw``, which adds two u8 x s8
products into a saturating int16: 2 x 255 x 127 does not fit, so a layer whose weight
codes exceed +-64 loses accuracy to clipping that no PyTorch twin shows (measured here on
an AVX2-only EPYC: the digits CNN with 8-bit channel-wise weights lost 1.1 points in the
runtime, and none at 7 bits). Weights stored as u8 around a zero point of 128 ("u8u8")
take kernels that widen to 16 bits first and never saturate; they hold the same codes,
so the deployed model stays the trial's model, but they run slower than u8s8.

So the recipe is chosen per layer: u8s8 where it is exact on this CPU, u8u8 where it
would saturate. ``target.int8_recipe`` forces one or the other.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from paretoopt.config.space import INT8_RECIPES

# the flags (as /proc/cpuinfo names them) that decide which int8 kernels a CPU runs
FLAGS = ("sse4_1", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
DOT_PRODUCT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # int32 accumulation
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
RECIPES = INT8_RECIPES
SATURATION_FREE = 64  # |code| at most this: two u8 x s8 products fit int16 (255 x 128)


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str] | None:
    """The int8-relevant flags of this CPU, in FLAGS order; None where the system does
    not list them (no /proc/cpuinfo: macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in FLAGS if f in present]
    return None


def int8_dot(isa: list[str] | None, machine: str) -> str:
    """How this CPU multiplies int8: "amx", "vnni", "avx512", "avx2", "sse", or "other"
    (not x86), or "unknown" (flags not readable)."""
    if machine.lower() not in X86:
        return "other"
    if isa is None:
        return "unknown"
    for flag, name in (
        ("amx_int8", "amx"),
        ("avx512_vnni", "vnni"),
        ("avx_vnni", "vnni"),
        ("avx512bw", "avx512"),
        ("avx2", "avx2"),
    ):
        if flag in isa:
            return name
    return "sse"


def this_machine() -> tuple[list[str] | None, str]:
    return cpu_isa(), platform.machine()


@dataclass(frozen=True)
class Int8Recipe:
    """Which weight type each int8 layer is stored in, on the CPU that will run it."""

    name: str  # as target.int8_recipe names it: auto, u8s8, u8u8
    saturates: bool  # u8s8 kernels on this CPU clip codes beyond +-SATURATION_FREE

    @classmethod
    def choose(cls, name: str, isa: list[str] | None, machine: str) -> Int8Recipe:
        """`isa`, `machine`: the CPU that times the model (an agent's, for a remote target).
        Unknown flags on x86 count as saturating: u8u8 is exact everywhere."""
        dot = int8_dot(isa, machine)
        return cls(name, dot not in {"amx", "vnni", "other"})

    def weight_type(self, max_code: int) -> str:
        """ "s8" or "u8" for a layer whose codes reach +-`max_code`."""
        if self.name == "u8u8":
            return "u8"
        if self.name == "u8s8":
            return "s8"
        return "u8" if self.saturates and max_code > SATURATION_FREE else "s8"
