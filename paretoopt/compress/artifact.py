"""The compressed model file (``model.safetensors``): what the size objective counts.

One safetensors file holds every tensor of the compressed model in its smallest honest
form, plus JSON metadata (format version, plan, input shape, and what each technique
that changes the architecture keeps to replay it: the channel-pruning history):

* integer-quantized weights (2-8 bits): codes bit-packed MSB-first, a float32 scale and a
  uint8 zero point per channel (or per tensor); on the k-means grid (weight sharing), a
  float32 codebook of 2^bits shared values per channel (or per tensor) in place of the
  scale;
* 16-bit weights as float16, or as bfloat16 (the top half of each float32, kept as
  uint16 since numpy has no bfloat16); everything else (biases, BatchNorm) as stored;
* a weight whose pruning mask pays for itself (n + nnz*b < n*b bits) is stored as a packed
  1-bit mask followed by the kept values only;
* with lossless coding (``coding.method: lzma``), every stored array that LZMA makes
  smaller is kept coded, its type and shape in the layout; the metadata also names the
  bytes the file would hold uncoded (``uncoded_bytes``).

``load_compressed`` rebuilds the model from a fresh copy of the user's architecture: it
replays each technique's architecture change (``techniques.Rebuild``: the channel
removal), then loads the decoded weights. A trial measures the model
decoded from this file, so the file and the measured model cannot disagree.
"""

from __future__ import annotations

import json
import lzma
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save, save_file
from torch import nn

from paretoopt.compress.techniques import rebuilds
from paretoopt.compress.techniques.bench import Workbench, prunable_layers
from paretoopt.compress.techniques.qtensor import QTensor, dequantize, lookup
from paretoopt.config.plan import CompressionPlan
from paretoopt.errors import ArtifactError, shown
from paretoopt.workload import inputs as trees

FORMAT = "paretoopt-compressed"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- bit packing


ARTIFACT = "model.safetensors"  # the compressed file: the size objective counts its bytes


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the low `bits` bits of each code, most significant first, into bytes."""
    codes = codes.astype(np.uint16).ravel()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    return np.packbits(((codes[:, None] >> shifts) & 1).astype(np.uint8).ravel())


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    flat = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.uint16)
    return (flat << np.arange(bits - 1, -1, -1, dtype=np.uint16)).sum(axis=1).astype(np.int64)


# --------------------------------------------------------------------------- writing


def save_compressed(path: Path, bench: Workbench, plan: CompressionPlan) -> int:
    """Write the compressed model atomically; return its size in bytes."""
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict[str, Any]] = {}
    weights = {f"{n}.weight" for n in prunable_layers(bench.model)}
    for key, value in bench.model.state_dict().items():
        if key in bench.quantized:
            layout[key] = _put_codes(tensors, key, bench.quantized[key])
        elif key in bench.halved:
            layout[key] = _put_float(tensors, key, value, bench.halved[key])
        elif key in weights:
            layout[key] = _put_float(tensors, key, value, "float32")
        else:
            tensors[key] = value.detach().cpu().numpy()
            layout[key] = {"encoding": "raw"}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "plan": json.dumps(plan.to_dict()),
        "inputs": json.dumps(trees.describe(bench.example)),
        "layout": json.dumps(layout, separators=(",", ":")),
    }
    for rebuild in rebuilds():
        if rebuild.key in meta:  # a technique's entry must not overwrite the file's own
            raise ValueError(f"artifact: rebuild key {rebuild.key!r} is taken")
        meta[rebuild.key] = json.dumps(rebuild.store(bench))
    if plan.coding.active:
        uncoded = len(save(tensors, metadata=meta))
        if _code(tensors, layout):  # a file nothing could be coded in stays as it was
            meta["uncoded_bytes"] = json.dumps(uncoded)
            meta["layout"] = json.dumps(layout, separators=(",", ":"))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # a reader never sees half a file
    return path.stat().st_size


def _mask_pays(values: np.ndarray, bits: int) -> bool:
    n, nnz = values.size, int(np.count_nonzero(values))
    return n + nnz * bits < n * bits


def _put_codes(out: dict[str, np.ndarray], key: str, q: QTensor) -> dict[str, Any]:
    codes = q.codes.numpy()
    zp = q.zero_point.numpy()
    shape = list(codes.shape)
    # a pruned weight's code equals its channel's zero point; a mask can drop it
    zero_codes = np.broadcast_to(zp.reshape((-1,) + (1,) * (codes.ndim - 1)), codes.shape)
    nonzero = codes != zero_codes
    entry: dict[str, Any] = {"encoding": "int", "bits": q.bits, "shape": shape}
    if _mask_pays(nonzero.astype(np.uint8), q.bits):
        out[f"{key}::mask"] = np.packbits(nonzero.ravel())
        codes = codes[nonzero]
        entry["masked"] = True
    out[f"{key}::codes"] = pack_bits(codes, q.bits)
    if q.codebook is not None:  # shared values (k-means) in place of a scale
        entry["grid"] = "kmeans"
        out[f"{key}::codebook"] = q.codebook.numpy().astype(np.float32)
    else:
        out[f"{key}::scale"] = q.scale.numpy().astype(np.float32)
    out[f"{key}::zero_point"] = zp.astype(np.uint8)
    return entry


def _put_float(
    out: dict[str, np.ndarray], key: str, value: torch.Tensor, dtype: str
) -> dict[str, Any]:
    array = value.detach().cpu().float().numpy()
    if dtype == "bfloat16":  # exact: the quantize technique already rounded to bfloat16
        array = (array.view(np.uint32) >> 16).astype(np.uint16)
    else:
        array = array.astype(dtype)
    entry: dict[str, Any] = {"encoding": "float", "shape": list(array.shape), "dtype": dtype}
    bits = array.dtype.itemsize * 8
    if _mask_pays(array, bits):
        nonzero = array != 0
        out[f"{key}::mask"] = np.packbits(nonzero.ravel())
        array = array[nonzero]
        entry["masked"] = True
    out[f"{key}::values"] = np.ascontiguousarray(array)
    return entry


# --------------------------------------------------------------------------- lossless coding


# raw LZMA2 streams: the .xz container would add about 60 bytes to every array
# preset 6: an 8 MiB dictionary (about 100 MB to code) is larger than a layer's codes
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
CODED_ENTRY_BYTES = 48  # what an array's entry in the layout costs: coding must beat it
CODED_DTYPES = ("|u1", "|i1", "<u2", "<i2", "<f2", "<f4", "<i4", "<u4", "<i8", "<f8")
MAX_DECODED_BYTES = 1 << 34  # 16 GiB: no layer of a model this tool compresses is larger
MAX_RAW_BYTES = 1 << 32  # a raw tensor (bias, norm, buffer) names no shape to check


def _code(tensors: dict[str, np.ndarray], layout: dict[str, dict[str, Any]]) -> int:
    """Replace each stored array by its LZMA coding where that is smaller, entry and all;
    return how many were. Packed codes are also tried one per byte: LZMA's byte-wise
    model then sees the codes' own frequencies (Deep Compression's Huffman stage), which
    bit-packing across byte boundaries hides."""
    counts = {k: _code_count(tensors, k, e) for k, e in layout.items() if e["encoding"] == "int"}
    coded = 0
    for name in list(tensors):
        key, _, part = name.partition("::")
        array = np.ascontiguousarray(tensors[name])
        if array.dtype.str not in CODED_DTYPES:
            continue
        forms = [(array.tobytes(), [array.dtype.str, list(array.shape)])]
        if part == "codes" and key in counts and layout[key]["bits"] < 8:
            codes = unpack_bits(array, layout[key]["bits"], counts[key]).astype(np.uint8)
            forms.append((codes.tobytes(), ["|u1", [len(codes)], "bytes"]))
        streams = [(_lzma(raw), how) for raw, how in forms]
        stream, how = min(streams, key=lambda s: len(s[0]))
        if len(stream) + CODED_ENTRY_BYTES >= array.nbytes:
            continue
        tensors[name] = np.frombuffer(stream, dtype=np.uint8)
        layout[key].setdefault("coded", {})[part or "raw"] = how
        coded += 1
    return coded


def _lzma(raw: bytes) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def _code_count(tensors: dict[str, np.ndarray], key: str, entry: dict[str, Any]) -> int:
    """How many codes an integer weight stores: its kept weights where it is masked."""
    n = int(np.prod(entry["shape"]))
    if not entry.get("masked"):
        return n
    return int(np.unpackbits(tensors[f"{key}::mask"])[:n].sum())


def _decoded(arrays: dict[str, np.ndarray], key: str, entry: dict[str, Any]) -> int:
    """Decode a tensor's coded arrays in place and return their bytes; at most the bytes
    their shapes name are ever produced (a crafted stream cannot inflate past them)."""
    total = 0
    for part, spec in entry.get("coded", {}).items():
        name = key if part == "raw" else f"{key}::{part}"
        dtype, shape, *form = spec
        if dtype not in CODED_DTYPES or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
            raise ValueError(f"{name}: coded as {dtype} {shape}, which is not an array type")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if size > _most_bytes(entry, shape):
            raise ValueError(f"{name}: its shape {shape} names {size} bytes, over the limit")
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        data = decoder.decompress(arrays[name].tobytes(), max_length=size)
        if len(data) != size or not decoder.eof:
            raise ValueError(f"{name}: its coded stream does not decode to shape {shape}")
        arrays[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        total += size
        if form == ["bytes"]:  # one code per byte: packed again, as the layout reads them
            arrays[name] = _repacked(arrays[name], name, part, entry)
        elif form:
            raise ValueError(f"{name}: coded in form {form}, which is not one this reads")
    return total


def _repacked(codes: np.ndarray, name: str, part: str, entry: dict[str, Any]) -> np.ndarray:
    bits = entry.get("bits")
    if part != "codes" or entry.get("encoding") != "int" or bits not in range(1, 9):
        raise ValueError(f"{name}: only integer codes are coded one per byte")
    if codes.dtype != np.uint8 or codes.ndim != 1 or (codes.size and codes.max() >= 2**bits):
        raise ValueError(f"{name}: its codes do not fit {bits} bits")
    return pack_bits(codes, bits)


def _most_bytes(entry: dict[str, Any], shape: list[int]) -> int:
    """The most bytes any array of a tensor's entry can hold: 8 per element of the
    tensor's own shape, never over the limit; a raw tensor, MAX_RAW_BYTES."""
    if "shape" not in entry:
        return MAX_RAW_BYTES
    tensor = entry["shape"]
    if not isinstance(tensor, list) or not all(type(d) is int and d >= 0 for d in tensor):
        raise ValueError(f"its shape {tensor!r} is not a list of sizes")
    return min(8 * math.prod(tensor) + 64, MAX_DECODED_BYTES)


# --------------------------------------------------------------------------- reading


def read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable compressed model: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: not a paretoopt compressed model (format {meta.get('format')!r})"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(
            f"{path}: format version {meta.get('format_version')} is not "
            f"supported (this paretoopt reads {FORMAT_VERSION})"
        )
    try:
        return {
            k: (v if k in ("format", "format_version") else json.loads(v)) for k, v in meta.items()
        }
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: damaged metadata: {exc}") from None


def decode_state_dict(path: Path) -> dict[str, torch.Tensor]:
    meta = read_metadata(path)
    arrays = load_file(str(path))
    try:
        total = 0
        for key, entry in meta["layout"].items():
            total += _decoded(arrays, key, entry)
            if total > MAX_DECODED_BYTES:  # many arrays, each under the limit
                raise ValueError(f"its coded arrays decode to over {MAX_DECODED_BYTES} bytes")
        return {key: _decode(arrays, key, entry) for key, entry in meta["layout"].items()}
    except (
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        OverflowError,
        RuntimeError,
        lzma.LZMAError,
    ) as exc:  # a crafted layout: whatever it breaks, the reader says so in one line
        raise ArtifactError(f"{path}: damaged tensor data: {type(exc).__name__}: {exc}") from None


def _decode(arrays: dict[str, np.ndarray], key: str, entry: dict[str, Any]) -> torch.Tensor:
    if entry["encoding"] == "raw":
        return torch.from_numpy(arrays[key].copy())
    shape = tuple(entry["shape"])
    n = int(np.prod(shape))
    mask = np.unpackbits(arrays[f"{key}::mask"])[:n].astype(bool) if entry.get("masked") else None
    if entry["encoding"] == "float":
        values = arrays[f"{key}::values"]
        if entry.get("dtype") == "bfloat16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        values = values.astype(np.float32)
        return torch.from_numpy(_scatter(values, mask, n, 0.0).reshape(shape))
    zp = arrays[f"{key}::zero_point"].astype(np.int64)
    count = int(mask.sum()) if mask is not None else n
    codes = unpack_bits(arrays[f"{key}::codes"], entry["bits"], count)
    if mask is not None:  # dropped codes are their channel's zero point
        full = np.broadcast_to(zp.reshape(-1, 1), (shape[0], n // shape[0])).ravel().copy()
        full[mask] = codes
        codes = full
    if entry.get("grid") == "kmeans":
        if zp.size and zp.max() >= 2 ** entry["bits"]:  # a dropped code must name a value
            raise ValueError(
                f"{key}: its zero point {int(zp.max())} is no {entry['bits']}-bit code"
            )
        return lookup(torch.from_numpy(codes.reshape(shape)), _codebook(arrays, key, entry))
    scale = torch.from_numpy(arrays[f"{key}::scale"].copy())
    return dequantize(torch.from_numpy(codes.reshape(shape)), scale, torch.from_numpy(zp))


def _codebook(arrays: dict[str, np.ndarray], key: str, entry: dict[str, Any]) -> torch.Tensor:
    """A k-means grid's shared values: one row per output channel, or one, of 2^bits."""
    book = arrays[f"{key}::codebook"]
    rows = (entry["shape"][0], 1)
    if book.dtype != np.float32 or book.ndim != 2 or book.shape[0] not in rows:
        raise ValueError(f"{key}: its codebook {book.dtype} {list(book.shape)} has no row shape")
    if book.shape[1] != 2 ** entry["bits"]:
        raise ValueError(f"{key}: a {entry['bits']}-bit codebook needs {2 ** entry['bits']} values")
    return torch.from_numpy(book.copy())


def _scatter(values: np.ndarray, mask: np.ndarray | None, n: int, fill: float) -> np.ndarray:
    if mask is None:
        return values.ravel().copy()
    full = np.full(n, fill, dtype=values.dtype)
    full[mask] = values
    return full


def input_layout(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """How the model takes its inputs (files from before layouts were kept name one
    float32 input by its shape)."""
    layout = meta.get("inputs") or trees.single(meta.get("input_shape", []))
    try:
        ok = layout["kind"] in ("tensor", "tuple", "dict") and all(
            i["dtype"] in trees.TYPES
            and isinstance(i["name"], str)
            and all(type(d) is int and 0 < d <= 1 << 20 for d in i["shape"])
            for i in layout["inputs"]
        )
    except (KeyError, TypeError):
        ok = False
    if not ok or not layout["inputs"]:
        raise ArtifactError(f"{path}: damaged input layout: {shown(layout)}")
    return layout


def load_compressed(path: Path, build_model: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the compressed model on a fresh copy of the architecture: replay each
    technique's architecture change the file keeps, then load the decoded weights."""
    meta = read_metadata(path)
    model = build_model().eval()
    example = trees.zeros(input_layout(meta, path))
    for rebuild in rebuilds():
        kept = meta.get(rebuild.key)
        if not kept:
            continue
        try:
            rebuild.replay(model, kept, example)
        except Exception as exc:  # it names layers this architecture lacks
            raise ArtifactError(
                f"{path}: its {rebuild.what} does not replay on this model: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    state = decode_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: does not fit the model: {exc}") from None
    return model.eval()
