from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from paretoopt.config.knobs import Choice, Fixed, Range
from paretoopt.config.space import dump_space, load_space, parse_space, reference_rows
from paretoopt.errors import SpaceError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
BASE = {"model": "conv", "data": "digits"}


def parse(**sections):
    return parse_space({**BASE, **sections})


def error_of(doc) -> str:
    with pytest.raises(SpaceError) as info:
        parse_space(doc)
    return str(info.value)


def test_shipped_spaces_exist():
    names = {p.name for p in SHIPPED}
    assert {"conv.yaml", "mlp.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_round_trips(path):
    space = load_space(path)
    again = parse_space(yaml.safe_load(dump_space(space)), source=path)
    assert again == space


def test_defaults_fill_every_section():
    space = parse()
    assert space.study == "study"
    assert space.metrics == ["accuracy", "size", "latency"]
    assert space.directions == ["maximize", "minimize", "minimize"]
    assert space.target.runtime == "onnxruntime" and space.target.threads == 1
    assert space.target.batch_size == 1
    assert space.constraints.max_accuracy_drop == 1.0
    assert space.search.sampler == "tpe"
    assert space.space.pruning.sparsity == Range(0.0, 0.9)
    assert space.space.finetune.epochs == Fixed(2)


def test_knob_forms():
    space = parse(
        space={
            "pruning": {"sparsity": 0.5, "structure": ["channel"]},
            "quantization": {"bits": {"low": 2, "high": 8}},
            "finetune": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "epochs": [1, 2]},
        }
    )
    s = space.space
    assert s.pruning.sparsity == Fixed(0.5)
    assert s.pruning.structure == Fixed("channel")  # a one-element list is fixed
    assert s.quantization.bits == Range(2, 8, integer=True)
    assert s.finetune.lr == Range(1e-4, 1e-2, log=True)
    assert s.finetune.epochs == Choice((1, 2))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {**BASE, "space": {"pruning": {"sparsty": 0.5}}},
            "space.pruning.sparsty: unknown key (did you mean 'sparsity'?); allowed keys: "
            "structure, nm_keep, nm_group, sparsity, saliency, distribution, layer_scale, "
            "layer_groups, schedule, gradual_steps, regrowth, reconstruction, "
            "regrowth_interval, saliency_batches, round_to",
        ),
        (
            {**BASE, "serch": {}},
            "serch: unknown key (did you mean 'search'?); allowed keys: study, model, data, "
            "baseline, recipe, target, objectives, metric, constraints, search, space",
        ),
        (
            {**BASE, "space": {"pruning": {"sparsity": {"low": 0.9, "high": 0.1}}}},
            "space.pruning.sparsity: low <= high must hold, but got low=0.9, high=0.1",
        ),
        (
            {**BASE, "space": {"quantization": {"bits": [4, 12]}}},
            "space.quantization.bits[1]: 12 is not supported; "
            "choose from 2, 3, 4, 5, 6, 7, 8, 16, 32",
        ),
        (
            {**BASE, "space": {"quantization": {"bits": {"low": 4, "high": 16}}}},
            "space.quantization.bits: 9 is not supported; choose from 2, 3, 4, 5, 6, 7, 8, 16, 32",
        ),
        (
            {**BASE, "space": {"quantization": {"bits": 1}}},
            "space.quantization.bits: 1 is not supported; choose from 2, 3, 4, 5, 6, 7, 8, 16, 32",
        ),
        (
            {**BASE, "space": {"pruning": {"sparsity": 1.5}}},
            "space.pruning.sparsity: must be <= 0.99, but got 1.5",
        ),
        (
            {**BASE, "space": {"pruning": {"sparsity": {"low": 0.1}}}},
            "space.pruning.sparsity: a range needs both 'low' and 'high' (missing 'high')",
        ),
        (
            {**BASE, "space": {"pruning": {"sparsity": []}}},
            "space.pruning.sparsity: a list of choices must not be empty",
        ),
        (
            {**BASE, "space": {"pruning": {"round_to": [1, 8]}}},
            "space.pruning.round_to: this setting cannot be searched; give a single value",
        ),
        (
            {**BASE, "space": {"finetune": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}},
            "space.finetune.lr.low: must be >= 1e-08, but got 0.0",
        ),
        (
            {**BASE, "search": {"trials": "many"}},
            "search.trials: expected an integer, but got 'many'",
        ),
        ({**BASE, "search": {"trials": 0}}, "search.trials: must be >= 1, but got 0"),
        (
            {**BASE, "search": {"sampler": "cmaes"}},
            "search.sampler: 'cmaes' is not supported; choose from tpe, nsga2, random, gp, grid",
        ),
        (
            {**BASE, "target": {"runtime": "tflite"}},
            "target.runtime: 'tflite' is not supported; choose from onnxruntime, torch, openvino, "
            "executorch",
        ),
        (
            {**BASE, "target": {"compare": ["openvino", "onnxruntime"]}},
            "target.compare: names target.runtime 'onnxruntime' itself; list the other runtimes "
            "the trials are also measured in",
        ),
        (
            {**BASE, "target": {"compare": ["openvino", "openvino"]}},
            "target.compare: the values must be distinct, but got ['openvino', 'openvino']",
        ),
        (
            {**BASE, "target": {"compare": ["tflite"]}},
            "target.compare[0]: 'tflite' is not supported; choose from onnxruntime, torch, "
            "openvino, executorch",
        ),
        (
            {**BASE, "target": {"runtime": "torch", "device": "cuda", "compare": "openvino"}},
            "target.compare: the compared runtimes run on the CPU, but target.device is 'cuda'",
        ),
        (
            {**BASE, "target": {"compare": ["torch"], "agent": "10.0.0.2:8765"}},
            "target.compare: with target.agent every runtime is timed on the agent, which "
            "serves onnxruntime, openvino, executorch, but compare names torch",
        ),
        (
            {**BASE, "target": {"runtime": "torch", "agent": "10.0.0.2:8765"}},
            "target.agent: an agent times runtime files on its CPU, so it needs device cpu and a "
            "runtime from onnxruntime, openvino, executorch, but got 'torch' on 'cpu'",
        ),
        (
            {**BASE, "constraints": {"max_accuracy_drop": -1}},
            "constraints.max_accuracy_drop: must be >= 0.0, but got -1.0",
        ),
        (
            {**BASE, "objectives": ["accuracy"]},
            "objectives: a Pareto search needs at least two metrics, but got ['accuracy']; "
            "choose from accuracy, size, latency, macs",
        ),
        (
            {**BASE, "objectives": {"accuracy": "minimize", "size": "minimize"}},
            "objectives.accuracy: must be 'maximize', but got 'minimize'",
        ),
        (
            {**BASE, "objectives": ["accuracy", "flops"]},
            "objectives: unknown metric 'flops'; choose from accuracy, size, latency, macs",
        ),
        ({"data": "digits"}, "model: required; give a built-in 'name' or a 'factory'"),
        (
            {**BASE, "model": {"name": "conv", "factory": "a:b"}},
            "model: give exactly one of 'name' (built-in) or 'factory' ('module.path:callable' or "
            "'path/file.py:callable')",
        ),
        (
            {**BASE, "model": {"factory": "no_colon"}},
            "model.factory: expected 'module.path:callable' or 'path/to/file.py:callable', "
            "but got 'no_colon'",
        ),
        (
            {**BASE, "study": "bad name!"},
            "study: 'bad name!' is not a valid study name; use letters, digits, '.', '_' and '-' "
            "(it names the folder results/<study>/)",
        ),
        (
            {**BASE, "space": {"pruning": {"regrowth": "yes"}}},
            "space.pruning.regrowth: expected true or false, but got 'yes'",
        ),
        ({**BASE, "space": "pruning"}, "space: expected a mapping of settings, but got 'pruning'"),
        (
            {
                **BASE,
                "constraints": {"max_size_bytes": None, "max_accuracy_drop": None},
                "search": {"seed": None},
            },
            "search.seed: a value is required here (null is not allowed)",
        ),
    ],
)
def test_invalid_documents_give_exact_messages(doc, message):
    assert error_of(doc) == message


def test_relative_paths_resolve_against_the_space_file(tmp_path):
    (tmp_path / "net.py").write_text("def build():\n    pass\n")
    (tmp_path / "space.yaml").write_text("model: {factory: 'net.py:build'}\ndata: digits\n")
    space = load_space(tmp_path / "space.yaml")
    assert space.model.factory == f"{tmp_path / 'net.py'}:build"
    assert space.study == "space"


def test_missing_factory_file_and_checkpoint(tmp_path):
    (tmp_path / "s.yaml").write_text("model: {factory: 'gone.py:f'}\ndata: digits\n")
    with pytest.raises(SpaceError, match=r"^model.factory: file 'gone.py' does not exist"):
        load_space(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("model: {name: conv, checkpoint: w.pt}\ndata: digits\n")
    with pytest.raises(SpaceError, match=r"^model.checkpoint: file 'w.pt' does not exist"):
        load_space(tmp_path / "s.yaml")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: conv\ndata: [digits\n")
    with pytest.raises(SpaceError, match=r"broken.yaml: not valid YAML at line 3, column 1"):
        load_space(path)


def test_non_mapping_document(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpaceError, match=r"expected a mapping of top-level keys"):
        load_space(path)


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [row[0] for row in reference_rows() if f"`{row[0]}`" not in readme]
    assert not missing, f"README lacks {missing}"
    for path in SHIPPED:
        assert f"search_spaces/{path.name}" in readme


def test_reference_rows_cover_nested_sections():
    paths = [r[0] for r in reference_rows()]
    assert "space.pruning.sparsity" in paths and "target.threads" in paths
    assert all(re.match(r"^[a-z][a-z0-9_.]*$", p) for p in paths)


def test_readme_shows_conv_yaml_as_shipped():
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "search_spaces" / "conv.yaml").read_text() in readme
