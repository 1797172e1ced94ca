"""The optional runtimes (OpenVINO, ExecuTorch with XNNPACK): int8 kernels read from
each runtime's own graph, the plan's codes checked to reach it, a search that runs in
it end to end, and its exported file reloaded. Skipped where a runtime is not installed
(`make extras` installs both)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

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
from paretoopt.measure.backends import DeployRequest, create_backend
from paretoopt.measure.backends import base as backend_base
from paretoopt.measure.isa import Int8Recipe, this_machine
from paretoopt.workload.data import create_data
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
    assert f"{names[0]}.weight" not in integer
    if name == "openvino":
        assert integer == {f"{n}.weight" for n in names[1:]}
    else:  # XNNPACK's quantizer, named layer by layer, misses fused conv-BN patterns
        linear = {
            f"{n}.weight"
            for n, m in bench.model.named_modules()
            if n in names[1:] and isinstance(m, torch.nn.Linear)
        }
        assert linear <= integer <= {f"{n}.weight" for n in names[1:]}


def test_a_runtime_that_is_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StudyError, match=r"pip install -c constraints.txt -e '\.\[openvino\]'"):
        backend_base.require("openvino")


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNTIMES)
def test_a_search_measures_in_the_runtime_and_exports_the_file_it_timed(name, tmp_path, tiny_doc):
    doc = {**tiny_doc, "study": f"tiny-{name}"}
    doc["target"] = {**doc["target"], "runtime": name}
    doc["search"] = {"trials": 2, "seed": 0, "anchors": 0}
    doc["space"] = {
        "pruning": {"structure": ["channel"], "sparsity": {"low": 0.2, "high": 0.4}},
        # 4-bit codes fit every CPU's s8 kernels: int8 kernels with or without VNNI
        "quantization": {"bits": [4], "activations": ["int8"]},
        "finetune": {"epochs": 1},
    }
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(doc))
    cli = [sys.executable, "-m", "paretoopt.cli"]
    results = tmp_path / "results"
    run = subprocess.run(
        [*cli, "search", "--space", str(space), "--results", str(results)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    trials = pd.read_csv(results / doc["study"] / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 2 and done[done["number"] == 1]["int_kernels"].all()  # 0: baseline
    out = tmp_path / "out"
    run = subprocess.run(
        [*cli, "export", "--results", str(results), "--study", doc["study"], "--trial", "1"]
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
