"""Workloads beyond images: a transformer over int64 token ids, end to end through the CLI."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from paretoopt import load
from paretoopt.cli import main
from paretoopt.results.frames import load_results, trial_record

from .conftest import write_space
from .text_model import CLASSES, LENGTH, sentences

HERE = Path(__file__).parent
QUICK_TARGET = {"warmup": 1, "warmup_s": 0.0, "repeats": 2, "iterations": 3, "quiet_s": 0.0}


@pytest.fixture(scope="module")
def text_study(tmp_path_factory):
    """A finished search of the token-id transformer: the baseline and two channel-pruned
    plans (half the MLP's hidden units and of each attention head's width)."""
    root = tmp_path_factory.mktemp("text")
    shutil.copy(HERE / "text_model.py", root / "text_model.py")
    doc = {
        "study": "text",
        "model": {"factory": f"{root / 'text_model.py'}:build"},
        "data": {"factory": f"{root / 'text_model.py'}:sentences"},
        "baseline": {"epochs": 12},
        "target": QUICK_TARGET,
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 3, "sampler": "random", "anchors": 0},
        "space": {
            "pruning": {"structure": "channel", "sparsity": 0.5},
            "quantization": {"bits": 8},
            "finetune": {"epochs": 3},
        },
    }
    space = write_space(root / "text.yaml", doc)
    assert main(["search", "--space", str(space), "--results", str(root / "r")]) == 0
    return root, space


def test_token_ids_reach_the_model_as_int64_and_every_trial_completes(text_study):
    root, _ = text_study
    trials = pd.read_csv(root / "r" / "text" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    assert trials.loc[0, "accuracy"] > 90.0  # the baseline learned the task
    results = load_results(root / "r" / "text")
    assert results.metadata["inputs"]["inputs"] == [
        {"name": "0", "shape": [LENGTH], "dtype": "int64"}
    ]


def test_channel_pruning_narrows_attention_and_the_mlp(text_study):
    """Half the hidden units of the encoder's MLP go, and each of the 4 heads keeps half
    its width (embed_dim 32 -> 16, still a multiple of num_heads)."""
    root, _ = text_study
    results = load_results(root / "r" / "text")
    channels = trial_record(results, 1).layer_channels
    assert channels["encoder.layers.0.linear1"] == [32, 64]
    assert channels["encoder.layers.0.self_attn.out_proj"] == [16, 32]
    assert channels["head"] == [CLASSES, CLASSES]


def test_a_pruned_transformer_exports_verified_and_loads(text_study, tmp_path):
    root, space = text_study
    trials = pd.read_csv(root / "r" / "text" / "trials.csv")
    kept = trials[~trials["baseline"] & trials["artifact"].notna()]  # on the front
    number = int(kept["number"].iloc[0])
    out = tmp_path / "x"
    code = main(["export", "--study", "text", "--results", str(root / "r"), "--trial",
                 str(number), "--out", str(out), "--space", str(space)])  # fmt: skip
    assert code == 0
    _, _, test = sentences()
    ids = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    labels = np.array([int(test[i][1]) for i in range(len(test))])
    assert ids.dtype == np.int64 and ids.shape[1:] == (LENGTH,)
    figures = {}
    for name in ("onnx", "pt2", "safetensors"):
        model = load(out / f"text-trial{number}.{name}", space=space)
        figures[name] = model.accuracy(ids, labels)
    assert len(set(figures.values())) == 1, figures  # the three files are one model
    recorded = trials.set_index("number").loc[number, "test_accuracy"]
    assert figures["onnx"] == pytest.approx(recorded, abs=1e-9)


# --------------------------------------------------------------------------- streamed data

SIGNALS = {
    "model": {"factory": "user_model.py:build", "kwargs": {"channels": 8}},
    "baseline": {"epochs": 10},
    "target": QUICK_TARGET,
    "constraints": {"max_accuracy_drop": None},
    "search": {"trials": 3, "sampler": "random", "anchors": 0},
    "space": {
        "pruning": {"structure": "channel", "sparsity": 0.4},
        "distillation": {"temperature": 2.0, "alpha": 0.5},
        "finetune": {"epochs": 1},
    },
}


@pytest.fixture
def in_signals(tmp_path, monkeypatch):
    shutil.copy(HERE / "user_model.py", tmp_path / "user_model.py")
    monkeypatch.chdir(tmp_path)  # user factories are named relative to where one runs
    return tmp_path


def test_a_streamed_split_trains_exactly_as_the_same_data_in_memory(in_signals):
    """memory_mb 0 streams a map-style dataset: the same batches in the same order, so
    the same losses and weights to the bit."""
    from paretoopt.compress.train import Recipe, train
    from paretoopt.config.space import ComponentSpec
    from paretoopt.workload.data import StreamSplit, create_data

    from .user_model import build

    spec = ComponentSpec(factory="user_model.py:signals")
    held = create_data(spec)
    streamed = create_data(ComponentSpec(factory="user_model.py:signals", memory_mb=0))
    assert isinstance(streamed.train, StreamSplit) and held.train.in_memory
    assert len(streamed.train) == len(held.train) == 200
    assert torch.equal(streamed.val.head(50), held.val.x)
    results = []
    for splits in (held, streamed):
        torch.manual_seed(0)
        model = build()
        losses = train(model, splits.train, Recipe(epochs=2, lr=1e-3, batch_size=16, seed=3))
        results.append((losses, model.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_a_study_over_a_dataloader_and_iterable_datasets_completes(in_signals):
    """The train split is the user's own shuffling DataLoader, val and test iterable
    datasets without len(): streamed, distilled from a teacher run on each batch."""
    doc = {"study": "streams", "data": {"factory": "user_model.py:streams"}, **SIGNALS}
    space = write_space(in_signals / "streams.yaml", doc)
    assert main(["search", "--space", str(space), "--results", str(in_signals / "r")]) == 0
    trials = pd.read_csv(in_signals / "r" / "streams" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    assert trials.loc[0, "accuracy"] > 60.0  # three classes: the baseline learned
    results = load_results(in_signals / "r" / "streams")
    assert results.metadata["splits"] == {"train": 200, "val": 50, "test": 50}
    record = trial_record(results, 1)
    assert len(record.finetune_loss) == 1 and record.layer_channels["fc"][0] < 16


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("bad_labels", "item 0: the label -1 is negative; classes are 0, 1, ..."),
        ("bad_labels(stream=True)", "batch 0: the label -1 is negative; classes are 0, 1, ..."),
        ("bad_labels(at=150, stream=True)", "batch 4: the label -1 is negative"),
        ("bad_labels(label=7, at=150, stream=True)", "the data has a label 7, but the model"),
        ("nan_inputs", "item 3's input holds NaN or infinity"),
        ("nan_inputs(stream=True)", "batch 0: an input holds NaN or infinity"),
    ],
)
def test_bad_data_ends_in_one_line_before_the_baseline_is_trained(
    in_signals, capsys, factory, message
):
    name, _, args = factory.partition("(")
    kwargs = dict(eval(f"dict({args}", {})) if args else {}  # noqa: S307 - the test's own table
    doc = {"study": "bad", "data": {"factory": f"user_model.py:{name}", "kwargs": kwargs}}
    space = write_space(in_signals / "bad.yaml", {**doc, **SIGNALS})
    code = main(["search", "--space", str(space), "--results", str(in_signals / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (in_signals / "r" / "bad").exists()


# --------------------------------------------------------------------------- several inputs


def multi_study(root, name, model, data, quant):
    shutil.copy(HERE / "multi_model.py", root / "multi_model.py")
    shutil.copy(HERE / "text_model.py", root / "text_model.py")
    (root / "__init__.py").write_text("")
    doc = {
        "study": name,
        "model": {"factory": f"{root.name}.multi_model:{model}"},
        "data": {"factory": f"{root.name}.multi_model:{data}"},
        "baseline": {"epochs": 12},
        "target": QUICK_TARGET,
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 3, "sampler": "random", "anchors": 0},
        "space": {
            "pruning": {"structure": "channel", "sparsity": 0.5},
            "quantization": quant,
            "finetune": {"epochs": 2},
        },
    }
    return write_space(root / f"{name}.yaml", doc)


@pytest.mark.parametrize(
    ("model", "data", "quant", "layout"),
    [
        (
            "build_pairs",
            "pairs",
            {"bits": 8, "activations": "int8"},  # calibration feeds both inputs
            {"kind": "tuple", "inputs": [
                {"name": "0", "shape": [2, 32], "dtype": "float32"},
                {"name": "1", "shape": [4], "dtype": "float32"},
            ]},
        ),
        (
            "build_masked",
            "tokenized",
            {"bits": 8},
            {"kind": "dict", "inputs": [
                {"name": "input_ids", "shape": [LENGTH], "dtype": "int64"},
                {"name": "attention_mask", "shape": [LENGTH], "dtype": "bool"},
            ]},
        ),
    ],
)  # fmt: skip
def test_a_model_of_several_inputs_is_searched_exported_and_loaded(
    tmp_path, monkeypatch, model, data, quant, layout
):
    """Two positional inputs, and a dict of named ones: every trial completes, the
    pruned front trial exports verified, and the loaded files take the inputs as the
    data gives them."""
    root = tmp_path / "users"
    root.mkdir()
    monkeypatch.chdir(tmp_path)  # the factories are imported as users.multi_model
    space = multi_study(root, "multi", model, data, quant)
    assert main(["search", "--space", str(space), "--results", str(tmp_path / "r")]) == 0
    trials = pd.read_csv(tmp_path / "r" / "multi" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    assert trials.loc[0, "accuracy"] > 80.0
    results = load_results(tmp_path / "r" / "multi")
    assert results.metadata["inputs"] == layout
    kept = trials[~trials["baseline"] & trials["artifact"].notna()]
    number = int(kept["number"].iloc[0])
    assert any(k < w for k, w in trial_record(results, number).layer_channels.values())
    out = tmp_path / "x"
    code = main(["export", "--study", "multi", "--results", str(tmp_path / "r"), "--trial",
                 str(number), "--out", str(out), "--space", str(space)])  # fmt: skip
    assert code == 0
    _, _, test = __import__("users.multi_model", fromlist=[data]).__dict__[data]()
    x, y = zip(*(test[i] for i in range(len(test))), strict=True)
    if layout["kind"] == "dict":
        inputs = {k: torch.stack([s[k] for s in x]).numpy() for k in x[0]}
    else:
        inputs = tuple(torch.stack([s[i] for s in x]).numpy() for i in range(len(x[0])))
    labels = torch.stack(y).numpy()
    figures = {
        fmt: load(out / f"multi-trial{number}.{fmt}", space=space).accuracy(inputs, labels)
        for fmt in ("onnx", "pt2", "safetensors")
    }
    recorded = trials.set_index("number").loc[number, "test_accuracy"]
    assert figures["onnx"] == pytest.approx(recorded, abs=1e-9)
    assert figures["pt2"] == figures["safetensors"]


# --------------------------------------------------------------------------- samples per trial


def test_a_bounded_split_is_a_seeded_stratified_subset():
    from paretoopt.workload.data import Split, bounded

    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    split = Split(torch.arange(100.0)[:, None], y)
    part = bounded(split, 20, seed=4)
    assert len(part) == 20
    assert torch.bincount(part.y).tolist() == [12, 6, 2]  # each class in its share
    assert torch.equal(part.x, bounded(split, 20, seed=4).x)  # the same in every process
    assert not torch.equal(part.x, bounded(split, 20, seed=5).x)
    assert bool((part.x[1:] > part.x[:-1]).all())  # in the split's order
    assert bounded(split, 100, seed=4) is split and bounded(split, None, seed=4) is split


def test_trials_fine_tune_and_evaluate_on_the_bounded_samples(in_signals):
    doc = {
        "study": "bounded",
        "data": {"factory": "user_model.py:streams", "finetune_samples": 64,
                 "eval_samples": 25},
        **SIGNALS,
    }  # fmt: skip
    space = write_space(in_signals / "bounded.yaml", doc)
    assert main(["search", "--space", str(space), "--results", str(in_signals / "r")]) == 0
    trials = pd.read_csv(in_signals / "r" / "bounded" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    results = load_results(in_signals / "r" / "bounded")
    assert results.metadata["splits"] == {"train": 64, "val": 25, "test": 25}
    # 25 samples: every accuracy is a multiple of 4 points
    assert all(float(a / 4).is_integer() for a in trials["accuracy"])
    assert all(float(a / 4).is_integer() for a in trials["test_accuracy"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("eval_samples", 0, "data.eval_samples: expected a number of samples >= 1, or null, got 0"),
        ("finetune_samples", 2.5, "data.finetune_samples: expected a number of samples >= 1"),
        ("memory_mb", -1, "data.memory_mb: expected megabytes from 0 (stream every split)"),
        ("memory_mb", True, "data.memory_mb: expected megabytes"),
    ],
)
def test_bad_data_settings_name_their_key(tmp_path, capsys, tiny_doc, key, value, message):
    tiny_doc["data"] = {"name": "digits", "kwargs": {"size": 8}, key: value}
    space = write_space(tmp_path / "bad.yaml", tiny_doc)
    assert main(["search", "--space", str(space), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --------------------------------------------------------------------------- augmentation


def test_mixup_blends_a_batch_with_its_partners_and_their_labels():
    from paretoopt.compress.augment import Augment, augment

    x, y = torch.randn(8, 3), torch.arange(8)
    batch = augment(x, y, Augment(mixup=0.4), np.random.default_rng(1))
    again = augment(x, y, Augment(mixup=0.4), np.random.default_rng(1))
    assert torch.equal(batch.x, again.x) and batch.lam == again.lam  # seeded
    assert 0.0 < batch.lam < 1.0 and batch.changed
    order = batch.partners  # the labels are the sample indices here
    assert torch.allclose(batch.x, batch.lam * x + (1 - batch.lam) * x[order])


def test_cutmix_pastes_a_box_and_weights_the_labels_by_its_area():
    from paretoopt.compress.augment import Augment, augment

    x = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8)
    y = torch.arange(4)
    for seed in range(5):
        batch = augment(x, y, Augment(cutmix=1.0), np.random.default_rng(seed))
        moved = batch.partners != y  # a sample drawn as its own partner stays whole
        own = (batch.x == x).float().mean(dim=(1, 2, 3))[moved]
        assert bool((own == own[0]).all())  # one box for the batch
        assert float(own[0]) == pytest.approx(batch.lam, abs=1e-9)  # the labels' weight
        partner = batch.x[batch.x != x]
        assert bool(torch.isin(partner, x[batch.partners]).all())


def test_a_mixed_batch_is_taught_by_the_teacher_running_on_it():
    """Logits looked up for the unmixed samples would teach the wrong ones: poisoned
    precomputed logits leave training finite, because mixed batches never read them."""
    from paretoopt.compress.augment import Augment
    from paretoopt.compress.train import Recipe, Teacher, train
    from paretoopt.workload.data import Split

    from .user_model import build, signals

    train_set = signals()[0]
    split = Split(*train_set.tensors)
    teacher = Teacher(logits=torch.full((len(split), 3), float("nan")), model=build().eval())
    recipe = Recipe(1, 1e-3, 32, 0, temperature=2.0, alpha=0.5, augment=Augment(mixup=0.4))
    losses = train(build(), split, recipe, teacher_logits=teacher)
    assert all(np.isfinite(losses))
    with pytest.raises(Exception, match="diverged"):  # the lookup is what poisons it
        train(build(), split, Recipe(1, 1e-3, 32, 0, 2.0, 0.5), teacher_logits=teacher)


def test_the_users_transform_runs_on_every_training_batch():
    from paretoopt.compress.augment import Augment
    from paretoopt.compress.train import Recipe, train
    from paretoopt.workload.data import Split

    from .user_model import build, signals

    seen = []

    def flip(x):
        seen.append(x.shape[0])
        return x.flip(-1)

    split = Split(*signals()[0].tensors)
    train(build(), split, Recipe(2, 1e-3, 64, 0, augment=Augment(transform=flip)))
    assert seen == [64, 64, 64, 8] * 2  # 200 samples, two epochs


def test_mixup_on_token_ids_is_refused_with_its_reason(text_study, capsys):
    root, space = text_study
    doc = yaml.safe_load(space.read_text())
    doc["space"]["finetune"]["mixup"] = {"low": 0.0, "high": 0.4}
    bad = write_space(root / "mixed.yaml", doc)
    assert main(["search", "--space", str(bad), "--results", str(root / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: space.finetune.mixup: it blends real values, and the input 0 is int64; set "
        "it to 0 (off) for these inputs"
    ]
