"""Measurement: the latency protocol, isolation from training, CUDA, and the remote agent."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import http.client
import statistics
import threading
import time

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from paretoopt.compress.train import Recipe, train
from paretoopt.config.parts.quant import QuantConfig
from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import TargetSpec, parse_space
from paretoopt.errors import SpaceError
from paretoopt.measure import OrtRunner, TorchRunner, export_onnx, time_paired, time_runner
from paretoopt.measure.agent import (
    PROTOCOL_LIMITS,
    Agent,
    AgentClient,
    AgentError,
    Rejected,
    _nonnegative,
    make_server,
)
from paretoopt.measure.gate import MeasurementGate
from paretoopt.measure.protocol import time_sessions
from paretoopt.study.trial import calibrate, check_inputs, prepare, run_trial

from .conftest import TINY

TOKEN = "a-long-enough-test-token"
# the fixed rounds, every pair read (tests/test_quiet.py covers the quiet rounds)
PROTOCOL = TargetSpec(warmup=5, repeats=5, iterations=30, batch_size=32, sessions=1, quiet_rounds=0)


def _mlp(depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 256), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10)).eval()


BATCH = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)


# --------------------------------------------------------------------------- protocol


def test_a_deeper_model_measures_slower():
    """Four times the hidden layers: the paired ratio must show it (measured 4.7x)."""
    shallow, deep = TorchRunner(_mlp(2), 1), TorchRunner(_mlp(8), 1)
    torch.set_num_threads(1)
    try:
        _, _, ratio = time_paired(deep.timer(BATCH), shallow.timer(BATCH), PROTOCOL)
    finally:
        torch.set_num_threads(2)
    assert ratio > 1.8, ratio


def test_a_fixed_model_timed_against_itself_reads_one(tmp_path):
    """One model timed against a second session of itself: the paired ratio within 10 %
    of 1, as the median of three plain readings and as one reading at the machine's
    quiet level. The
    absolute median is not asserted here: on an AVX2 EPYC VM five protocol runs in one
    test read 0.18 to 0.31 ms as the machine changed state, and the ratio is what the
    study reads. The median's repeatability is benchmarks/latency.py's (its CV over 10
    measurements)."""
    export_onnx(_mlp(4), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    ours, theirs = OrtRunner(tmp_path / "m.onnx", 1), OrtRunner(tmp_path / "m.onnx", 1)
    ratios = [
        time_paired(ours.timer(BATCH), theirs.timer(BATCH.copy()), PROTOCOL)[2] for _ in range(3)
    ]
    # one of three plain readings here read 1.23 (the state changed between rounds)
    assert 0.9 < statistics.median(ratios) < 1.1, ratios
    quiet = dataclasses.replace(PROTOCOL, quiet_rounds=3, quiet_s=2.0)
    timing = time_sessions(
        lambda k: (ours.timer(BATCH), theirs.timer(BATCH.copy())) if k == 0 else None, quiet, 1
    )
    assert timing.quiet is not None and 0.9 < timing.ratio < 1.1, timing


def test_statistics_describe_every_timed_run(tmp_path):
    export_onnx(_mlp(2), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    stats = time_runner(OrtRunner(tmp_path / "m.onnx", 1).timer(BATCH), PROTOCOL)
    assert stats.runs == 5 * 30 and stats.batch_size == 32
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert stats.spread >= 1.0


# --------------------------------------------------------------------------- isolation


def _in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_measurement_waits_for_a_running_step_and_steps_wait_for_it(tmp_path):
    trainer, measurer, late = (MeasurementGate(tmp_path) for _ in range(3))
    release_step, release_measure = threading.Event(), threading.Event()
    events: list[str] = []

    def step() -> None:
        with trainer.computing():
            events.append("step started")
            release_step.wait(5)
            events.append("step ended")

    def measure() -> None:
        with measurer.measuring():
            events.append("measuring")
            release_measure.wait(5)
            events.append("measured")

    def late_step() -> None:
        with late.computing():
            events.append("late step")

    first = _in_thread(step)
    while "step started" not in events:
        time.sleep(0.01)
    timing = _in_thread(measure)
    time.sleep(0.2)
    assert "measuring" not in events  # the running step finishes first
    after = _in_thread(late_step)  # a step that arrives while a measurement waits
    time.sleep(0.2)
    assert "late step" not in events  # ... must not overtake it
    release_step.set()
    first.join(5)
    while "measuring" not in events:
        time.sleep(0.01)
    time.sleep(0.2)
    assert "late step" not in events  # nothing computes while timing runs
    release_measure.set()
    timing.join(5)
    after.join(5)
    assert events == ["step started", "step ended", "measuring", "measured", "late step"]


def test_every_training_step_passes_the_gate():
    from paretoopt.config.space import ComponentSpec
    from paretoopt.workload.data import create_data
    from paretoopt.workload.models import tiny_conv

    splits = create_data(ComponentSpec(name="digits", kwargs={"size": 8}))
    entered = []

    class Guard:
        def __enter__(self) -> None:
            entered.append(1)

        def __exit__(self, *exc: object) -> None:
            pass

    train(tiny_conv(), splits.train, Recipe(1, 1e-3, 256, 0), step_guard=Guard)
    assert len(entered) == -(-len(splits.train) // 256)


# --------------------------------------------------------------------------- CUDA


def test_a_cuda_target_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    doc = copy.deepcopy(TINY)
    doc["target"].update({"device": "cuda", "runtime": "torch"})
    with pytest.raises(SpaceError) as info:
        check_inputs(parse_space(doc))
    assert str(info.value) == "target.device: cuda, but this machine has no usable CUDA device"


def test_a_cuda_target_needs_the_torch_runtime():
    doc = copy.deepcopy(TINY)
    doc["target"]["device"] = "cuda"
    with pytest.raises(SpaceError) as info:
        parse_space(doc)
    assert str(info.value).startswith("target.device: cuda is measured with runtime torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_runner_times_with_events(graphs, dtype):
    from paretoopt.measure.protocol import DeviceTime
    from paretoopt.measure.runtimes import CudaRunner

    runner = CudaRunner(_mlp(4), dtype, graphs)
    run = runner.timer(BATCH)
    assert isinstance(run(), DeviceTime)
    assert runner.mode == ("cuda-graph" if graphs else "eager")
    stats = time_runner(run, PROTOCOL)
    assert stats.median_ms > 0
    out = runner(BATCH)
    reference = _mlp(4)(torch.from_numpy(BATCH)).detach().numpy()
    assert out.shape == (32, 10)
    assert np.allclose(out, reference, atol=0.05 if dtype != torch.float32 else 1e-4)
    assert runner.peak_memory(BATCH) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [32, 16])
def test_a_trial_on_a_cuda_target(tmp_path, bits):
    doc = copy.deepcopy(TINY)
    doc["target"].update({"device": "cuda", "runtime": "torch"})
    ctx = prepare(parse_space(doc), tmp_path / "cache", log=lambda _: None)
    cal = calibrate(ctx, tmp_path / "cal")
    assert cal["mode"] == "cuda-graph" and cal["peak_memory_bytes"] > 0
    record = run_trial(ctx, CompressionPlan(quant=QuantConfig(bits)), tmp_path / "1", seed=0)
    assert record["latency"]["mode"] == "cuda-graph"
    assert record["latency"]["peak_memory_bytes"] > 0
    assert next(ctx.baseline.parameters()).device.type == "cpu"  # the baseline stays put


# --------------------------------------------------------------------------- the agent


@pytest.fixture
def served():
    """An agent on loopback: (its address, the agent object behind it)."""
    state = Agent(TOKEN, max_bytes=2_000_000)
    server = make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


@pytest.fixture
def agent(served):
    return served[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for depth in (2, 8):
        export_onnx(_mlp(depth), torch.zeros(1, 1, 8, 8), folder / f"d{depth}.onnx")
    return folder


def test_agent_round_trip_on_loopback(agent, models):
    client = AgentClient(agent, TOKEN)
    info = client.info()
    assert info["fingerprint"]["cores"] >= 1 and info["max_bytes"] == 2_000_000
    deep, shallow = client.upload(models / "d8.onnx"), client.upload(models / "d2.onnx")
    assert client.upload(models / "d8.onnx") == deep  # known: not sent twice
    two = dataclasses.replace(PROTOCOL, sessions=2)
    ours, theirs, ratio, sessions = client.measure(deep, shallow, two)
    assert ours.runs == theirs.runs == 2 * 5 * 30 and ours.batch_size == 32
    assert ratio > 1.8  # the deeper model, timed on the agent, is slower there too
    assert len(sessions) == 2 and ratio == statistics.median(sessions)  # fresh sessions each
    alone, nothing, no_ratio, none = client.measure(shallow, None, PROTOCOL)
    assert alone.median_ms > 0 and nothing is None and no_ratio is None and none == []


def test_the_agent_reads_at_its_quiet_level_and_keeps_it_per_reference(served, models):
    address, state = served
    client = AgentClient(address, TOKEN)
    deep, shallow = client.upload(models / "d8.onnx"), client.upload(models / "d2.onnx")
    spec = dataclasses.replace(PROTOCOL, quiet_rounds=3, quiet_s=2.0)
    got = client.paired(deep, shallow, spec)
    key = (shallow, spec.batch_size, spec.threads)  # another batch or thread count: its own
    assert got.pairs >= spec.repeats and got.quiet_level_ms == state.quiet_levels[key]
    assert got.ratio > 1.8 and got.quiet == (got.quiet_pairs >= 3)
    assert (got.error is not None) == bool(got.quiet)  # the reading's precision travels too
    assert got.candidate_level_ms is not None and got.candidate_level_ms > 0
    # told its structure ran 10x faster before (a timing stuck in the slow state): no
    # pair is quiet, and the level told comes back for the next timing
    stuck = client.paired(deep, shallow, spec, candidate_level_ms=got.candidate_level_ms / 10)
    assert stuck.quiet is False and stuck.quiet_pairs == 0
    assert stuck.candidate_level_ms == pytest.approx(got.candidate_level_ms / 10)
    job = {**{k: getattr(spec, k) for k in PROTOCOL_LIMITS}, "model": deep}
    for level in (-1.0, True, "1", float("inf")):
        with pytest.raises(Rejected, match="candidate_level_ms"):
            state.measure({**job, "reference": shallow, "candidate_level_ms": level})
    again = client.paired(deep, shallow, spec)
    assert again.quiet_level_ms <= got.quiet_level_ms  # the level it knew, or a faster one
    older = {k: getattr(PROTOCOL, k) for k in ("batch_size", "threads", "warmup", "warmup_s")}
    older |= {"repeats": 3, "iterations": 5, "model": deep, "reference": shallow}
    answer = state.measure(older)  # a client from before quiet rounds and sessions
    assert answer["quiet"] is None and answer["pairs"] == 3  # read as it did then: nobody looked


def _raw(address: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    return answer.status, answer.read().decode()


def test_a_client_sends_models_again_when_the_agent_lost_them(served, models):
    address, state = served
    client = AgentClient(address, TOKEN)
    deep, shallow = client.upload(models / "d8.onnx"), client.upload(models / "d2.onnx")
    state.models.clear()  # as after a restart of the agent
    ours, theirs, ratio, _ = client.measure(deep, shallow, PROTOCOL)
    assert ratio is not None and ratio > 1.0 and set(state.models) == {deep, shallow}


def test_a_gate_cannot_be_nested(tmp_path):
    gate = MeasurementGate(tmp_path)
    with gate.computing(), pytest.raises(RuntimeError, match="already held"), gate.measuring():
        pass
    with gate.measuring():  # released properly after the refusal
        pass


def test_agent_checks_the_token(agent, models):
    with pytest.raises(AgentError) as info:
        AgentClient(agent, "wrong-token-of-some-length").upload(models / "d2.onnx")
    assert "401 missing or wrong token" in str(info.value)
    status, text = _raw(agent, "GET", "/info")
    assert status == 401 and "missing or wrong token" in text


def test_agent_rejects_bad_uploads(agent, models, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, text = _raw(agent, "POST", "/models", b"\x80not onnx at all", auth)
    assert status == 400 and "not a valid ONNX model" in text
    # oversized: refused from the declared size, before the body is read
    headers = {**auth, "Content-Length": str(10**9)}
    status, text = _raw(agent, "POST", "/models", b"", headers)
    assert status == 413 and "takes at most 2000000" in text
    # a model whose tensors live in another file could make the agent read any file
    model = onnx.load(str(models / "d2.onnx"))
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    status, text = _raw(agent, "POST", "/models", (tmp_path / "ext.onnx").read_bytes(), auth)
    assert status == 400 and "tensors stored outside the file are refused" in text
    status, text = _raw(agent, "POST", "/measure", b'{"model": "feed"}', auth)
    assert status == 400 and "batch_size: an integer from 1 to 4096 is required" in text
    job = (
        b'{"model": "feed", "batch_size": 1, "threads": 1, "warmup": 0, "warmup_s": 0, '
        b'"repeats": 1, '
        b'"iterations": 1}'
    )
    status, text = _raw(agent, "POST", "/measure", job, auth)  # no warmup_tolerance: 0
    assert status == 404 and "upload it first" in text
    status, text = _raw(agent, "POST", "/measure", b"[1, 2", auth)
    assert status == 400 and "not JSON" in text
    status, _ = _raw(agent, "POST", "/anything", b"", auth)
    assert status == 404


def test_a_client_says_when_a_model_is_too_big_for_the_agent(agent, models, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"x" * 2_000_001)
    with pytest.raises(AgentError) as info:
        AgentClient(agent, TOKEN).upload(big)
    assert "big.onnx is 2000001 bytes; the agent takes at most 2000000" in str(info.value)


def test_an_unreachable_agent_fails_clearly():
    with pytest.raises(AgentError) as info:
        AgentClient("127.0.0.1:9", TOKEN, timeout=2).info()
    assert str(info.value).startswith("agent http://127.0.0.1:9: cannot reach it")


def test_a_trial_measured_on_a_remote_agent(agent, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOOPT_AGENT_TOKEN", TOKEN)
    doc = copy.deepcopy(TINY)
    doc["target"].update({"agent": agent, "sessions": 2})
    ctx = prepare(parse_space(doc), tmp_path / "cache", log=lambda _: None)
    cal = calibrate(ctx, tmp_path / "cal")
    assert cal["mode"] == "remote" and cal["agent"]["cores"] >= 1
    record = run_trial(ctx, CompressionPlan(quant=QuantConfig(8)), tmp_path / "1", seed=0)
    assert record["latency"]["mode"] == "remote"
    assert record["latency"]["runs"] == 2 * 2 * 5  # sessions x repeats x iterations
    assert len(record["latency"]["session_ratios"]) == 2
    assert record["latency_ms"] == pytest.approx(
        cal["reference_ms"] * record["latency"]["ratio_to_baseline"]
    )


def test_an_agent_target_without_its_token_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("PARETOOPT_AGENT_TOKEN", raising=False)
    doc = copy.deepcopy(TINY)
    doc["target"]["agent"] = "127.0.0.1:8765"
    with pytest.raises(Exception) as info:
        prepare(parse_space(doc), tmp_path / "cache", log=lambda _: None)
    assert "PARETOOPT_AGENT_TOKEN (target.agent_token_env), which is not set" in str(info.value)


# --------------------------------------------------------------------------- ONNX export


def _conv_bn(seed: int, channels: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1),
        torch.nn.BatchNorm2d(channels),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(channels * 64, 10),
    ).eval()
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-2, 2)
    return model


@pytest.fixture
def traced(monkeypatch) -> list[int]:
    """Empty export caches, and a count of the exporter's traces."""
    from paretoopt.measure import onnx_export

    for cache in ("_templates", "_shapeless"):
        monkeypatch.setattr(onnx_export, cache, type(getattr(onnx_export, cache))())
    calls: list[int] = []
    trace = onnx_export._trace
    monkeypatch.setattr(onnx_export, "_trace", lambda *a: calls.append(1) or trace(*a))
    return calls


def _same_graph(path_a, path_b) -> None:
    """Node for node, and each node's weights bit for bit. Shape constants may differ in
    form: a flatten folds to Reshape(0, n) from a shape-free graph, (-1, n) when traced."""
    from onnx import numpy_helper

    def constants(path) -> tuple[list[str], list[np.ndarray]]:
        graph = onnx.load(path).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        ops = [n.op_type for n in graph.node]
        weights = [inits[i] for n in graph.node for i in n.input if i in inits]
        return ops, [w for w in weights if w.dtype.kind == "f"]

    (ops_a, consts_a), (ops_b, consts_b) = constants(path_a), constants(path_b)
    assert ops_a == ops_b
    assert len(consts_a) == len(consts_b)
    assert all(np.array_equal(a, b) for a, b in zip(consts_a, consts_b, strict=True))


def _runs_like(path, model: torch.nn.Module, example_shape=(1, 8, 8)) -> None:
    x = torch.randn(4, *example_shape)
    out = OrtRunner(path, 1)(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5)


def test_a_second_model_of_one_architecture_reuses_the_traced_graph(tmp_path, traced):
    """Same architecture, other weights: no second trace, and the file equals a fresh
    export node for node and bit for bit (BatchNorm folded into the convolution)."""
    from paretoopt.measure import onnx_export

    example = torch.zeros(1, 1, 8, 8)
    export_onnx(_conv_bn(0), example, tmp_path / "a.onnx")
    second = _conv_bn(1)
    export_onnx(second, example, tmp_path / "b.onnx")
    assert len(traced) == 1
    onnx_export._templates.clear()
    onnx_export._shapeless.clear()
    export_onnx(second, example, tmp_path / "fresh.onnx")
    assert len(traced) == 2
    _same_graph(tmp_path / "b.onnx", tmp_path / "fresh.onnx")
    assert "BatchNormalization" not in {
        n.op_type for n in onnx.load(tmp_path / "b.onnx").graph.node
    }
    _runs_like(tmp_path / "b.onnx", second)
    export_onnx(_mlp(2), example, tmp_path / "c.onnx")  # another architecture: traced
    assert len(traced) == 3


def test_a_model_with_fewer_channels_reuses_the_graph_without_its_shapes(tmp_path, traced):
    """Channel pruning changes shapes only: the flatten's frozen size is taken out, no
    second trace, and the file equals a fresh export of the narrower model."""
    from paretoopt.measure import onnx_export

    example = torch.zeros(1, 1, 8, 8)
    export_onnx(_conv_bn(0, channels=8), example, tmp_path / "wide.onnx")
    narrow = _conv_bn(1, channels=3)
    export_onnx(narrow, example, tmp_path / "narrow.onnx")
    assert len(traced) == 1
    _runs_like(tmp_path / "narrow.onnx", narrow)
    export_onnx(_conv_bn(2, channels=3), example, tmp_path / "again.onnx")  # now exact
    assert len(traced) == 1
    onnx_export._templates.clear()
    onnx_export._shapeless.clear()
    export_onnx(narrow, example, tmp_path / "fresh.onnx")
    _same_graph(tmp_path / "narrow.onnx", tmp_path / "fresh.onnx")


class _Heads(nn.Module):
    """An integer attribute that steers the graph (a reshape), not a tensor's shape."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x.flatten(1)).view(x.shape[0], self.heads, -1)
        return y.softmax(-1).flatten(1)


def test_a_shape_free_graph_that_computes_something_else_is_traced_afresh(tmp_path, traced):
    """Same tensors, another integer attribute: the shape-free graph would run, with the
    wrong result. It is checked against the model, found wrong and traced instead."""
    example = torch.zeros(1, 1, 8, 8)
    torch.manual_seed(0)
    export_onnx(_Heads(2).eval(), example, tmp_path / "two.onnx")
    four = _Heads(4).eval()
    export_onnx(four, example, tmp_path / "four.onnx")
    assert len(traced) == 2
    _runs_like(tmp_path / "four.onnx", four)


def _counted(value: object) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, lambda: calls.append(1) or value


def test_warm_up_ends_when_two_blocks_agree_and_not_before():
    from paretoopt.measure.protocol import DeviceTime, _warm_up

    calls, run = _counted(DeviceTime(0.5))  # steady from the start
    _warm_up([run], TargetSpec(warmup=10, warmup_s=5.0, warmup_tolerance=0.03))
    assert len(calls) == 20  # two blocks, far before warmup_s
    times = iter([2.0] * 10 + [1.0] * 10 + [0.99] * 10)  # slow at first, then steady
    calls, _ = _counted(None)
    slowing = lambda: calls.append(1) or DeviceTime(next(times))  # noqa: E731
    _warm_up([slowing], TargetSpec(warmup=10, warmup_s=5.0, warmup_tolerance=0.03))
    assert len(calls) == 30


def test_warm_up_with_tolerance_zero_lasts_warmup_s_and_zero_means_none():
    from paretoopt.measure.protocol import DeviceTime, _warm_up

    calls, run = _counted(DeviceTime(0.5))
    start = time.perf_counter()
    _warm_up([run], TargetSpec(warmup=10, warmup_s=0.2, warmup_tolerance=0.0))
    assert time.perf_counter() - start >= 0.2
    calls, run = _counted(DeviceTime(0.5))
    _warm_up([run], TargetSpec(warmup=0, warmup_s=0.0))
    assert calls == []


def test_an_agent_from_before_quiet_rounds_reads_as_not_known(monkeypatch):
    client = AgentClient("127.0.0.1:1", TOKEN)
    stats = dataclasses.asdict(
        time_runner(lambda: None, dataclasses.replace(PROTOCOL, iterations=2))
    )
    old = {"candidate": stats, "reference": stats, "ratio": 0.5, "session_ratios": [0.5]}
    monkeypatch.setattr(client, "_measure", lambda *args: old)
    got = client.paired("a", "b", PROTOCOL)
    assert got.ratio == 0.5 and got.quiet is None  # not "never quiet": nobody looked


# --------------------------------------------------------------------------- a hostile client


def test_the_agent_requires_the_bearer_scheme(agent):
    status, text = _raw(agent, "GET", "/info", headers={"Authorization": TOKEN})
    assert status == 401 and "missing or wrong token" in text  # a bare token was accepted
    assert _raw(agent, "GET", "/info", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_an_input_the_model_does_not_take_is_a_4xx_with_the_runtime_s_reason(agent, tmp_path):
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(1, 16)  # only a batch of one

    # a graph for batch 1 alone (paretoopt's own export refuses such a model)
    one = torch.zeros(1, 1, 4, 4)
    torch.onnx.export(Fixed().eval(), (one,), tmp_path / "one.onnx", dynamo=True)
    client = AgentClient(agent, TOKEN)
    sha = client.upload(tmp_path / "one.onnx")
    with pytest.raises(AgentError) as info:
        client.measure(sha, None, PROTOCOL)  # batch 32
    assert "422" in str(info.value) and "does not run on a batch of shape x [32" in str(info.value)


def test_a_model_declaring_a_huge_input_is_refused_before_it_runs(agent, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16384, 16384])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16384, 16384])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "huge.onnx")
    client = AgentClient(agent, TOKEN)
    sha = client.upload(tmp_path / "huge.onnx")
    start = time.perf_counter()
    with pytest.raises(AgentError, match="413 .*holds 268435456 values; this agent takes at most"):
        client.measure(sha, None, dataclasses.replace(PROTOCOL, batch_size=1))
    assert time.perf_counter() - start < 5.0  # was 11.8 s and 2.8 GB


def _loopback(**limits):
    state = Agent(TOKEN, max_bytes=2_000_000)
    server = make_server(state, "127.0.0.1", 0, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline():
    import socket

    server, _ = _loopback(read_deadline_s=1.0)
    try:
        conn = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        conn.sendall(b"GET /info HTTP/1.1\r\n")
        start, closed = time.perf_counter(), False
        while time.perf_counter() - start < 4.0:  # one header byte every 0.2 s
            time.sleep(0.2)
            try:
                conn.sendall(b"X")
            except OSError:
                closed = True
                break
            conn.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                closed = conn.recv(1) == b""
            if closed:
                break
        assert closed and time.perf_counter() - start < 3.0
    finally:
        server.shutdown()
        server.server_close()


def test_connections_beyond_the_cap_are_closed_unanswered():
    import socket

    server, _ = _loopback(max_connections=3, read_deadline_s=5.0)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(3)]
        time.sleep(0.3)  # the three are being served (waiting for their requests)
        extra = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        assert extra.recv(1) == b""  # closed at once, without an answer
        for conn in idle:
            conn.close()
        time.sleep(0.3)
        status, _ = _raw(f"127.0.0.1:{server.server_port}", "GET", "/info",
                         headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert status == 200  # slots come back
    finally:
        server.shutdown()
        server.server_close()


def test_an_upload_is_checked_only_while_nothing_is_timed(served, models):
    address, state = served
    done = threading.Event()

    def upload() -> None:
        AgentClient(address, TOKEN).upload(models / "d2.onnx")
        done.set()

    with MeasurementGate().measuring():  # as the agent's own timing holds it
        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        assert not done.wait(1.0)  # the check waits for the timing to end
    assert done.wait(30.0)
    thread.join()


def test_a_job_asking_for_days_of_timing_is_refused(served, models):
    address, state = served
    sha = AgentClient(address, TOKEN).upload(models / "d2.onnx")
    job = {k: getattr(PROTOCOL, k) for k in ("batch_size", "threads", "warmup", "warmup_s")}
    job |= {"model": sha, "repeats": 1000, "iterations": 100_000, "sessions": 100}
    with pytest.raises(Rejected, match="10000000000 timed runs; this agent times at most"):
        state.measure(job)


def test_external_data_inside_a_function_s_subgraph_is_found():
    from onnx import TensorProto, helper

    from paretoopt.measure.backends.base import Refused
    from paretoopt.measure.backends.onnxruntime import check_onnx

    outside = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    outside.ClearField("float_data")
    outside.data_location = TensorProto.EXTERNAL
    outside.external_data.add(key="location", value="/etc/passwd")
    out = [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])]
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=outside)], "a", [], out)
    inside = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    other = helper.make_graph([helper.make_node("Constant", [], ["t"], value=inside)], "b", [], out)
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    opsets = [helper.make_opsetid("", 17)]
    function = helper.make_function("ai.onnx.ml", "F", ["c"], ["y"], [branch], opsets)
    graph = helper.make_graph(
        [helper.make_node("F", ["c"], ["y"], domain="ai.onnx.ml")],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, functions=[function], opset_imports=[*opsets, helper.make_opsetid("ai.onnx.ml", 3)]
    )
    with pytest.raises(Refused, match="tensors stored outside the file are refused"):
        check_onnx(model.SerializeToString())


def test_at_most_two_upload_bodies_are_held_at_once(served, models):
    address, state = served
    state.upload_slots.acquire()
    state.upload_slots.acquire()  # two uploads in flight
    done = threading.Event()

    def upload() -> None:
        AgentClient(address, TOKEN).upload(models / "d2.onnx")
        done.set()

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert not done.wait(0.5)  # a third waits before its body is read
    state.upload_slots.release()
    assert done.wait(30.0)
    state.upload_slots.release()
    thread.join()


def test_an_agents_numbers_are_taken_only_when_they_are_nonnegative():
    assert _nonnegative(0.004) == 0.004 and _nonnegative(0) == 0.0
    for answer in (None, True, -0.01, "0.01", [0.01]):  # an older agent, or a broken one
        assert _nonnegative(answer) is None
