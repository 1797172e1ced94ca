"""Contract tests every registered technique must pass."""

from __future__ import annotations

import copy

import pytest
import torch

from paretoopt.compress.techniques import ORDER, TECHNIQUES, Workbench, apply_plan
from paretoopt.compress.techniques.bench import find_classifier
from paretoopt.compress.train import logits_of
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import ComponentSpec
from paretoopt.workload.data import create_data
from paretoopt.workload.models import tiny_conv


@pytest.fixture(scope="module")
def bench_factory():
    splits = create_data(ComponentSpec(name="digits", kwargs={"size": 8}))
    torch.manual_seed(0)
    model = tiny_conv().eval()
    teacher = logits_of(model, splits.train.x)
    classifier = find_classifier(model, splits.train.x[:1])
    return lambda: Workbench(copy.deepcopy(model), splits, teacher, classifier)


def test_every_technique_is_registered_and_ordered(bench_factory):
    apply_plan(bench_factory(), CompressionPlan())  # registers the technique modules
    assert set(ORDER) == set(TECHNIQUES)


@pytest.mark.parametrize("name", ORDER)
def test_identity_plan_changes_nothing(name, bench_factory):
    apply_plan(bench_factory(), CompressionPlan())  # registers the technique modules
    bench = bench_factory()
    before = copy.deepcopy(bench.model.state_dict())
    TECHNIQUES[name](bench, CompressionPlan())
    after = bench.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not bench.masks and not bench.quantized and not bench.pruning_history


def test_find_classifier_uses_execution_order():
    class Reordered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 3)  # registered first, runs last
            self.body = torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    assert find_classifier(Reordered(), torch.zeros(1, 4)) == "head"


def test_techniques_run_by_stage_and_report_once_all_have_run(bench_factory, monkeypatch):
    from paretoopt.compress import techniques

    ran: list[str] = []
    monkeypatch.setattr(techniques, "TECHNIQUES", dict(techniques.TECHNIQUES))
    for name in ORDER:  # the built-ins, watched
        original = techniques.TECHNIQUES[name]
        techniques.TECHNIQUES[name] = techniques.Technique(
            name,
            original.stage,
            lambda b, p, f=original.apply, n=name: (ran.append(n), f(b, p))[1],
            original.report,
        )

    def report(bench: Workbench, plan: CompressionPlan) -> None:
        ran.append("report")

    techniques.register("watch", techniques.Stage.STRUCTURE, report=report)(
        lambda bench, plan: ran.append("watch")
    )
    with pytest.raises(ValueError, match="registered twice"):
        techniques.register("watch", techniques.Stage.WEIGHTS)(lambda bench, plan: None)
    bench = bench_factory()
    apply_plan(bench, CompressionPlan())
    # a structure technique runs with pruning, before fine-tuning; reports come last
    assert ran == ["lowrank", "prune", "watch", "cluster", "qat", "distill", "quantize", "report"]
    assert "layer_sparsity" in bench.records  # pruning's report ran too
    assert set(bench.timings) >= {"prune", "watch", "quantize"}


def test_every_saliency_the_space_offers_is_implemented():
    from paretoopt.compress.techniques.saliency import SALIENCIES
    from paretoopt.config.parts.prune import SALIENCIES as OFFERED

    assert tuple(SALIENCIES) == OFFERED


def test_a_technique_that_changes_the_architecture_says_how_the_file_replays_it():
    from paretoopt.compress.techniques import rebuilds

    # of the built-ins, factorization and channel removal change shapes, in that order
    factorization, pruning = rebuilds()
    assert (pruning.key, pruning.what) == ("pruning_history", "channel removal")
    assert (factorization.key, factorization.what) == ("factorization", "low-rank factorization")


def test_a_rebuild_key_is_one_technique_s(monkeypatch):
    from paretoopt.compress import techniques

    pruning = next(r for r in techniques.rebuilds() if r.key == "pruning_history")
    monkeypatch.setattr(techniques, "TECHNIQUES", dict(techniques.TECHNIQUES))
    with pytest.raises(ValueError, match="rebuild key 'pruning_history' is taken"):
        techniques.register("other", techniques.Stage.STRUCTURE, rebuild=pruning)(lambda b, p: None)
