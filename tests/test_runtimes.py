"""The optional runtimes (OpenVINO, ExecuTorch with XNNPACK): int8 kernels read from
each runtime's own graph, the plan's codes checked to reach it, a search that runs in
it end to end, and its exported file reloaded. Skipped where a runtime is not installed
(`make extras` installs both)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import struct
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import paretoopt
from paretoopt.compress.techniques.bench import prunable_layers
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec, TargetSpec, parse_space
from paretoopt.errors import SpaceError, StudyError
from paretoopt.measure import export_onnx
from paretoopt.measure.agent import Agent, AgentClient, AgentError, Rejected, make_server
from paretoopt.measure.backends import DeployRequest, create_backend, served
from paretoopt.measure.backends import base as backend_base
from paretoopt.measure.isa import Int8Recipe, this_machine
from paretoopt.study.trial import calibrate, prepare, run_trial
from paretoopt.workload.data import create_data
from tests.conftest import TINY
from tests.test_backends import _bench

RUNTIMES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(name) is None, reason=f"{name} is not installed"
        ),
    )
    for name in ("openvino", "executorch")
]
OPENVINO, EXECUTORCH = (mark for param in RUNTIMES for mark in param.marks)
FILES = {"openvino": ["model.bin", "model.xml"], "executorch": ["model.pte"]}


def _deploy(name, bench, plan, tmp_path, codes=None):
    backend = create_backend(TargetSpec(runtime=name), bench.splits.train.x[:1])
    tmp_path.mkdir(parents=True, exist_ok=True)
    request = DeployRequest(
        bench.model,
        tmp_path,
        plan.quant,
        bench.splits.train.x[:64],
        bench.quantized if codes is None else codes,
        int8=Int8Recipe.choose("u8s8", *this_machine()),
    )
    return backend, backend.deploy(request)


@pytest.mark.parametrize("name", RUNTIMES)
def test_int8_plans_run_in_integer_kernels_with_the_plans_own_codes(name, tmp_path):
    plan = CompressionPlan(quant=QuantConfig(4, scheme="symmetric", activations="int8"))
    bench = _bench(plan)
    backend, deployment = _deploy(name, bench, plan, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES[name]  # only what it timed
    assert deployment.int8_weights == dict.fromkeys(bench.quantized, "s8")
    assert backend.integer_weights(deployment) == set(bench.quantized)
    x = bench.splits.val.x[:64]
    ours = logits_of(bench.model, x).numpy()
    error = np.linalg.norm(deployment.runner(x.numpy()) - ours) / np.linalg.norm(ours)
    assert 0 < error < 0.05  # int8 activations round, and only a little
    float_plan = CompressionPlan(quant=QuantConfig(32))
    _, floats = _deploy(name, _bench(float_plan), float_plan, tmp_path / "f")
    assert backend.structure(deployment) != backend.structure(floats)


@pytest.mark.parametrize("name", RUNTIMES)
def test_codes_that_do_not_match_the_weights_are_recorded_as_re_rounded(name, tmp_path):
    plan = CompressionPlan(quant=QuantConfig(4, scheme="symmetric", activations="int8"))
    bench = _bench(plan)
    codes = dict(bench.quantized)
    first = next(iter(codes))
    q = codes[first]
    codes[first] = type(q)(**{**vars(q), "codes": torch.flip(q.codes, [0])})  # not its weight
    _, deployment = _deploy(name, bench, plan, tmp_path / "1", codes)
    assert deployment.int8_weights[first] is None
    assert all(v == "s8" for k, v in deployment.int8_weights.items() if k != first)


@pytest.mark.parametrize("name", RUNTIMES)
def test_layers_a_plan_keeps_in_float_run_float_kernels(name, tmp_path):
    names = list(prunable_layers(_bench(CompressionPlan()).model))
    widths = {n: 32 if i == 0 else 8 for i, n in enumerate(names)}
    plan = CompressionPlan(quant=QuantConfig(8, layer_bits=widths, activations="int8"))
    bench = _bench(plan)
    backend, deployment = _deploy(name, bench, plan, tmp_path)
    integer = backend.integer_weights(deployment)
    assert integer == {f"{n}.weight" for n in names[1:]}  # conv-BN pairs among them
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bench.model.modules())


def test_a_runtime_that_is_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StudyError, match=r"pip install -c constraints.txt -e '\.\[openvino\]'"):
        backend_base.require("openvino")


CLI = [sys.executable, "-m", "paretoopt.cli"]


def _search(tmp_path, tiny_doc, study, **target):
    """Two trials of channel pruning with 4-bit int8 plans (4-bit codes fit every CPU's
    s8 kernels: int8 kernels with or without VNNI), searched from the command line."""
    doc = {**tiny_doc, "study": study, "target": {**tiny_doc["target"], **target}}
    doc["search"] = {"trials": 2, "seed": 0, "anchors": 0}
    doc["space"] = {
        "pruning": {"structure": ["channel"], "sparsity": {"low": 0.2, "high": 0.4}},
        "quantization": {"bits": [4], "activations": ["int8"]},
        "finetune": {"epochs": 1},
    }
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(doc))
    results = tmp_path / "results"
    run = subprocess.run(
        [*CLI, "search", "--space", str(space), "--results", str(results)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return doc, results, run


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNTIMES)
def test_a_search_measures_in_the_runtime_and_exports_the_file_it_timed(name, tmp_path, tiny_doc):
    doc, results, _ = _search(tmp_path, tiny_doc, f"tiny-{name}", runtime=name)
    trials = pd.read_csv(results / doc["study"] / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 2 and done[done["number"] == 1]["int_kernels"].all()  # 0: baseline
    out = tmp_path / "out"
    run = subprocess.run(
        [*CLI, "export", "--results", str(results), "--study", doc["study"], "--trial", "1"]
        + ["--out", str(out), "--format", name],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    suffix = {"openvino": ".xml", "executorch": ".pte"}[name]
    model = paretoopt.load(out / f"{doc['study']}-trial1{suffix}")
    card = json.loads((out / f"{doc['study']}-trial1.card.json").read_text())
    assert card["files"][name]["made_afresh"] is False  # the very file it timed
    assert card["runtime"].startswith(f"{name} ")  # named with its version
    measured = float(done[done["number"] == 1]["test_accuracy"].iloc[0])
    test = create_data(ComponentSpec(name="digits", kwargs={"size": 8})).test
    assert model.split_accuracy(test) == pytest.approx(measured, abs=1e-9)
    # the explorer's download hands over the same measured file, beside the other formats
    from paretoopt.app import export_zip
    from paretoopt.results.frames import load_results

    stem = f"{doc['study']}-trial1"
    zipped = zipfile.ZipFile(io.BytesIO(export_zip(load_results(results / doc["study"]), 1)))
    for part in {"openvino": (".xml", ".bin"), "executorch": (".pte",)}[name]:
        assert zipped.read(stem + part) == (out / (stem + part)).read_bytes()
    assert f"{stem}.onnx" in zipped.namelist()


@pytest.mark.parametrize(
    ("name", "suffix", "body"),
    [
        pytest.param("openvino", ".xml", b"<net><layers>", marks=RUNTIMES[0].marks),
        pytest.param("executorch", ".pte", b"garbage", marks=RUNTIMES[1].marks),
    ],
)
def test_a_damaged_runtime_file_is_refused_in_one_line(name, suffix, body, tmp_path):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(body)
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(StudyError, match="not a readable"):
        paretoopt.load(path)


def test_executorch_batches_beyond_its_planned_size_are_refused_at_load(tiny_doc):
    tiny_doc["target"] = {**tiny_doc["target"], "runtime": "executorch", "batch_size": 512}
    with pytest.raises(SpaceError) as info:
        parse_space(tiny_doc)
    assert str(info.value) == (
        "target.batch_size: runtime executorch takes at most 256 (its programs are planned "
        "for that batch), but batch_size is 512"
    )


# --------------------------------------------------------------------------- on an agent

TOKEN = "a-long-enough-test-token"
PROTOCOL = TargetSpec(warmup=5, repeats=3, iterations=20, batch_size=16, sessions=2, quiet_rounds=0)


@pytest.fixture
def agent():
    """An agent on loopback serving every installed runtime: (address, agent)."""
    state = Agent(TOKEN, max_bytes=8_000_000)
    server = make_server(state, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


def _int8_and_float(name, tmp_path):
    plan = CompressionPlan(quant=QuantConfig(4, scheme="symmetric", activations="int8"))
    bench = _bench(plan)
    backend, int8 = _deploy(name, bench, plan, tmp_path / "int8")
    float_plan = CompressionPlan(quant=QuantConfig(32))
    _, floats = _deploy(name, _bench(float_plan), float_plan, tmp_path / "float")
    return backend, int8, floats


@pytest.mark.parametrize("name", RUNTIMES)
def test_an_agent_times_the_runtime_s_own_file_against_a_baseline_in_it(name, agent, tmp_path):
    address, state = agent
    backend, int8, floats = _int8_and_float(name, tmp_path)
    client = AgentClient(address, TOKEN)
    assert set(client.runtimes()) >= {"onnxruntime", name}
    ours = client.upload(int8.file, runtime=name)
    theirs = client.upload(floats.file, runtime=name)
    assert state.models[ours][0] == state.models[theirs][0] == name
    timing = client.paired(ours, theirs, PROTOCOL)
    assert timing.ours.runs == timing.theirs.runs == 2 * 3 * 20 and timing.ours.batch_size == 16
    assert timing.ratio > 0 and len(timing.session_ratios) == 2
    if name == "openvino":  # compiled on the agent's CPU: its own report of the int8 layers
        assert client.kernels[ours].integer == frozenset(backend.integer_weights(int8))
        assert client.kernels[ours].structure == backend.structure(int8)
        assert client.kernels[theirs].integer == frozenset()
    else:  # lowering decided the kernels: no report from the agent, the file's stands
        assert ours not in client.kernels


@pytest.mark.parametrize("name", RUNTIMES)
def test_an_agent_refuses_a_reference_from_another_runtime(name, agent, tmp_path):
    address, state = agent
    _, int8, _ = _int8_and_float(name, tmp_path)
    client = AgentClient(address, TOKEN)
    ours = client.upload(int8.file, runtime=name)
    onnx_file = tmp_path / "m.onnx"
    export_onnx(torch.nn.Linear(4, 2), torch.zeros(1, 4), onnx_file)
    other = client.upload(onnx_file)
    with pytest.raises(AgentError, match=f"400 the model runs in {name} but the reference in "):
        client.paired(ours, other, PROTOCOL)


def test_an_agent_says_which_runtimes_it_serves(agent, tmp_path):
    address, _ = agent
    state = Agent(TOKEN, formats={"onnxruntime": served("onnxruntime")})
    with pytest.raises(Rejected) as info:
        state.add_model(b"anything", runtime="openvino")
    assert info.value.status == 404
    assert str(info.value) == (
        "runtime 'openvino' is not served here; this agent serves ['onnxruntime'] (a runtime's "
        "extra installs it beside the agent)"
    )


def _ir(tmp_path):
    _, int8, _ = _int8_and_float("openvino", tmp_path)
    return int8.file.read_bytes(), int8.file.with_suffix(".bin").read_bytes()


def _framed(xml: bytes, weights: bytes) -> bytes:
    return struct.pack("<4sQ", b"OVIR", len(xml)) + xml + weights


@OPENVINO
def test_an_agent_refuses_hostile_openvino_uploads(tmp_path):
    xml, weights = _ir(tmp_path)
    check = served("openvino").check
    assert check(_framed(xml, weights)) is not None  # the real one passes, with its kernels
    entities = b'<?xml version="1.0"?><!DOCTYPE net [<!ENTITY a "aaaa">]><net>&a;</net>'
    cases = {
        xml: "not an OpenVINO IR upload",  # not framed
        struct.pack("<4sQ", b"OVIR", 10**9) + xml: "is said to be 1000000000 bytes",
        _framed(entities, b""): "document type and entity declarations in the .xml are refused",
        _framed(b"<net><layers>", b""): "the IR's .xml does not parse",
        _framed(b"<model/>", b""): "the .xml's root is <model>, not <net>",
        # every constant must lie inside the weights sent with it
        _framed(xml, weights[: len(weights) // 2]): "lie outside the",
        # a UTF-16 file hid its entity declarations from a byte search
        _framed(entities.decode().replace("1.0", '1.0" encoding="UTF-16').encode("utf-16"), b""): (
            "the IR's .xml must be UTF-8"
        ),
        _framed(xml.replace(b'offset="0"', b'offset="\xc2\xb2"', 1), weights): (
            "offset and size must be whole numbers of bytes"
        ),
        _framed(xml.replace(b'type="Const"', b'type="NoSuchOp"', 1), weights): "OpenVINO cannot",
    }
    for body, reason in cases.items():
        with pytest.raises(backend_base.Refused, match=reason.replace(".", r"\.")):
            check(body)


@EXECUTORCH
def test_an_agent_refuses_hostile_executorch_uploads(tmp_path):
    _, int8, _ = _int8_and_float("executorch", tmp_path)
    program = int8.file.read_bytes()
    check = served("executorch").check
    assert check(program) is None  # the real one passes
    assert b"XnnpackBackend" in program
    # a backend the runtime also registers here, but the agent does not let a program call
    foreign = program.replace(b"XnnpackBackend", b"QnnBackendXXXX")
    cases = {
        b"\x00" * 64: "lacks the ET12 identifier",
        program[:8] + b"\xff" * 56: "ExecuTorch cannot load it",  # its verifier refuses it
        foreign: r"delegates to \['QnnBackendXXXX'\]; this agent runs only \['XnnpackBackend'\]",
        program[: len(program) // 2]: "ExecuTorch cannot load it",  # torn: its verifier says
    }
    for body, reason in cases.items():
        with pytest.raises(backend_base.Refused, match=reason):
            check(body)
    # a method planning more memory than the agent gives is refused before it loads
    huge = bytearray(program)
    at = _planned_sizes(huge)
    huge[at : at + 8] = struct.pack("<q", 1 << 40)
    with pytest.raises(backend_base.Refused, match=r"plans 1099511\d+ bytes of buffers"):
        check(bytes(huge))


def _planned_sizes(buf: bytearray) -> int:
    """Where the forward method's first planned-buffer size sits in a .pte."""
    from flatbuffers import encode, packer
    from flatbuffers.table import Table

    program = Table(buf, encode.Get(packer.uoffset, buf, 0))
    plans = program.Vector(program.Offset(6))
    plan = Table(buf, program.Indirect(plans))
    return plan.Vector(plan.Offset(4 + 2 * 8))


@EXECUTORCH
def test_reading_a_program_s_methods_is_bounded_whatever_the_file_claims():
    import flatbuffers

    from paretoopt.measure.backends.executorch_pte import MAX_PLANS, program_plans

    builder = flatbuffers.Builder(1024)
    name = builder.CreateString("forward")
    builder.StartObject(9)
    builder.PrependUOffsetTRelativeSlot(0, name, 0)
    plan = builder.EndObject()
    builder.StartVector(4, MAX_PLANS + 1, 4)  # every entry the same small table
    for _ in range(MAX_PLANS + 1):
        builder.PrependUOffsetTRelative(plan)
    plans = builder.EndVector()
    builder.StartObject(8)
    builder.PrependUOffsetTRelativeSlot(1, plans, 0)
    builder.Finish(builder.EndObject(), file_identifier=b"ET12")
    body = bytes(builder.Output())
    with pytest.raises(backend_base.Refused, match="lists 17 methods; this agent reads at most 16"):
        program_plans(body)


@pytest.mark.parametrize("name", RUNTIMES)
def test_a_trial_measured_on_an_agent_in_the_runtime(name, agent, tmp_path, monkeypatch):
    address, state = agent
    monkeypatch.setenv("PARETOOPT_AGENT_TOKEN", TOKEN)
    doc = copy.deepcopy(TINY)
    doc["target"].update({"agent": address, "runtime": name, "sessions": 2})
    ctx = prepare(parse_space(doc), tmp_path / "cache", log=lambda _: None)
    cal = calibrate(ctx, tmp_path / "cal")
    assert cal["mode"] == "remote" and cal["agent_runtimes"][name] == ctx.target.backend.version()
    plan = CompressionPlan(quant=QuantConfig(4, scheme="symmetric", activations="int8"))
    record = run_trial(ctx, plan, tmp_path / "1", seed=0)
    assert record["latency"]["mode"] == "remote" and record["runtime"] == name
    assert record["int_kernels"] and record["exact_weights"]
    assert {runtime for runtime, _ in state.models.values()} == {name}


@OPENVINO
def test_a_study_on_an_agent_without_its_runtime_stops_before_any_trial(tmp_path, monkeypatch):
    state = Agent(TOKEN, formats={"onnxruntime": served("onnxruntime")})
    server = make_server(state, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PARETOOPT_AGENT_TOKEN", TOKEN)
    doc = copy.deepcopy(TINY)
    address = f"127.0.0.1:{server.server_port}"
    doc["target"].update({"agent": address, "runtime": "openvino"})
    ctx = prepare(parse_space(doc), tmp_path / "cache", log=lambda _: None)
    try:
        with pytest.raises(StudyError) as info:
            calibrate(ctx, tmp_path / "cal")
    finally:
        server.shutdown()
        server.server_close()
    assert str(info.value).startswith(
        f"target.agent: the agent at {address} serves ['onnxruntime'], not target.runtime "
        "openvino; install it beside the agent"
    )


# --------------------------------------------------------------------------- compared targets


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(n) is None for n in ("openvino", "executorch")),
    reason="needs both optional runtimes",
)
def test_a_study_compares_runtimes_with_one_front_each(tmp_path, tiny_doc):
    from paretoopt.results.frames import for_target, load_results

    doc, results_root, run = _search(
        tmp_path, tiny_doc, "tiny-compare", compare=["openvino", "executorch"]
    )
    assert "calibration: baseline latency in openvino" in run.stdout
    assert " | openvino acc " in run.stdout and " | executorch acc " in run.stdout
    assert f"the front in openvino: paretoopt show --study {doc['study']} --results" in run.stdout
    results = load_results(results_root / doc["study"])
    assert results.runtimes == ["onnxruntime", "openvino", "executorch"]
    trial = results.trials[results.trials["number"] == 1].iloc[0]
    for name in ("openvino", "executorch"):
        assert trial[f"int_kernels@{name}"] and trial[f"exact_weights@{name}"]
        assert trial[f"error@{name}"] == ""
        view = for_target(results, name)
        row = view.trials[view.trials["number"] == 1].iloc[0]
        base = results.baseline["compared"][name]
        # every figure and ratio of the view is the runtime's own, against its baseline
        assert row["latency_ms"] == trial[f"latency_ms@{name}"]
        assert row["accuracy"] == trial[f"accuracy@{name}"]
        assert row["speedup"] == pytest.approx(base["latency_ms"] / row["latency_ms"])
        assert view.baseline["latency_ms"] == base["latency_ms"] != results.baseline["latency_ms"]
        assert "confirm_latency_ms" not in view.trials  # confirmed in the study's runtime only
    shown = subprocess.run(
        [*CLI, "show", "--results", str(results_root), "--study", doc["study"]]
        + ["--target", "executorch"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "measured in executorch" in shown.stdout
    out = tmp_path / "out"
    run = subprocess.run(
        [*CLI, "export", "--results", str(results_root), "--study", doc["study"], "--trial", "1"]
        + ["--out", str(out), "--target", "openvino"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    card = json.loads((out / f"{doc['study']}-trial1.card.json").read_text())
    assert sorted(card["files"]) == ["onnx", "openvino", "pt2", "safetensors"]
    checked = card["files"]["openvino"]
    assert checked["made_afresh"] is False  # the IR measured in openvino/, handed over
    assert checked["recorded_as"] == "compared.openvino.test_accuracy"
    assert checked["test_accuracy"] == pytest.approx(trial["test_accuracy@openvino"], abs=1e-9)
    assert card["files"]["onnx"]["recorded_as"] == "test_accuracy"  # the study's own file
    assert card["runtime"].startswith("openvino ") and card["measured"]["confirmation"] is None
    assert card["measured"]["latency_ms"] == trial["latency_ms@openvino"]
    assert list(card["compared"]) == ["onnxruntime", "openvino", "executorch"]  # all of them
    assert card["compared"]["onnxruntime"]["latency_ms"] == trial["latency_ms"]
    markdown = (out / f"{doc['study']}-trial1.card.md").read_text()
    assert "| runtime | validation accuracy | latency ms | int8 kernels |" in markdown
    # the IR measured in openvino holds the plan's own codes in every int8 layer
    exact = [q.get("exact_weights") for q in card["measured"]["layer_quant"].values()]
    assert True in exact and all(v is not False for v in exact)
    wrong = subprocess.run(
        [*CLI, "show", "--results", str(results_root), "--study", doc["study"]]
        + ["--target", "tflite"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2
    assert (
        wrong.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "--target: study 'tiny-compare' measured its trials in onnxruntime, openvino, "
            "executorch, not in 'tflite'; choose one of those (the space file's target.runtime "
            "and target.compare)"
        )
    )
