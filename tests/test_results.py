from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest

from paretoopt.results.frames import pareto_mask


def brute_force(values, directions):
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    loss = values * signs
    out = []
    for i in range(len(loss)):
        dominated = any(
            np.all(loss[j] <= loss[i]) and np.any(loss[j] < loss[i])
            for j in range(len(loss))
            if j != i
        )
        out.append(not dominated)
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force_and_ignores_order(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, size=(40, 3)).astype(float)  # many ties on purpose
    directions = ["maximize", "minimize", "minimize"]
    mask = pareto_mask(values, directions)
    assert np.array_equal(mask, brute_force(values, directions))
    order = rng.permutation(len(values))
    assert np.array_equal(pareto_mask(values[order], directions), mask[order])


def test_pareto_mask_agrees_with_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(7)
    values = rng.random((30, 2))
    study = optuna.create_study(directions=["maximize", "minimize"])
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v)))
    ours = set(np.flatnonzero(pareto_mask(values, ["maximize", "minimize"])))
    assert ours == {t.number for t in study.best_trials}


def test_empty_input():
    assert pareto_mask(np.zeros((0, 3)), ["maximize", "minimize", "minimize"]).size == 0


def test_results_layer_does_not_import_torch():
    code = (
        "import sys, paretoopt, paretoopt.results.frames, paretoopt.config.space, "
        "paretoopt.config.plan; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_search_stays_a_function_after_its_module_is_imported():
    code = (
        "import paretoopt; f = paretoopt.search; import paretoopt.study.search; "
        "import paretoopt.results.frames; print(callable(paretoopt.search), paretoopt.search is f)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True True"


def test_a_compared_runtime_s_view_judges_each_trial_by_its_figures_there(tmp_path):
    import pandas as pd

    from paretoopt.results.frames import StudyResults, for_target

    def row(number, acc, ms, acc_ov, ms_ov, error=""):
        return {
            "number": number,
            "state": "COMPLETE",
            "baseline": number == 0,
            "feasible": True,
            "accuracy": acc,
            "size_bytes": 1000 // (number + 1),
            "latency_ms": ms,
            "speedup": 1.0 / ms,
            "confirm_latency_ms": ms,
            "accuracy@openvino": acc_ov,
            "latency_ms@openvino": ms_ov,
            "error@openvino": error,
        }

    trials = pd.DataFrame(
        [
            row(0, 99.0, 1.0, 98.0, 2.0),
            row(1, 98.5, 0.5, 96.0, 1.0),  # 2 points below the baseline there: out
            row(2, 98.0, 0.4, 97.5, 0.5),
            row(3, 97.5, 0.3, None, None, "RuntimeError: cannot convert"),
        ]
    )
    baseline = {"accuracy": 99.0, "size_bytes": 1000, "latency_ms": 1.0}
    baseline["compared"] = {"openvino": {"accuracy": 98.0, "latency_ms": 2.0}}
    results = StudyResults(
        "s",
        tmp_path,
        trials,
        trials,
        baseline,
        {},
        constraints={"max_accuracy_drop": 1.0},
        runtime="onnxruntime",
        compared=("openvino",),
        shown_runtime="onnxruntime",
    )
    view = for_target(results, "openvino")
    by = view.trials.set_index("number")
    assert list(by["feasible"]) == [True, False, True, False]
    assert by.loc[2, "speedup"] == pytest.approx(4.0)  # 2.0 ms there / 0.5 ms there
    assert by.loc[2, "accuracy_change"] == pytest.approx(-0.5)
    assert by.loc[3, "error"] == "RuntimeError: cannot convert"
    assert by.loc[3, "speedup"] is None or np.isnan(by.loc[3, "speedup"])
    assert sorted(view.pareto["number"]) == [0, 2]
    assert "confirm_latency_ms" not in view.trials and view.shown_runtime == "openvino"


def test_a_runtime_whose_baseline_failed_there_has_no_view(tmp_path):
    import pandas as pd

    from paretoopt.errors import StudyError
    from paretoopt.results.frames import StudyResults, for_target

    trials = pd.DataFrame([{"number": 0, "state": "COMPLETE", "feasible": True}])
    baseline = {"accuracy": 99.0, "latency_ms": 1.0}
    baseline["compared"] = {"openvino": {"accuracy": None, "error": "RuntimeError: no IR"}}
    results = StudyResults(
        "s", tmp_path, trials, trials, baseline, {}, runtime="onnxruntime", compared=("openvino",)
    )
    with pytest.raises(StudyError) as info:
        for_target(results, "openvino")
    assert str(info.value) == (
        "--target: study 's' could not measure its baseline in openvino (RuntimeError: no IR), "
        "so nothing there can be compared"
    )
