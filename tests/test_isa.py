"""The CPU's int8 instruction set and the weight types it calls for (both branches, on
any machine: flags are given, not read)."""

from __future__ import annotations

import pytest

from paretoopt.measure.isa import SATURATION_FREE, Int8Recipe, cpu_isa, int8_dot
from paretoopt.results.frames import hardware_text

AVX2 = ["sse4_1", "avx2"]
SKYLAKE = ["sse4_1", "avx2", "avx512f", "avx512bw"]
CASCADE = [*SKYLAKE, "avx512_vnni"]


def test_cpu_isa_reads_the_int8_flags_in_a_fixed_order(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\n"
        "flags\t\t: fpu avx512_vnni sse4_1 avx2 avx512f amx_int8 fma\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_isa(info) == ["sse4_1", "avx2", "avx512f", "avx512_vnni", "amx_int8"]
    assert cpu_isa(tmp_path / "missing") is None
    (tmp_path / "flagless").write_text("processor\t: 0\n")
    assert cpu_isa(tmp_path / "flagless") is None


@pytest.mark.parametrize(
    ("isa", "machine", "dot"),
    [
        (AVX2, "x86_64", "avx2"),
        (SKYLAKE, "x86_64", "avx512"),
        (CASCADE, "x86_64", "vnni"),
        (["avx2", "avx_vnni"], "x86_64", "vnni"),  # AVX-VNNI (Alder Lake, Zen 5)
        ([*CASCADE, "amx_int8"], "x86_64", "amx"),
        (["sse4_1"], "AMD64", "sse"),
        (None, "x86_64", "unknown"),
        (None, "aarch64", "other"),
    ],
)
def test_int8_dot_names_how_the_cpu_multiplies_int8(isa, machine, dot):
    assert int8_dot(isa, machine) == dot


@pytest.mark.parametrize(
    ("isa", "machine", "saturates"),
    [
        (AVX2, "x86_64", True),
        (SKYLAKE, "x86_64", True),  # AVX-512 without VNNI adds pairs in int16 too
        (CASCADE, "x86_64", False),
        (None, "x86_64", True),  # unknown: the recipe that is exact everywhere
        (None, "aarch64", False),
    ],
)
def test_auto_stores_u8_only_where_s8_kernels_would_saturate(isa, machine, saturates):
    recipe = Int8Recipe.choose("auto", isa, machine)
    assert recipe.saturates is saturates
    assert recipe.weight_type(SATURATION_FREE) == "s8"  # 7-bit codes are always safe
    assert recipe.weight_type(127) == ("u8" if saturates else "s8")


@pytest.mark.parametrize("name", ["u8s8", "u8u8"])
def test_a_forced_recipe_ignores_the_cpu(name):
    for isa in (AVX2, CASCADE):
        recipe = Int8Recipe.choose(name, isa, "x86_64")
        assert {recipe.weight_type(c) for c in (1, 64, 127)} == {name[-2:]}


def test_the_machine_line_names_the_int8_instruction_set():
    hardware = {"cpu": "AMD EPYC", "cores": 2, "int8_dot": "avx2"}
    assert hardware_text(hardware) == "AMD EPYC (2 cores, int8 on AVX2)"
    assert hardware_text({**hardware, "int8_dot": "vnni"}) == "AMD EPYC (2 cores, int8 on VNNI)"
    assert hardware_text({"cpu": "old study"}) == "old study (? cores, int8 on ?)"
