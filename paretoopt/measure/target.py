"""The study's target: where and how every model of a study is run and timed.

One ``Target`` per study holds the runtime settings, the baseline in that runtime (the
reference every candidate is timed against), the calibration that fixes the study's
latency scale, the gate that keeps timing away from training on this machine, and, for a
remote target, the agent client. Latencies are reported on one scale: the calibrated
reference times the candidate/baseline ratio measured in alternating rounds.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from paretoopt.config.space import TargetSpec
from paretoopt.errors import StudyError
from paretoopt.measure.agent import AgentClient
from paretoopt.measure.backends import Backend, Deployment, create_backend
from paretoopt.measure.backends.base import OPTIONAL, Kernels, require
from paretoopt.measure.gate import MeasurementGate
from paretoopt.measure.isa import Int8Recipe, this_machine
from paretoopt.measure.protocol import (
    LatencyStats,
    PairedTiming,
    Runner,
    Timers,
    quiet_reference,
    round_medians,
    time_runner,
    time_sessions,
)
from paretoopt.measure.runtimes import runtime_threads, timing_batch
from paretoopt.workload.data import Data
from paretoopt.workload.inputs import Inputs

CALIBRATION_ROUNDS = 3
SETTLE_TOLERANCE = 0.02
SETTLE_LIMIT = 10


class Target:
    def __init__(
        self,
        spec: TargetSpec,
        timing_split: Data,
        example: Inputs,
        gate: MeasurementGate | None = None,
        where: str = "target.runtime",
    ) -> None:
        """`gate`: shared with the study's other targets (target.compare), so that one
        process holds one gate; `where`: the setting that named the runtime."""
        self.spec, self.where = spec, where
        self.timing_split = timing_split
        self.batch = timing_batch(timing_split, spec.batch_size)  # real inputs, one batch
        self.example = example  # one input, for export
        if spec.runtime in OPTIONAL and spec.device == "cpu":  # said before any import
            require(spec.runtime, where)
        self.backend: Backend = create_backend(spec, example)  # the runtime that runs it all
        self.gate = gate or MeasurementGate()
        self.agent = _agent_client(spec) if spec.agent else None
        self.reference: Runner | None = None  # the baseline in this runtime
        self.reference_file: Path | None = None
        self.reference_sha: str | None = None  # the baseline's name on the agent
        self.calibration: dict[str, Any] | None = None
        self.quiet_level_ms: float | None = None  # the baseline's fastest round here
        # each deployed structure's fastest round here: its quiet level in later timings
        self.candidate_levels: dict[str, float] = {}
        self._int8: Int8Recipe | None = None

    def int8_recipe(self) -> Int8Recipe:
        """The int8 weight types for the CPU that times the models: the agent's, for a
        remote target (an agent too old to report its flags counts as unknown)."""
        if self._int8 is None:
            if self.agent is not None:
                found = self.agent.info()["fingerprint"]
                isa, machine = found.get("isa"), str(found.get("machine", "x86_64"))
            else:
                isa, machine = this_machine()
            self._int8 = Int8Recipe.choose(self.spec.int8_recipe, isa, machine)
        return self._int8

    # ------------------------------------------------------------------ runners

    def runner(self, model: nn.Module, work: Path, half: str | None = None) -> Runner:
        """The model in the target runtime (see the backend); `half` names the 16-bit type
        a CUDA model runs in (every layer at 16 bits)."""
        return self.backend.runner(model, work, half)

    def structure(self, deployment: Deployment) -> str | None:
        """The deployment's structure (see measure/structure): the agent's compiled graph
        where its runtime compiles per machine, else the backend's."""
        kernels = self._remote(deployment)
        return kernels.structure if kernels else self.backend.structure(deployment)

    def integer_weights(self, deployment: Deployment) -> set[str]:
        """Weights that ran in integer kernels where the model is timed: on the agent's
        machine for a runtime whose kernels depend on the CPU (OpenVINO)."""
        kernels = self._remote(deployment)
        if kernels is None:
            return self.backend.integer_weights(deployment)
        return set(kernels.integer) if deployment.int8_weights else set()

    def _remote(self, deployment: Deployment) -> Kernels | None:
        if self.agent is None or deployment.file is None:
            return None
        sha = self.agent.upload(deployment.file, runtime=self.backend.name)
        return self.agent.kernels.get(sha)

    # ------------------------------------------------------------------ timing

    def calibrate(
        self, baseline: nn.Module, work: Path, reference_ms: float | None = None
    ) -> dict[str, Any]:
        """Load the baseline into the target runtime and time it several times.

        The median of these runs (``measured_ms``) becomes the reference every candidate's
        latency is scaled from, unless the study already fixed one (``reference_ms``, from
        its first session): a study keeps one latency scale. The spread tells whether the
        machine is quiet enough to rank candidates at all.
        """
        work.mkdir(parents=True, exist_ok=True)
        with self.gate.computing():
            self.reference = self.runner(baseline, work)
        if self.agent is not None:
            _served(self.agent, self.backend.name, str(self.spec.agent), self.where)
            self.reference_file = work / str(self.backend.file)
            self.reference_sha = self.agent.upload(self.reference_file, runtime=self.backend.name)
        settle = self._settle()
        medians = [self._time_alone().median_ms for _ in range(CALIBRATION_ROUNDS)]
        measured = sorted(medians)[len(medians) // 2]
        quiet = self._quiet_reference()
        self.calibration = {
            "medians_ms": medians,
            "measured_ms": measured,
            "quiet_ms": quiet,
            "quiet_level_ms": self.quiet_level_ms,
            "reference_ms": reference_ms or quiet or measured,
            "spread": max(medians) / min(medians),
            "settle_runs": settle,
            "mode": self.mode(self.reference),
            "peak_memory_bytes": self.reference.peak_memory(self.batch),
        }
        if self.agent is not None:
            info = self.agent.info()
            self.calibration["agent"] = info["fingerprint"]
            # the version that timed the study's models is the agent's, not this machine's
            self.calibration["agent_runtimes"] = info.get("runtimes") or {"onnxruntime": "?"}
        return self.calibration

    def _settle(self) -> int:
        """Time the baseline until two runs of the protocol in a row agree within
        SETTLE_TOLERANCE (at most SETTLE_LIMIT runs, all discarded). Right after a heavy
        step (an export, a process start) this machine ran 15-20 % slower for a second or
        two; a reference taken then would inflate every latency of the study."""
        previous = self._time_alone().median_ms
        for runs in range(2, SETTLE_LIMIT + 1):
            current = self._time_alone().median_ms
            if abs(current / previous - 1.0) <= SETTLE_TOLERANCE:
                return runs
            previous = current
        return SETTLE_LIMIT

    def _quiet_reference(self) -> float | None:
        """The baseline at this machine's quiet level: the median of its round medians
        within target.quiet_tolerance of the fastest, over target.quiet_s seconds of
        rounds. The level is where candidates are read (see protocol.time_sessions); the
        agent finds its own."""
        if self.spec.quiet_rounds == 0 or self.agent is not None or self.reference is None:
            return None
        with runtime_threads(self.reference), self.gate.measuring():
            medians = round_medians(self.reference.timer(self.batch), self.spec, self.spec.quiet_s)
        self.quiet_level_ms, quiet = quiet_reference(medians, self.spec)
        return quiet

    def _time_alone(self) -> LatencyStats:
        if self.reference is None:
            raise StudyError("no baseline to time: calibrate first")
        if self.agent is not None:
            return self.agent.measure(str(self.reference_sha), None, self.spec)[0]
        with runtime_threads(self.reference), self.gate.measuring():
            return time_runner(self.reference.timer(self.batch), self.spec)

    def latency(
        self, runner: Runner, runtime_file: Path | None, structure: str | None = None
    ) -> dict[str, Any]:
        """Time the candidate against the baseline; scale the reference by their ratio.
        `structure` (see measure/structure): timings of one structure share its quiet
        level."""
        if self.reference is None or self.calibration is None:
            raise StudyError("no calibrated baseline to measure against (calibrate first)")
        known = self.candidate_levels.get(structure) if structure else None
        timing = self._paired(runner, runtime_file, known)
        if structure and timing.candidate_level_ms:  # where it was timed: here or the agent
            self.candidate_levels[structure] = timing.candidate_level_ms
        return {
            **timing.ours.to_dict(),
            "latency_ms": self.calibration["reference_ms"] * timing.ratio,
            "ratio_to_baseline": timing.ratio,
            "session_ratios": list(timing.session_ratios),
            "pairs": timing.pairs,
            "quiet_pairs": timing.quiet_pairs,
            "error": timing.error,
            "quiet": timing.quiet,
            "baseline_median_ms": timing.theirs.median_ms,
            "reference_ms": self.calibration["reference_ms"],
            "mode": self.mode(runner),
            "peak_memory_bytes": runner.peak_memory(self.batch),
        }

    def _paired(
        self, runner: Runner, runtime_file: Path | None, known: float | None
    ) -> PairedTiming:
        """The candidate against the baseline, on the agent or here; `known`: the fastest
        round of the candidate's structure so far, on the machine that times it."""
        assert self.reference is not None
        if self.agent is not None:
            if runtime_file is None:
                raise StudyError("target.agent: the agent times runtime files, and there is none")
            sha = self.agent.upload(runtime_file, runtime=self.backend.name)
            return self.agent.paired(sha, str(self.reference_sha), self.spec, known)
        with runtime_threads(runner), self.gate.measuring():
            timing = self._time_sessions(runner, known)
        self.quiet_level_ms = timing.quiet_level_ms
        if runner.mode != self.reference.mode:  # e.g. a CUDA graph against eager launches
            raise StudyError(
                f"the candidate was timed as {runner.mode!r} but the baseline as "
                f"{self.reference.mode!r}; their ratio would credit the difference"
            )
        return timing

    def _time_sessions(self, runner: Runner, known: float | None = None) -> PairedTiming:
        """Paired timing in `target.sessions` sessions: the first with the runners at
        hand, each later one with both models loaded afresh (a runtime without sessions
        to renew is timed in one)."""
        reference = self.reference
        assert reference is not None

        def timers(k: int) -> Timers | None:
            ours, theirs = (runner, reference) if k == 0 else (runner.fresh(), reference.fresh())
            if ours is None or theirs is None:
                return None
            return ours.timer(self.batch), theirs.timer(self.batch)

        return time_sessions(timers, self.spec, self.spec.sessions, self.quiet_level_ms, known)

    def compared(self) -> dict[str, Target]:
        """A target for each runtime of target.compare: the same settings, timing batch
        and gate."""
        return {
            runtime: Target(
                replace(self.spec, runtime=runtime, compare=()),
                self.timing_split,
                self.example,
                self.gate,
                "target.compare",
            )
            for runtime in self.spec.compare
        }

    def mode(self, runner: Runner) -> str:
        """How latency is taken: "cpu", "eager", "cuda-graph", or "remote" (an agent)."""
        return "remote" if self.agent is not None else runner.mode


def _served(agent: AgentClient, runtime: str, address: str, where: str) -> None:
    """The agent must serve the study's runtime: said once, before any trial."""
    runtimes = agent.runtimes()
    if runtime not in runtimes:
        raise StudyError(
            f"target.agent: the agent at {address} serves {sorted(runtimes)}, not "
            f"{where} {runtime}; install it beside the agent (`pip install -c "
            f"constraints.txt -e '.[{runtime}]'` or `make extras`, then restart `paretoopt "
            "agent`) or measure in one of those"
        )


def _agent_client(spec: TargetSpec) -> AgentClient:
    token = os.environ.get(spec.agent_token_env, "")
    if not token:
        raise StudyError(
            f"target.agent: the token for {spec.agent} is read from the environment "
            f"variable {spec.agent_token_env} (target.agent_token_env), which is not set"
        )
    return AgentClient(str(spec.agent), token)
