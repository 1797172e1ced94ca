"""The typed trial record: one serialisation, older records still read."""

from __future__ import annotations

import json

import pytest

from paretoopt.config.metrics import METRICS
from paretoopt.results.record import (
    RECORD_VERSION,
    VERSION_ATTR,
    Latency,
    LayerQuant,
    RuntimeFigures,
    TrialRecord,
    frame_columns,
    record_field_names,
    stored_record,
    technique_fields,
)

LATENCY = Latency(0.1, 0.12, 0.09, 1.02, 10, 1, 0.095, 0.95, 0.105, 0.1, "cpu", None)


def record(**changes) -> TrialRecord:
    base = TrialRecord(
        plan={"version": 3},
        accuracy=98.0,
        test_accuracy=97.5,
        torch_accuracy=98.1,
        torch_test_accuracy=97.4,
        deploy_gap=-0.1,
        size_bytes=1234,
        runtime_file_bytes=5000,
        latency_ms=0.095,
        latency=LATENCY,
        runtime="onnxruntime",
        int_kernels=True,
        exact_weights=True,
        params=1000,
        macs=20_000,
        nonzero_params=900,
        layer_quant={"0": LayerQuant(8, "int", "int8", "per_channel", "symmetric", True)},
        layer_bits={"0": 8},
        layer_channels={"0": [6, 8]},
    )
    return base.replace(**changes)


def test_a_record_round_trips_through_its_stored_form_as_json():
    ours = record()
    stored = json.loads(json.dumps(ours.to_attrs()))
    assert stored[VERSION_ATTR] == RECORD_VERSION
    assert TrialRecord.from_attrs(stored) == ours


def test_a_record_keeps_each_compared_runtime_s_figures():
    openvino = RuntimeFigures(
        "openvino",
        "2026.4.1",
        accuracy=97.9,
        test_accuracy=97.2,
        deploy_gap=-0.2,
        latency_ms=0.2,
        latency=LATENCY,
        runtime_file_bytes=6000,
        int_kernels=True,
        exact_weights=True,
        kernels={"0": "int8"},
        files={"model.xml": "ab", "model.bin": "cd"},
    )
    failed = RuntimeFigures("executorch", "1.5.1", error="RuntimeError: cannot lower")
    ours = record(compared={"openvino": openvino, "executorch": failed})
    read = TrialRecord.from_attrs(json.loads(json.dumps(ours.to_attrs())))
    assert read == ours and read["compared"]["openvino"]["latency"]["mode"] == "cpu"
    columns = frame_columns(read)
    assert columns["latency_ms@openvino"] == 0.2 and columns["error@openvino"] == ""
    assert columns["accuracy@executorch"] is None and columns["error@executorch"].startswith("R")
    assert TrialRecord.from_attrs(record().to_attrs()).compared == {}  # measured in one
    there = read.in_runtime("openvino")  # the record as measured in openvino
    assert (there.runtime, there.accuracy, there.latency_ms) == ("openvino", 97.9, 0.2)
    assert there.layer_quant["0"].kernel == "int8" and there.size_bytes == ours.size_bytes
    assert read.in_runtime("onnxruntime") is read and read.in_runtime(None) is read
    with pytest.raises(ValueError, match="RuntimeError: cannot lower"):
        read.in_runtime("executorch")
    with pytest.raises(KeyError):
        read.in_runtime("torch")


def test_records_read_like_the_stored_mapping():
    ours = record()
    assert ours["latency"]["mode"] == "cpu" and ours["layer_quant"]["0"]["kernel"] == "int8"
    assert ours.get("nothing", 7) == 7 and "size_bytes" in ours
    with pytest.raises(KeyError):
        ours["nothing"]


def test_a_record_stored_before_the_typed_record_still_reads():
    """Studies written before the record had a version lack some fields."""
    old = record().to_attrs()
    for key in (VERSION_ATTR, "exact_weights", "stages", "torch_test_accuracy", "files"):
        old.pop(key)
    del old["latency"]["min_ms"]
    old["layer_quant"] = {"0": {"bits": 32, "format": "float32", "kernel": "float32"}}
    old["worker"] = 123  # a stored trial holds more than its record
    read = TrialRecord.from_attrs(old)
    assert read.torch_test_accuracy == read.test_accuracy  # what export read it as
    assert read.layer_quant["0"] == LayerQuant(32, "float32", "float32")
    assert read.latency.min_ms == read.latency.median_ms and read.exact_weights is None
    assert stored_record({"accuracy": 1.0}) is None  # a failed trial holds no record


def test_techniques_may_fill_only_their_own_fields():
    assert technique_fields({"layer_bits": {"0": 4}}) == {"layer_bits": {"0": 4}}
    with pytest.raises(ValueError, match="size_bytes, which is not a technique field"):
        technique_fields({"size_bytes": 1})


def test_every_metric_reads_a_field_of_the_record_and_a_frame_column():
    columns = frame_columns(record())
    for m in METRICS.values():
        assert m.field in record_field_names(), m.name
        assert columns[m.field] == getattr(record(), m.field)
    assert set(frame_columns(None).values()) == {None}


def test_a_renamed_field_reads_from_its_old_name(monkeypatch):
    """A rename is one line in RENAMED: records stored under the old name still read."""
    import paretoopt.results.record as module

    stored = record().to_attrs()
    stored["bytes_on_disk"] = stored.pop("size_bytes")
    assert stored_record(stored) is None  # without the line, the field is missing
    monkeypatch.setattr(module, "RENAMED", (("size_bytes", "bytes_on_disk"),))
    assert TrialRecord.from_attrs(stored).size_bytes == 1234


def test_a_latency_says_how_it_was_read():
    from paretoopt.results.record import quiet_reading

    assert quiet_reading({"quiet": True, "quiet_pairs": 5, "pairs": 64}) == (
        "read from 5 of 64 round pairs at the machine's quiet level"
    )
    assert quiet_reading({"quiet": False, "pairs": 227}) == (
        "the machine was never quiet while it was timed: read from all 227 pairs"
    )
    assert quiet_reading({"pairs": 5}) == ""  # timed before quiet rounds: nothing to say
