"""Contract tests every runtime backend runs: deploy, compute what the model computes,
reload the kept files to the same outputs, report kernels from its own graph."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from paretoopt.compress.artifact import ARTIFACT, save_compressed
from paretoopt.compress.techniques import Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier
from paretoopt.compress.train import logits_of
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec, TargetSpec
from paretoopt.measure.backends import BACKENDS, DeployRequest, backend_name, create_backend
from paretoopt.measure.isa import Int8Recipe, this_machine
from paretoopt.workload.data import create_data
from paretoopt.workload.models import create_model

SPEC = ComponentSpec(name="tiny_conv")
NEEDS = {
    "torch-cuda": torch.cuda.is_available(),
    "openvino": importlib.util.find_spec("openvino") is not None,  # optional extras
    "executorch": importlib.util.find_spec("executorch") is not None,
}


def _bench(plan: CompressionPlan) -> Workbench:
    splits = create_data(ComponentSpec(name="digits", kwargs={"size": 8}))
    model = create_model(SPEC).eval()
    teacher = logits_of(model, splits.train.x)
    bench = Workbench(model, splits, teacher, find_classifier(model, splits.train.x[:1]))
    apply_plan(bench, plan)
    return bench


def _target(name: str) -> TargetSpec:
    if name == "torch-cuda":
        return TargetSpec(runtime="torch", device="cuda")
    return TargetSpec(runtime=name)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_deploys_and_reloads_the_model_it_measured(name, tmp_path):
    if not NEEDS.get(name, True):
        pytest.skip(f"{name} needs a CUDA device or its optional package")
    spec = _target(name)
    assert backend_name(spec) == name
    plan = CompressionPlan(quant=QuantConfig(bits=32))
    bench = _bench(plan)
    backend = create_backend(spec, bench.splits.train.x[:1])
    assert backend.name == name and backend.version()
    save_compressed(tmp_path / ARTIFACT, bench, plan)
    deployment = backend.deploy(DeployRequest(bench.model, tmp_path, plan.quant))
    x = bench.splits.val.x[:16]
    ours = logits_of(bench.model, x).numpy()
    np.testing.assert_allclose(deployment.runner(x.numpy()), ours, rtol=1e-3, atol=1e-3)
    if backend.file is not None:  # the file it timed is in the trial folder
        assert deployment.file == tmp_path / backend.file and deployment.file.is_file()
    else:
        assert deployment.file is None
    again = backend.reload(tmp_path, lambda: create_model(SPEC))
    np.testing.assert_allclose(again(x.numpy()), ours, rtol=1e-3, atol=1e-3)
    assert backend.integer_weights(deployment) == set()  # a float plan runs no int kernel


def test_the_onnxruntime_backend_reads_its_int8_kernels_from_the_optimised_graph(tmp_path):
    plan = CompressionPlan(quant=QuantConfig(bits=8, scheme="symmetric", activations="int8"))
    bench = _bench(plan)
    backend = create_backend(TargetSpec(), bench.splits.train.x[:1])
    request = DeployRequest(
        bench.model,
        tmp_path,
        plan.quant,
        bench.splits.train.x[:64],
        bench.quantized,
        int8=Int8Recipe.choose("auto", *this_machine()),
    )
    deployment = backend.deploy(request)
    assert deployment.exact and all(deployment.exact.values())
    assert set(deployment.int8_weights.values()) <= {"s8", "u8"}
    integer = backend.integer_weights(deployment)
    assert {n for n in integer if n.endswith(".weight")} == set(bench.quantized)
    assert not (tmp_path / "model.float.onnx").exists()  # only what it timed is kept
    float_only = dataclasses.replace(deployment, int8_weights={})
    assert backend.integer_weights(float_only) == set()
