from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from paretoopt.cli import main
from paretoopt.results.frames import load_results

from .conftest import write_space

HERE = Path(__file__).resolve().parent


def run_cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short study shared by the tests that only read it."""
    from .conftest import TINY

    root = tmp_path_factory.mktemp("study")
    space = write_space(root / "tiny.yaml", TINY)
    assert run_cli("search", "--space", str(space), "--results", str(root / "results")) == 0
    return root, space


def test_search_writes_every_output(finished):
    root, _ = finished
    study = root / "results" / "tiny"
    for name in ("space.yaml", "run.json", "trials.csv", "pareto.csv", "study.journal"):
        assert (study / name).is_file(), name
    trials = pd.read_csv(study / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2]
    assert trials.loc[0, "baseline"] and trials.loc[0, "plan"] == "dense, fp32"
    assert (trials["state"] == "COMPLETE").all()
    meta = json.loads((study / "run.json").read_text())
    assert meta["baseline"]["accuracy"] == pytest.approx(trials.loc[0, "accuracy"])
    assert meta["hardware"]["cores"] >= 1 and meta["versions"]["optuna"]
    (session,) = meta["sessions"]
    assert session["baseline_source"] == "trained"
    assert session["calibration"]["measured_ms"] > 0
    assert meta["reference_ms"] == session["calibration"]["reference_ms"]


def test_size_is_the_byte_count_of_the_front_artifacts(finished):
    root, _ = finished
    results = load_results(root / "results" / "tiny")
    assert len(results.pareto) >= 1
    for _, row in results.pareto.iterrows():
        artifact = root / "results" / "tiny" / row["artifact"] / "model.safetensors"
        assert artifact.stat().st_size == row["size_bytes"]
    kept = {p.name for p in (root / "results" / "tiny" / "trials").iterdir()}
    assert kept == {str(n) for n in results.pareto["number"]} | {"0"}


def test_the_front_is_measured_again_when_the_search_ends(finished):
    root, _ = finished
    results = load_results(root / "results" / "tiny")
    meta = json.loads((root / "results" / "tiny" / "run.json").read_text())
    front = {str(n) for n in results.pareto["number"] if n != 0}
    assert set(meta["confirmations"]) == front
    for _, row in results.pareto.iterrows():
        if row["number"] == 0:
            continue
        confirmation = meta["confirmations"][str(row["number"])]
        assert row["confirm_latency_ms"] == confirmation["latency_ms"] > 0
        assert confirmation["mode"] == "cpu" and confirmation["runs"] == 2 * 5
        # the search-time figure stays beside it
        assert row["latency_ms"] > 0 and row["confirm_speedup"] > 0


def test_resume_continues_to_the_new_total_and_reuses_the_baseline(finished, tmp_path):
    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    assert run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4") == 0
    trials = pd.read_csv(results / "tiny" / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2, 3]
    meta = json.loads((results / "tiny" / "run.json").read_text())
    assert meta["sessions"][1]["baseline_source"] == "cache"
    # one latency scale per study: the first calibration's reference is kept
    first, second = (s["calibration"] for s in meta["sessions"])
    assert meta["reference_ms"] == first["reference_ms"] == second["reference_ms"]
    assert second["measured_ms"] > 0
    # the same command again has nothing left to do
    assert run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4") == 0
    assert len(pd.read_csv(results / "tiny" / "trials.csv")) == 4


def test_resume_refuses_a_changed_space(finished, tmp_path, capsys):
    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    doc = yaml.safe_load(space.read_text())
    doc["space"]["quantization"]["bits"] = [2, 4]
    changed = write_space(tmp_path / "tiny.yaml", doc)
    assert run_cli("search", "--space", str(changed), "--results", str(results)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study 'tiny' in ")
    assert "space.quantization.bits: [4, 8, 32] then, [2, 4] now" in err


def test_a_setting_added_since_the_study_began_does_not_block_its_resume(tiny_doc):
    """A space.yaml written before a setting existed reads as that setting's default; a
    setting it holds at another value is still a difference."""
    from paretoopt.config.space import parse_space, space_to_dict
    from paretoopt.study.session import space_difference

    space = parse_space(tiny_doc)
    older = space_to_dict(space)
    del older["search"]["anchors"]  # its default is what such a study did (none: resumed)
    assert space_difference(older, space) == ""
    older["target"]["iterations"] = 100
    assert space_difference(older, space) == "target.iterations: 100 then, 5 now"
    # the warm-up before warmup_tolerance existed was a fixed one: tolerance 0
    older = space_to_dict(space)
    del older["target"]["warmup_tolerance"]
    assert space_difference(older, space) == "target.warmup_tolerance: 0.0 then, 0.03 now"


def test_interrupted_trials_are_failed_and_replaced(finished, tmp_path):
    import optuna

    from paretoopt.results.frames import journal_storage

    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    storage = journal_storage(results / "tiny")
    study = optuna.load_study(study_name="tiny", storage=storage)
    study.ask()  # a trial left RUNNING, as by a process killed mid-trial
    assert run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4") == 0
    trials = pd.read_csv(results / "tiny" / "trials.csv")
    assert trials.loc[3, "state"] == "FAIL"
    assert trials.loc[3, "fail_reason"].startswith("interrupted")
    assert (trials["state"] == "COMPLETE").sum() == 4


def test_user_model_and_dataset_factories(tmp_path):
    shutil.copy(HERE / "user_model.py", tmp_path / "user_model.py")
    doc = {
        "study": "signals",
        "model": {"factory": "user_model.py:build", "kwargs": {"channels": 8}},
        "data": {"factory": "user_model.py:signals"},
        "baseline": {"epochs": 4},
        "target": {"warmup": 1, "repeats": 2, "iterations": 3, "sessions": 2, "quiet_s": 0.0},
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 3, "sampler": "random"},
        "space": {
            "pruning": {
                "structure": "channel",
                "sparsity": {"low": 0.3, "high": 0.5},
                "distribution": "per_layer",
            },
            "quantization": {"bits": [4]},
            "finetune": {"epochs": 1},
        },
    }
    space = write_space(tmp_path / "signals.yaml", doc)
    assert run_cli("search", "--space", str(space), "--results", str(tmp_path / "r")) == 0
    trials = pd.read_csv(tmp_path / "r" / "signals" / "trials.csv")
    assert (trials["state"] == "COMPLETE").all(), trials["fail_reason"].tolist()
    channel = trials[trials["plan"].str.startswith("channel")]
    assert len(channel) == 2
    assert (channel["latency_ms"] > 0).all()
    layer_params = [c for c in trials.columns if c.startswith("param.prune.layer.")]
    assert "param.prune.layer.block.dw" in layer_params
    assert "param.prune.layer.out" not in layer_params  # the classifier keeps its outputs


def fragile_study(trials: int) -> dict:
    """A study of tests/user_model.py's Fragile model, which channel pruning breaks."""
    return {
        "study": "fragile",
        "model": {"factory": "user_model.py:build_fragile"},
        "data": {"factory": "user_model.py:signals"},
        "baseline": {"epochs": 2},
        "target": {
            "warmup": 1,
            "warmup_s": 0.0,
            "repeats": 1,
            "iterations": 2,
            "sessions": 2,
            "quiet_s": 0.0,
        },
        "search": {"trials": trials, "sampler": "random"},
        "space": {
            "pruning": {"structure": "channel", "sparsity": 0.3},
            "quantization": {"bits": 8},
            "finetune": {"epochs": 1},
        },
    }


def test_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    shutil.copy(HERE / "user_model.py", tmp_path / "user_model.py")
    doc = fragile_study(trials=3)
    space = write_space(tmp_path / "fragile.yaml", doc)
    assert run_cli("search", "--space", str(space), "--results", str(tmp_path / "r")) == 0
    trials = pd.read_csv(tmp_path / "r" / "fragile" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "FAIL"]
    assert trials.loc[1, "fail_reason"] == ("ValueError: needs features in multiples of 8, has 11")


def test_max_failures_stops_a_study_that_keeps_failing(tmp_path, capsys):
    shutil.copy(HERE / "user_model.py", tmp_path / "user_model.py")
    doc = fragile_study(trials=10)
    space = write_space(tmp_path / "fragile.yaml", doc)
    args = ["search", "--space", str(space), "--results", str(tmp_path / "r")]
    assert run_cli(*args, "--max-failures", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-failures: 2 trials of this session failed (limit 2)")
    assert "2x ValueError: needs features in multiples of 8, has 11" in err
    trials = load_results(tmp_path / "r" / "fragile").trials
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "FAIL"]  # the finished ones are kept


def test_a_second_process_on_the_same_study_is_refused(finished, tmp_path, capsys):
    from paretoopt.study.session import _lock

    root, space = finished
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    held = _lock(results / "tiny", "tiny")  # as if another search were running
    try:
        code = run_cli("search", "--space", str(space), "--results", str(results), "--trials", "4")
    finally:
        held.close()
    assert code == 2
    assert "is in use by another paretoopt process" in capsys.readouterr().err
    assert len(pd.read_csv(results / "tiny" / "trials.csv")) == 3


def test_a_failed_baseline_is_queued_again_and_does_not_count():
    import optuna
    from optuna.trial import TrialState

    from paretoopt.results.frames import BASELINE_ATTR
    from paretoopt.study.session import ensure_baseline, finished

    study = optuna.create_study(directions=["maximize", "minimize"])
    ensure_baseline(study)
    trial = study.ask()
    assert trial.user_attrs[BASELINE_ATTR]
    study.tell(trial, state=TrialState.FAIL)
    assert finished(study) == 0
    ensure_baseline(study)
    ensure_baseline(study)  # queued once, not twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[BASELINE_ATTR] for t in waiting] == [True]


def test_show_prints_the_front_and_refuses_a_study_without_storage(finished, tmp_path, capsys):
    root, _ = finished
    assert run_cli("show", "--study", "tiny", "--results", str(root / "results")) == 0
    assert "Pareto front of tiny" in capsys.readouterr().out
    broken = tmp_path / "results" / "tiny"
    broken.mkdir(parents=True)
    shutil.copy(root / "results" / "tiny" / "space.yaml", broken / "space.yaml")
    assert run_cli("show", "--study", "tiny", "--results", str(tmp_path / "results")) == 2
    assert "study.journal is missing" in capsys.readouterr().err
    assert not (broken / "study.journal").exists()


@pytest.mark.slow
def test_a_killed_search_resumes_to_the_requested_count(tmp_path, tiny_doc):
    """SIGKILL a real search process mid-study, rerun the same command, lose nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    from paretoopt.results.frames import journal_storage

    tiny_doc["search"]["trials"] = 6
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    command = [
        sys.executable,
        "-m",
        "paretoopt.cli",
        "search",
        "--space",
        str(space),
        "--results",
        str(tmp_path / "r"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "r" / "tiny" / "study.journal"
    deadline = time.monotonic() + 120
    complete = 0
    while complete < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        if journal.is_file():
            study = optuna.load_study(study_name="tiny", storage=journal_storage(journal.parent))
            complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert process.poll() is None, "the search ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert subprocess.run(command, capture_output=True).returncode == 0
    trials = pd.read_csv(tmp_path / "r" / "tiny" / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 6
    failed = trials[trials["state"] == "FAIL"]
    assert all(reason.startswith("interrupted") for reason in failed["fail_reason"])
    assert not list((tmp_path / "r" / "tiny" / "trials").glob("*.partial"))


def test_killed_at_three_moments_a_search_loses_only_running_trials(tmp_path, tiny_doc):
    """SIGKILL a real search at moments read from its own journal: while the baseline
    runs, mid-trial with trials already complete, and after the last trial (the end of
    the search: clean-up, confirmation, tables). Rerun the same command each time: every
    trial completed before a kill is still complete at the end, and the study reaches
    its count."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    from paretoopt.results.frames import journal_storage

    total = 8
    tiny_doc["search"]["trials"] = total
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    command = [sys.executable, "-m", "paretoopt.cli", "search", "--space", str(space)]
    command += ["--results", str(tmp_path / "r")]
    journal = tmp_path / "r" / "tiny" / "study.journal"

    def states() -> dict[int, str]:
        if not journal.is_file():
            return {}
        study = optuna.load_study(study_name="tiny", storage=journal_storage(journal.parent))
        return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}

    def completed() -> set[int]:
        return {n for n, state in states().items() if state == "COMPLETE"}

    moments = {  # what the journal shows when the kill comes
        "baseline": lambda s: s.get(0) == "RUNNING",
        "mid-trial": lambda s: (
            sum(v == "COMPLETE" for v in s.values()) >= 3 and "RUNNING" in s.values()
        ),
        "end of search": lambda s: sum(v == "COMPLETE" for v in s.values()) == total,
    }
    kept: set[int] = set()
    for moment, reached in moments.items():
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while process.poll() is None and not reached(states()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, f"the search ended before the {moment} kill"
        assert reached(states()), f"the search never reached the {moment} moment"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        now = completed()
        assert kept <= now, f"completed trials were lost at the {moment} kill"
        kept = now
        if moment != "baseline":
            assert kept, "no trial had completed: the check would compare empty sets"
    assert subprocess.run(command, capture_output=True).returncode == 0
    final = completed()
    assert kept <= final and len(final) == total
    trials = pd.read_csv(tmp_path / "r" / "tiny" / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == total
    assert all(
        r.startswith("interrupted") for r in trials.loc[trials["state"] == "FAIL", "fail_reason"]
    )
    assert not list((tmp_path / "r" / "tiny" / "trials").glob("*.partial"))
    for _, row in load_results(tmp_path / "r" / "tiny").pareto.iterrows():
        assert (tmp_path / "r" / "tiny" / row["artifact"] / "model.safetensors").is_file()


def _slower(doc: dict, trials: int) -> dict:
    """Enough trials, each long enough, that a helper (which first imports torch and
    prepares its baseline, a few seconds) still finds trials to run: every plan is
    fine-tuned in full (under successive halving, rejected plans end in a blink and the
    main process could run them all before the helper started)."""
    space = dict(doc["space"], finetune={"epochs": 6})
    return dict(doc, search={"trials": trials, "seed": 0, "fidelity": "full"}, space=space)


def test_two_workers_share_one_study_and_run_each_trial_once(tmp_path):
    from .conftest import TINY

    doc = _slower(TINY, trials=14)
    space = write_space(tmp_path / "tiny.yaml", doc)
    results = tmp_path / "results"
    args = ["search", "--space", str(space), "--results", str(results), "--workers", "2"]
    assert run_cli(*args) == 0
    frame = load_results(results / "tiny").trials
    assert list(frame["number"]) == list(range(14))  # each trial counted once
    assert frame["state"].isin(["COMPLETE", "PRUNED"]).all()
    import optuna

    from paretoopt.results.frames import journal_storage

    study = optuna.load_study(study_name="tiny", storage=journal_storage(results / "tiny"))
    workers = {t.user_attrs["worker"] for t in study.get_trials()}
    assert len(workers) == 2  # both processes ran trials
    assert sum(t.user_attrs.get("paretoopt.baseline", False) for t in study.get_trials()) == 1


def test_a_helper_killed_mid_trial_is_replaced_in_the_same_session(tmp_path):
    """`--workers 2` on the journal file: SIGKILL the helper while it runs a trial. The
    search still ends with the requested number of complete trials, and the helper's
    trial is failed as interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    from paretoopt.results.frames import journal_storage

    from .conftest import TINY

    doc = _slower(TINY, trials=14)
    space = write_space(tmp_path / "tiny.yaml", doc)
    command = [sys.executable, "-m", "paretoopt.cli", "search", "--space", str(space)]
    command += ["--results", str(tmp_path / "r"), "--workers", "2"]
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "r" / "tiny" / "study.journal"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and search.poll() is None:
        time.sleep(0.1)
        if not journal.is_file():
            continue
        study = optuna.load_study(study_name="tiny", storage=journal_storage(journal.parent))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = t.user_attrs.get("worker")
            if pid not in (None, search.pid) and "plan_summary" in t.user_attrs:
                os.kill(pid, signal.SIGKILL)
                killed = t.number
                break
    assert killed is not None, "the helper never ran a trial"
    assert search.wait(timeout=180) == 0
    trials = pd.read_csv(tmp_path / "r" / "tiny" / "trials.csv")
    assert trials["state"].isin(["COMPLETE", "PRUNED"]).sum() == 14  # PRUNED: halving
    lost = trials[trials["number"] == killed].iloc[0]
    assert lost["state"] == "FAIL" and lost["fail_reason"].startswith("interrupted")


def test_a_search_starts_with_its_anchor_plans(tmp_path, tiny_doc):
    """Right after the baseline, the anchors run (here one: a quarter of 5 trials)."""
    import optuna

    from paretoopt.results.frames import journal_storage
    from paretoopt.study.anchors import ANCHOR_ATTR

    tiny_doc["search"] = {"trials": 5, "seed": 0}
    space = write_space(tmp_path / "tiny.yaml", tiny_doc)
    assert run_cli("search", "--space", str(space), "--results", str(tmp_path / "r")) == 0
    study = optuna.load_study(study_name="tiny", storage=journal_storage(tmp_path / "r" / "tiny"))
    anchored = [t for t in study.trials if ANCHOR_ATTR in t.user_attrs]
    assert [t.number for t in anchored] == [1]
    assert anchored[0].params["prune.structure"] == "channel"
    assert anchored[0].params["prune.channel.sparsity"] == pytest.approx(0.35)  # the middle
    assert anchored[0].params["quant.bits"] == 8  # of 4, 8, 32
    assert anchored[0].user_attrs["plan"]["prune"]["structure"] == "channel"


def test_the_sampler_is_told_no_accuracy_above_the_baseline(tiny_doc):
    """A gain over the baseline is told to the sampler as the baseline's accuracy; the
    record (and the front built from it) keeps the measured figure."""
    from paretoopt.config.space import parse_space
    from paretoopt.study.loop import told_values

    space = parse_space(tiny_doc)  # objectives: accuracy, size, latency
    base = {"accuracy": 98.0, "size_bytes": 1000, "latency_ms": 0.2}
    better = {"accuracy": 98.74, "size_bytes": 900, "latency_ms": 0.1}
    assert told_values(space, better, base) == [98.0, 900.0, 0.1]
    assert better["accuracy"] == 98.74
    worse = {"accuracy": 97.0, "size_bytes": 900, "latency_ms": 0.1}
    assert told_values(space, worse, base) == [97.0, 900.0, 0.1]
    size_only = parse_space({**tiny_doc, "objectives": ["size", "latency"]})
    assert told_values(size_only, better, base) == [900.0, 0.1]


def test_a_baseline_queued_again_runs_before_the_anchors(tmp_path, tiny_doc):
    """The anchors are queued once the baseline is done: a baseline whose worker died is
    queued again and claimed first, never behind the anchors."""
    from types import SimpleNamespace

    import optuna

    from paretoopt.config.space import parse_space
    from paretoopt.results.frames import BASELINE_ATTR
    from paretoopt.study.anchors import ANCHOR_ATTR
    from paretoopt.study.loop import _claim
    from paretoopt.study.session import ensure_baseline

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space({**tiny_doc, "search": {"trials": 20, "seed": 0}})
    study = optuna.create_study(directions=space.directions)
    session = SimpleNamespace(study=study, space=space, storage=None, directory=tmp_path)
    ctx = SimpleNamespace(layer_names=["0", "3"], quant_layers=None)
    ensure_baseline(study)
    first = _claim(session, ctx)
    assert first.user_attrs.get(BASELINE_ATTR)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # its worker died
    again = _claim(session, ctx)  # queued again, and claimed: no anchor went first
    assert again.user_attrs.get(BASELINE_ATTR) and again.number == 1
    study.tell(again, [99.0, 1000.0, 0.2])
    ranks = [_claim(session, ctx).user_attrs.get(ANCHOR_ATTR) for _ in range(4)]
    assert ranks == [1, 2, 3, None]  # then the anchors, then the sampler
