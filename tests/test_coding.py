"""Lossless coding of the compressed file: smaller, decoded bit-exactly, never inflated."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from paretoopt.compress.artifact import (
    LZMA_FILTERS,
    decode_state_dict,
    load_compressed,
    read_metadata,
    save_compressed,
)
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.coding import CodingConfig
from paretoopt.config.parts.prune import PruneConfig
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec
from paretoopt.errors import ArtifactError, PlanError
from paretoopt.workload.data import create_data
from paretoopt.workload.models import conv

PLAN = CompressionPlan(PruneConfig("unstructured", 0.7), QuantConfig(4))


def model() -> torch.nn.Module:
    """The shipped CNN (225k weights): the tiny one's arrays are too small to code."""
    return conv(1, 10, image_size=8)


CODED = PLAN.replace(coding=CodingConfig("lzma"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same compressed model written uncoded and coded."""
    splits = create_data(ComponentSpec(name="digits", kwargs={"size": 8}))
    torch.manual_seed(0)
    net = model().eval()
    bench = Workbench(
        net, splits, logits_of(net, splits.train.x), find_classifier(net, splits.train.x[:1])
    )
    apply_plan(bench, CODED)  # coding changes the file, not the model: one bench serves both
    root = tmp_path_factory.mktemp("coding")
    sizes = {
        name: save_compressed(root / f"{name}.safetensors", bench, plan)
        for name, plan in (("plain", PLAN), ("coded", CODED))
    }
    return root, sizes, splits


def test_the_coded_file_is_smaller_and_names_its_uncoded_size(files):
    root, sizes, _ = files
    assert sizes["coded"] < sizes["plain"]
    meta = read_metadata(root / "coded.safetensors")
    assert "uncoded_bytes" not in read_metadata(root / "plain.safetensors")
    # the uncoded file of the coded plan is the plain one, but for the metadata entry
    # naming its own size and the header's padding to 8 bytes
    assert abs(meta["uncoded_bytes"] - sizes["plain"]) <= 40
    assert sizes["coded"] < 0.9 * sizes["plain"]
    assert any("coded" in entry for entry in meta["layout"].values())


def test_the_coded_file_decodes_bit_exactly(files):
    root, _, splits = files
    plain = decode_state_dict(root / "plain.safetensors")
    coded = decode_state_dict(root / "coded.safetensors")
    assert plain.keys() == coded.keys()
    assert all(torch.equal(plain[k], coded[k]) for k in plain)
    x = splits.val.x[:32]
    a = load_compressed(root / "plain.safetensors", model)
    b = load_compressed(root / "coded.safetensors", model)
    assert torch.equal(logits_of(a, x), logits_of(b, x))


def _tamper(src, dst, change):
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in read_metadata(src).items()}
    layout = json.loads(meta["layout"])
    arrays = load_file(str(src))
    change(layout, arrays)
    meta["layout"] = json.dumps(layout)
    save_file(arrays, str(dst), metadata=meta)


def _coded_array(layout):
    """A coded array of a weight (whose entry names the tensor's shape)."""
    key, entry = next((k, e) for k, e in layout.items() if "coded" in e and "shape" in e)
    part = next(iter(entry["coded"]))
    return key, part, (key if part == "raw" else f"{key}::{part}")


def test_a_stream_longer_than_its_shape_is_refused_without_inflating(files, tmp_path):
    root, _, _ = files

    def bomb(layout, arrays):
        key, part, name = _coded_array(layout)
        layout[key]["coded"][part] = ["|u1", [16]]  # claims 16 bytes ...
        zeros = bytes(64 << 20)  # ... of a stream that decodes to 64 MiB
        arrays[name] = np.frombuffer(
            lzma.compress(zeros, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS), dtype=np.uint8
        )

    _tamper(root / "coded.safetensors", tmp_path / "bomb.safetensors", bomb)
    with pytest.raises(ArtifactError, match="does not decode to shape"):
        decode_state_dict(tmp_path / "bomb.safetensors")


@pytest.mark.parametrize(
    "coded, rule",
    [
        (["|O", [4]], "not an array type"),
        (["|u1", [-1]], "not an array type"),
        (["<f4", [1 << 30]], "over the limit"),
        (["<f4", [1 << 40]], "not an array type"),
    ],
)
def test_a_coded_entry_that_is_not_an_array_is_refused(files, tmp_path, coded, rule):
    root, _, _ = files

    def change(layout, arrays):
        key, part, _ = _coded_array(layout)
        layout[key]["coded"][part] = coded

    _tamper(root / "coded.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(ArtifactError, match=rule):
        decode_state_dict(tmp_path / "bad.safetensors")


def test_a_damaged_stream_is_refused(files, tmp_path):
    root, _, _ = files

    def change(layout, arrays):
        _, _, name = _coded_array(layout)
        arrays[name] = np.frombuffer(b"\xff" * 64, dtype=np.uint8)

    _tamper(root / "coded.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(ArtifactError, match="damaged tensor data"):
        decode_state_dict(tmp_path / "bad.safetensors")


def test_the_plan_names_its_coding():
    assert "lzma" in CODED.summary() and CODED.to_dict()["coding"] == {"method": "lzma"}
    assert CompressionPlan(coding=CodingConfig("lzma")).is_identity  # the model is untouched
    with pytest.raises(PlanError, match="coding.method: 'zip' is not supported; choose from"):
        CodingConfig("zip")


def test_codes_coded_one_per_byte_are_packed_again_exactly(files, tmp_path):
    root, _, _ = files
    layout = read_metadata(root / "coded.safetensors")["layout"]
    forms = [spec for e in layout.values() for spec in e.get("coded", {}).values()]
    assert any(spec[2:] == ["bytes"] for spec in forms), forms  # the codes' own frequencies

    def overflow(layout, arrays):
        key, entry = next((k, e) for k, e in layout.items() if "codes" in e.get("coded", {}))
        dtype, shape, *_ = entry["coded"]["codes"]
        entry["coded"]["codes"] = ["|u1", shape, "bytes"]
        codes = np.full(shape, 255, dtype=np.uint8)  # beyond 4 bits
        arrays[f"{key}::codes"] = np.frombuffer(
            lzma.compress(codes.tobytes(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS),
            dtype=np.uint8,
        )

    _tamper(root / "coded.safetensors", tmp_path / "bad.safetensors", overflow)
    with pytest.raises(ArtifactError, match="do not fit 4 bits"):
        decode_state_dict(tmp_path / "bad.safetensors")
