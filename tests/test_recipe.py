"""Where and how a study trains: devices, the recipe's loss and optimizer hooks, weight
decay and gradient clipping; a study with `finetune.device: cpu` through the CLI; the
CUDA path where a GPU is present."""

import copy
import json

import pandas as pd
import pytest
import torch
from torch import nn

from paretoopt.cli import main
from paretoopt.compress.recipe import (
    Setup,
    load_loss,
    load_optimizer,
    pin_worker_gpu,
    resolve_device,
)
from paretoopt.compress.train import Recipe, train
from paretoopt.config.space import parse_space
from paretoopt.errors import SpaceError
from paretoopt.study.trial import baseline_key, setups
from paretoopt.workload.data import Split

from .conftest import TINY, write_space

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _split(n: int = 64, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return Split(x, (x[:, 0] > 0).long())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _recipe(setup: Setup, epochs: int = 2, lr: float = 0.01) -> Recipe:
    return Recipe(epochs=epochs, lr=lr, batch_size=16, seed=0, setup=setup)


# --------------------------------------------------------------------------- hooks


def test_the_loss_hook_replaces_cross_entropy():
    """A loss with no gradient leaves Adam's weights exactly where they were; the default
    cross-entropy moves them."""
    model = _model()
    before = _weights(model)
    zero = Setup(loss=lambda logits, labels: logits.sum() * 0.0)
    train(model, _split(), _recipe(zero))
    assert torch.equal(_weights(model), before)
    train(model, _split(), _recipe(Setup()))
    assert not torch.equal(_weights(model), before)


def test_the_optimizer_hook_is_used_with_the_recipes_learning_rate():
    made = []

    def sgd(params, lr):
        made.append(lr)
        return torch.optim.SGD(params, lr=lr)

    train(_model(), _split(), _recipe(Setup(optimizer=sgd), lr=0.05))
    assert made == [0.05]


def test_gradient_clipping_bounds_every_step():
    """SGD at lr 1 with gradients clipped to norm 1e-3 moves the weights by at most 1e-3
    per step (4 steps per epoch here), however steep the loss."""
    clip = 1e-3
    setup = Setup(optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), grad_clip=clip)
    model = _model()
    before = _weights(model)
    train(model, _split(), _recipe(setup, epochs=1, lr=1.0))
    # cosine decay makes later steps smaller still: 4 steps of at most clip each
    moved = float((_weights(model) - before).norm())
    assert 0 < moved <= 4 * clip + 1e-9
    unclipped = _model()
    train(unclipped, _split(), _recipe(replace_clip(setup, None), epochs=1, lr=1.0))
    assert float((_weights(unclipped) - before).norm()) > 10 * moved


def replace_clip(setup: Setup, clip: float | None) -> Setup:
    from dataclasses import replace

    return replace(setup, grad_clip=clip)


def test_weight_decay_switches_the_default_optimizer_to_adamw():
    params = [nn.Parameter(torch.zeros(2))]
    assert type(Setup().make_optimizer(params, 0.1)) is torch.optim.Adam
    decayed = Setup(weight_decay=0.01).make_optimizer(params, 0.1)
    assert type(decayed) is torch.optim.AdamW
    assert decayed.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize(
    ("source", "loader", "message"),
    [
        (
            "def f(logits, labels):\n    return 1.0\n",
            load_loss,
            r"scalar tensor, but returned float",
        ),
        (
            "import torch\ndef f(logits, labels):\n    return torch.tensor(1.0)\n",
            load_loss,
            r"gradients do not flow through",
        ),
        (
            "def f(logits, labels):\n    return (logits - labels[:, None]).pow(2)\n",
            load_loss,
            r"scalar tensor, but returned shape \[4, 3\]",
        ),
        ("def f(logits):\n    return logits.sum()\n", load_loss, r"must take 2 arguments"),
        ("def f(params, lr):\n    return None\n", load_optimizer, r"torch.optim.Optimizer, but"),
        (
            "import torch\ndef f(params, lr):\n    return torch.optim.SGD(params, lr=-lr)\n",
            load_optimizer,
            r"calling it with \(params, lr=0.001\) failed: ValueError",
        ),
    ],
)
def test_a_bad_hook_fails_at_load_in_one_line(tmp_path, source, loader, message):
    (tmp_path / "hooks.py").write_text(source)
    with pytest.raises(SpaceError, match=message) as info:
        loader(f"{tmp_path / 'hooks.py'}:f", "recipe.loss")
    assert str(info.value).startswith("recipe.loss: ") and "\n" not in str(info.value)


def test_a_bad_hook_stops_the_search_before_training(tmp_path, tiny_doc, capsys):
    (tmp_path / "hooks.py").write_text("def loss(logits, labels):\n    return 0.0\n")
    tiny_doc["recipe"] = {"loss": "hooks.py:loss"}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    assert main(["search", "--space", str(space), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: recipe.loss: must return a scalar tensor, but returned float"]
    assert not (tmp_path / "r" / "tiny").exists()  # nothing half-written


def test_a_loss_for_the_models_classes_passes_the_probe(tmp_path):
    """A class-weighted cross-entropy needs logits as wide as the model's: the probe is."""
    (tmp_path / "hooks.py").write_text(
        "import torch\nimport torch.nn.functional as F\n"
        "def weighted(logits, labels):\n"
        "    return F.cross_entropy(logits, labels, weight=torch.linspace(1, 2, 10))\n"
    )
    doc = copy.deepcopy(TINY)
    doc["recipe"] = {"loss": "hooks.py:weighted"}
    base, _ = setups(parse_space(doc, source=tmp_path / "s.yaml"), 10)
    assert base.loss is not None
    with pytest.raises(SpaceError, match=r"recipe.loss: calling it with logits \(4, 3\)"):
        setups(parse_space(doc, source=tmp_path / "s.yaml"), 3)


def test_recipe_hooks_resolve_against_the_space_file(tmp_path):
    (tmp_path / "hooks.py").write_text(
        "import torch\ndef sgd(p, lr):\n    return torch.optim.SGD(p, lr)\n"
    )
    doc = copy.deepcopy(TINY)
    doc["recipe"] = {"optimizer": "hooks.py:sgd", "grad_clip": 1.0}
    space = parse_space(doc, source=tmp_path / "s.yaml")
    assert space.recipe.optimizer == f"{tmp_path / 'hooks.py'}:sgd"
    base, tune = setups(space, 10)
    assert base.optimizer is tune.optimizer and tune.grad_clip == 1.0


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("where", ["baseline", "finetune"])
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_a_device_that_is_not_one_is_refused_by_the_space_file(where, device):
    doc = copy.deepcopy(TINY)
    section = doc["baseline"] if where == "baseline" else doc["space"]["finetune"]
    section["device"] = device
    path = "baseline.device" if where == "baseline" else "space.finetune.device"
    with pytest.raises(SpaceError, match=rf"^{path}: .* is not a device; choose from auto, cpu"):
        parse_space(doc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_an_error():
    assert resolve_device("auto", "baseline.device") == torch.device("cpu")
    with pytest.raises(
        SpaceError, match=r"^space.finetune.device: cuda:1, but this machine has no"
    ):
        resolve_device("cuda:1", "space.finetune.device")


def test_the_baseline_cache_key_reads_where_it_trains_not_how_it_is_spelled():
    doc = copy.deepcopy(TINY)
    key = baseline_key(parse_space(doc))
    doc["baseline"]["device"] = "cpu"
    doc["space"]["finetune"]["device"] = "cpu"  # fine-tuning is not the baseline's
    same = baseline_key(parse_space(doc))
    doc["recipe"] = {"amp": False}  # mixed precision is CUDA's: no new CPU baseline
    no_amp = baseline_key(parse_space(doc))
    doc["recipe"] = {"weight_decay": 0.01}
    other = baseline_key(parse_space(doc))
    if not torch.cuda.is_available():
        assert key == same == no_amp
    assert other != same


def test_a_study_with_finetune_device_cpu_runs_through_the_cli(tmp_path, tiny_doc, capsys):
    tiny_doc["baseline"]["device"] = "cpu"
    tiny_doc["space"]["finetune"]["device"] = "cpu"
    tiny_doc["recipe"] = {"weight_decay": 0.01, "grad_clip": 5.0}
    tiny_doc["search"] = {"trials": 3, "seed": 0, "anchors": 0}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    assert main(["search", "--space", str(space), "--results", str(tmp_path / "r")]) == 0
    assert "baseline: training 3 epochs on cpu" in capsys.readouterr().out
    trials = pd.read_csv(tmp_path / "r" / "tiny" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    stored = (tmp_path / "r" / "tiny" / "space.yaml").read_text()
    assert "device: cpu" in stored and "weight_decay: 0.01" in stored


# --------------------------------------------------------------------------- CUDA


@CUDA
@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_returns_the_model_to_the_cpu(amp):
    model = _model()
    setup = Setup(device=torch.device("cuda"), amp=amp)
    losses = train(model, _split(256), _recipe(setup, epochs=5))
    assert next(model.parameters()).device.type == "cpu"
    assert losses[-1] < losses[0]


@CUDA
def test_a_study_fine_tunes_on_cuda_and_measures_on_the_cpu(tmp_path, tiny_doc):
    tiny_doc["baseline"]["device"] = "cuda"
    tiny_doc["space"]["finetune"]["device"] = "cuda"
    tiny_doc["space"]["pruning"]["schedule"] = ["one_shot", "gradual"]
    tiny_doc["space"]["quantization"]["method"] = ["ptq", "qat"]
    tiny_doc["space"]["distillation"] = {"alpha": 0.5}
    tiny_doc["search"] = {"trials": 5, "seed": 0, "anchors": 0}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    assert main(["search", "--space", str(space), "--results", str(tmp_path / "r")]) == 0
    trials = pd.read_csv(tmp_path / "r" / "tiny" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    assert (trials.loc[1:, "latency_ms"] > 0).all()  # timed in ONNX Runtime on the CPU


def test_weight_decay_beside_an_own_optimizer_is_refused():
    doc = copy.deepcopy(TINY)
    doc["recipe"] = {"optimizer": "torch.optim:SGD", "weight_decay": 0.1}
    with pytest.raises(SpaceError, match=r"^recipe.weight_decay: applies to the default"):
        parse_space(doc)


def test_workers_on_a_machine_with_several_gpus_take_one_each(monkeypatch):
    """auto and cuda train on the worker's own GPU; cuda:N stays N, and the current
    device (which a CUDA latency target times on) is left alone."""
    from paretoopt.compress import recipe

    monkeypatch.setattr(recipe, "_WORKER_GPU", None)  # restored afterwards
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device"))
    trained = []
    for worker in range(5):
        assert pin_worker_gpu(worker) == worker % 3
        trained.append(resolve_device("auto", "space.finetune.device").index)
        assert resolve_device("cuda", "baseline.device").index == worker % 3
        assert resolve_device("cuda:0", "baseline.device").index == 0
    assert trained == [0, 1, 2, 0, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(recipe, "_WORKER_GPU", None)
    assert pin_worker_gpu(1) is None  # one GPU: every worker shares it
    assert resolve_device("auto", "baseline.device").index == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_study_goes_on_training_where_it_started(tmp_path, tiny_doc, capsys):
    """A study that fine-tuned on a GPU is not continued on this machine's CPU under
    `auto`; one from before the device settings (no record) trained on the CPU."""
    tiny_doc["search"] = {"trials": 1, "seed": 0, "anchors": 0}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    results = tmp_path / "r"
    assert main(["search", "--space", str(space), "--results", str(results)]) == 0
    run = results / "tiny" / "run.json"
    meta = json.loads(run.read_text())
    assert meta["training"] == {"baseline": "cpu", "finetune": "cpu"}
    del meta["training"]  # as a study from before the device settings
    run.write_text(json.dumps(meta))
    tiny_doc["search"]["trials"] = 2
    write_space(space, tiny_doc)
    assert main(["search", "--space", str(space), "--results", str(results)]) == 0
    meta = json.loads(run.read_text())
    meta["training"]["finetune"] = "cuda"  # as if it had started on a GPU machine
    run.write_text(json.dumps(meta))
    tiny_doc["search"]["trials"] = 3
    write_space(space, tiny_doc)
    capsys.readouterr()
    assert main(["search", "--space", str(space), "--results", str(results)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: space.finetune.device: study 'tiny' has trained on cuda so far, but 'auto' "
        "trains on cpu here; set space.finetune.device: cuda to go on as it started, or use "
        "another study name"
    )


def test_gradient_saliency_reads_the_recipes_loss():
    """taylor and hessian rank weights by the gradients of what fine-tuning minimises."""
    from paretoopt.compress.techniques.saliency import gradient_stats

    model, split = _model(), _split()
    default = gradient_stats(model, split, "mean", 2, 0, batch_size=16)
    flat = gradient_stats(model, split, "mean", 2, 0, 16, loss=lambda z, y: z.sum() * 0.0)
    assert any(float(t.abs().sum()) > 0 for t in default.values())
    assert all(float(t.abs().sum()) == 0 for t in flat.values())
