"""Remote measurement: an agent on the target device times models for a search running
elsewhere, in any runtime installed beside it (ONNX Runtime always; OpenVINO and
ExecuTorch with their extras).

``paretoopt agent`` serves three calls over HTTP, each with the shared token as
``Authorization: Bearer <token>``:

- ``GET /info``: the device's hardware fingerprint, limits, and the runtimes it serves
  with their versions;
- ``POST /models/<runtime>`` (``POST /models``: ONNX Runtime): the body is the runtime's
  file (an ONNX file, an OpenVINO IR framed with its weights, an ExecuTorch ``.pte``:
  see each backend's format); the answer is its sha256, by which the model is named
  afterwards (a model already held is not sent twice), and, where the kernels a runtime
  compiles to depend on the device, which weights ran in its integer kernels here;
- ``POST /measure``: JSON ``{"model": sha, "reference": sha or null, "batch_size",
  "threads", "warmup", "warmup_s", "warmup_tolerance", "repeats", "iterations"}``; the
  answer holds the latency statistics of the model (and of the reference, timed in
  alternating rounds, with their ratio), measured with the same protocol as local
  targets. Both must run in the same runtime.

What it accepts: each runtime's own file format, never a pickle, under ``max_bytes``,
passing that runtime's rules before anything else reads it (see ``check`` of
``OnnxFormat``, ``IrFormat``, ``PteFormat``: for ONNX, a self-contained model in the
standard and ONNX Runtime operator domains; for an IR, no entity declarations and every
constant inside its weights; for a program, XNNPACK as its only delegate and
ExecuTorch's own verification), and loading in that runtime. Anything else gets a 4xx
answer with one line saying why. Nothing but the runtime ever runs what is uploaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import socket
import threading
from collections import OrderedDict
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib import error, request

import numpy as np

from paretoopt.config.space import BEFORE_IT_EXISTED, TargetSpec
from paretoopt.errors import ParetoError
from paretoopt.measure.backends import Served, installed_formats
from paretoopt.measure.backends.base import InputSpec, Kernels, Refused
from paretoopt.measure.fingerprint import hardware_fingerprint
from paretoopt.measure.gate import MeasurementGate
from paretoopt.measure.protocol import (
    LatencyStats,
    PairedTiming,
    Runner,
    Timers,
    time_runner,
    time_sessions,
)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024
KEPT_MODELS = 32  # models held in memory; the oldest is dropped beyond this
MAX_RUNS = 1_000_000  # timed runs of one model per job (a 0.1 ms model: under 2 min)
MAX_INPUT_ELEMENTS = 16 * 1024 * 1024  # values in one timing batch (64 MB of float32)
UPLOAD_SLOTS = 2  # upload bodies held at once (20 parallel 40 MB uploads took 2.3 GB)
MAX_CONNECTIONS = 64  # open at once; beyond, a connection is closed unanswered
READ_DEADLINE_S = 30.0  # to send a whole request (one byte every 20 s held one forever)
PROTOCOL_LIMITS = {  # what a /measure request may ask for
    "batch_size": (1, 4096),
    "threads": (1, 256),
    "warmup": (0, 100_000),
    "warmup_s": (0, 600),
    "warmup_tolerance": (0, 1),
    "repeats": (1, 1000),
    "iterations": (1, 100_000),
    "sessions": (1, 100),
    "quiet_rounds": (0, 10_000),
    "quiet_tolerance": (0, 10),
    "quiet_s": (0, 120),  # well inside the client's timeout
    "quiet_precision": (0, 1),
}


FED = ("float32", "int64", "int32", "bool")  # the input types an agent makes batches of
FLOATS = {"warmup_s", "warmup_tolerance", "quiet_tolerance", "quiet_s", "quiet_precision"}


class AgentError(ParetoError):
    """A request the agent refused, or an agent that cannot be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Rejected(Exception):  # noqa: N818  (an answer, not a fault of the agent)
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# --------------------------------------------------------------------------- the agent


class Agent:
    """The models the agent holds and the measurements it makes, without the HTTP."""

    def __init__(
        self,
        token: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        formats: dict[str, Served] | None = None,
    ) -> None:
        self.token = token
        self.max_bytes = max_bytes
        self.formats = installed_formats() if formats is None else formats  # runtime -> format
        self.models: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # sha -> runtime, body
        self.gate = MeasurementGate()
        self.lock = threading.Lock()  # one measurement at a time
        # uploads: at most UPLOAD_SLOTS bodies in memory at once, checked one at a time,
        # never while a model is timed (the check ran beside timing: medians +10-29 %)
        self.upload_slots = threading.BoundedSemaphore(UPLOAD_SLOTS)
        self.checking = threading.Lock()
        self.check_gate = MeasurementGate()  # its own open files: flock sees the timing
        # (reference, batch size, threads) -> the reference's fastest round here
        self.quiet_levels: dict[tuple[str, int, int], float] = {}

    def authorised(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        if scheme != "Bearer":  # a bare token was taken too: the scheme is required
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def runtimes(self) -> dict[str, str]:
        """The runtimes served here, with their versions."""
        return {runtime: fmt.version() for runtime, fmt in self.formats.items()}

    def add_model(self, body: bytes, runtime: str = "onnxruntime") -> dict[str, Any]:
        """Check and keep an upload; its sha256 and what the runtime compiled it to here."""
        fmt = self.format_of(runtime)
        with self.checking, self.check_gate.computing():
            try:
                kernels = fmt.check(body)
            except Refused as exc:
                raise Rejected(HTTPStatus.BAD_REQUEST, str(exc)) from None
        sha = hashlib.sha256(body).hexdigest()
        self.models[sha] = (runtime, body)
        self.models.move_to_end(sha)
        while len(self.models) > KEPT_MODELS:
            self.models.popitem(last=False)
        answer: dict[str, Any] = {"sha256": sha, "runtime": runtime}
        if kernels is not None:
            answer["kernels"] = {
                "integer": sorted(kernels.integer),
                "structure": kernels.structure,
            }
        return answer

    def format_of(self, runtime: str) -> Served:
        if runtime not in self.formats:
            raise Rejected(
                HTTPStatus.NOT_FOUND,
                f"runtime {runtime!r} is not served here; this agent serves "
                f"{sorted(self.formats)} (a runtime's extra installs it beside the agent)",
            )
        return self.formats[runtime]

    def measure(self, job: dict[str, Any]) -> dict[str, Any]:
        target = _protocol(job)
        runtime = self._runtime(job.get("model"))
        if job.get("reference") and self._runtime(job["reference"]) != runtime:
            raise Rejected(
                HTTPStatus.BAD_REQUEST,
                f"the model runs in {runtime} but the reference in "
                f"{self._runtime(job['reference'])}: a ratio across runtimes would credit one",
            )
        fmt = self.formats[runtime]
        with self.lock:  # one job at a time: loading one changes process-wide state too
            with self.gate.computing():  # (ExecuTorch's thread pool) and is not timing
                model = self._runner(job.get("model"), target.threads)
                reference = (
                    self._runner(job["reference"], target.threads) if job.get("reference") else None
                )
            with self.gate.measuring():
                return self._timed(job, target, fmt, model, reference)

    def _timed(
        self, job: dict[str, Any], target: TargetSpec, fmt: Served, model: Runner, reference: Any
    ) -> dict[str, Any]:
        """The model timed alone, or against the reference in alternating rounds."""
        batch = _inputs(fmt.inputs(model), target.batch_size)
        for runner in (model, reference) if reference is not None else (model,):
            _runs_on(runner, batch)
        run = model.timer(batch)
        if reference is None:
            return {"candidate": asdict(time_runner(run, target))}
        pair = (model, reference)

        def timers(k: int) -> Timers:  # a fresh session of both models after the first
            ours, theirs = pair if k == 0 else (model.fresh(), reference.fresh())
            if ours is None or theirs is None:
                return None  # a runtime without sessions to renew is timed in one
            batch = _inputs(fmt.inputs(ours), target.batch_size)
            return ours.timer(batch), theirs.timer(batch)

        key = (str(job["reference"]), target.batch_size, target.threads)
        known = _level(job.get("candidate_level_ms"))  # its structure's fastest, client's
        timing = time_sessions(timers, target, target.sessions, self.quiet_levels.get(key), known)
        if timing.quiet_level_ms is not None:
            self.quiet_levels[key] = timing.quiet_level_ms
        return {
            "candidate": asdict(timing.ours),
            "reference": asdict(timing.theirs),
            "ratio": timing.ratio,
            "session_ratios": list(timing.session_ratios),
            "pairs": timing.pairs,
            "quiet_pairs": timing.quiet_pairs,
            "quiet": timing.quiet,
            "quiet_level_ms": timing.quiet_level_ms,
            "candidate_level_ms": timing.candidate_level_ms,
            "error": timing.error,
        }

    def _runtime(self, sha: Any) -> str:
        if not isinstance(sha, str) or sha not in self.models:
            raise Rejected(HTTPStatus.NOT_FOUND, f"no model {sha!r} here; upload it first")
        return self.models[sha][0]

    def _runner(self, sha: Any, threads: int) -> Runner:
        if sha not in self.models:  # dropped since it was named: the client sends it again
            raise Rejected(HTTPStatus.NOT_FOUND, f"no model {sha!r} here; upload it first")
        runtime, body = self.models[sha]
        self.models.move_to_end(sha)  # in use: the last to be dropped
        return self.formats[runtime].load(body, threads)


def _protocol(job: dict[str, Any]) -> TargetSpec:
    values = {}
    for key, (low, high) in PROTOCOL_LIMITS.items():
        value = job.get(key, BEFORE_IT_EXISTED.get(f"target.{key}"))  # an older client
        kind = float if key in FLOATS else int
        valid = isinstance(value, (int, float) if kind is float else int)
        if not valid or isinstance(value, bool) or not low <= value <= high:
            raise Rejected(
                HTTPStatus.BAD_REQUEST,
                f"{key}: {'a number' if kind is float else 'an integer'} from {low} to {high} "
                "is required",
            )
        values[key] = value
    runs = values["repeats"] * values["iterations"] * values["sessions"]
    if runs > MAX_RUNS:  # each bound alone allowed a job of 10^10 runs
        raise Rejected(
            HTTPStatus.BAD_REQUEST,
            f"repeats x iterations x sessions is {runs} timed runs; this agent times at most "
            f"{MAX_RUNS} per job",
        )
    return TargetSpec(**values)


def _level(value: Any) -> float | None:
    """The candidate structure's fastest round (ms) a client names: a positive finite
    number, or None (a client from before it, or none known yet)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e7:
        raise Rejected(
            HTTPStatus.BAD_REQUEST,
            "candidate_level_ms: a number of milliseconds above 0 (and below 10^7), or null, "
            "is required",
        )
    return float(value)


def _inputs(specs: list[InputSpec], batch_size: int) -> dict[str, np.ndarray]:
    """A seeded batch for each of the model's inputs (the batch axis is the first), of at
    most MAX_INPUT_ELEMENTS values in all (a 98-byte model declaring a 16384x16384 input
    took 11.8 s and 2.8 GB)."""
    batch, total = {}, 0
    for value in specs:
        dims = [batch_size, *value.dims]
        if 0 in dims[1:]:
            shape = ["?" if d == 0 else d for d in dims]
            raise Rejected(HTTPStatus.BAD_REQUEST, f"the input shape {shape} is not fixed")
        if value.dtype not in FED:
            raise Rejected(
                HTTPStatus.BAD_REQUEST,
                f"input {value.name!r}: its type {value.dtype!r} cannot be fed; this agent "
                f"feeds {', '.join(FED)}",
            )
        elements = math.prod(dims)  # Python ints: no wrap-around
        total += elements
        if total > MAX_INPUT_ELEMENTS:
            raise Rejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"an input batch of shape {dims} holds {elements} values; this agent takes "
                f"at most {MAX_INPUT_ELEMENTS} in all",
            )
        batch[value.name] = _values(value.dtype, dims)
    return batch


def _values(dtype: str, dims: list[int]) -> np.ndarray:
    if dtype != "float32":  # ids or flags: zero is a valid one of every vocabulary
        return np.zeros(dims, dtype=np.dtype(dtype))
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def _runs_on(runner: Any, batch: dict[str, np.ndarray]) -> None:
    """One untimed run: a model that does not take the batch is the client's mistake."""
    try:
        runner(batch)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        shapes = "; ".join(f"{name} {list(v.shape)}" for name, v in batch.items())
        raise Rejected(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"the model does not run on a batch of shape {shapes}: {reason}",
        ) from None


class _Handler(BaseHTTPRequestHandler):
    agent: Agent  # set on the subclass that make_server() makes
    timeout = 60  # seconds: a connection that stalls is dropped, not waited on forever
    read_deadline_s = READ_DEADLINE_S

    def setup(self) -> None:
        super().setup()
        self.read = threading.Event()
        self.deadline = threading.Timer(self.read_deadline_s, self._expire)
        self.deadline.daemon = True
        self.deadline.start()

    def _restart_deadline(self) -> None:
        """A fresh deadline for the body, from now, with a second per MB it declares (a
        256 MB upload at 8 MB/s)."""
        self.deadline.cancel()
        length = self.headers.get("Content-Length") or "0"
        size = int(length) if length.isdigit() else 0
        self.deadline = threading.Timer(self.read_deadline_s + size / 8e6, self._expire)
        self.deadline.daemon = True
        self.deadline.start()

    def _expire(self) -> None:
        """The request was not all in by its deadline: the connection is closed."""
        if not self.read.is_set():
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.deadline.cancel()
        super().finish()

    def do_GET(self) -> None:  # noqa: N802  (the name http.server calls)
        self.read.set()  # a GET has no body: its headers were the whole request
        self._answer(self._info)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _info(self) -> dict[str, Any]:
        if self.path != "/info":
            raise Rejected(HTTPStatus.NOT_FOUND, f"no such call: GET {self.path}")
        return {
            "fingerprint": hardware_fingerprint(),
            "max_bytes": self.agent.max_bytes,
            "runtimes": self.agent.runtimes(),
        }

    def _post(self) -> dict[str, Any]:
        if self.path == "/models" or self.path.startswith("/models/"):
            runtime = self.path.removeprefix("/models").strip("/") or "onnxruntime"
            self.agent.format_of(runtime)  # before the body: an unserved runtime reads none
            with self.agent.upload_slots:
                self._restart_deadline()  # waiting for a slot is not the client's time
                return self.agent.add_model(self._body(self.agent.max_bytes), runtime)
        if self.path == "/measure":
            try:
                job = json.loads(self._body(MAX_JSON_BYTES))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise Rejected(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
            if not isinstance(job, dict):
                raise Rejected(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
            return self.agent.measure(job)
        raise Rejected(HTTPStatus.NOT_FOUND, f"no such call: POST {self.path}")

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Rejected(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if int(length) > limit:  # refused before a byte of it is read
            raise Rejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the upload is {int(length)} bytes; this agent takes at most {limit}",
            )
        body = self.rfile.read(int(length))
        self.read.set()  # the whole request is in: the read deadline no longer applies
        return body

    def _answer(self, handle: Any) -> None:
        try:
            if not self.agent.authorised(self.headers.get("Authorization")):
                raise Rejected(HTTPStatus.UNAUTHORIZED, "missing or wrong token")
            status, payload = HTTPStatus.OK, handle()
        except Rejected as exc:
            status, payload = exc.status, {"error": str(exc)}
            self.close_connection = True  # an unread body must not become the next request
        except Exception as exc:  # a fault of the agent: one line, no traceback to the client
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(exc).__name__}
            self.close_connection = True
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the CLI reports what matters; no per-request noise


def make_server(
    agent: Agent,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    max_connections: int = MAX_CONNECTIONS,
    read_deadline_s: float = READ_DEADLINE_S,
) -> ThreadingHTTPServer:
    """An HTTP server for the agent (port 0 picks a free one: see server.server_port).
    Requests are served in threads, so a stalled client cannot hold the others up;
    measurements still run one at a time (Agent.lock). At most `max_connections` are
    open at once, each must send its whole request within `read_deadline_s`."""
    handler = type("Handler", (_Handler,), {"agent": agent, "read_deadline_s": read_deadline_s})
    return _Server((host, port), handler, max_connections)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog (5 by default)
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # full: closed at once, not queued
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


# --------------------------------------------------------------------------- the client


def _timings(
    answer: dict[str, Any],
) -> tuple[LatencyStats, LatencyStats | None, float | None, list[float]]:
    theirs, ratio = answer.get("reference"), answer.get("ratio")
    return (
        LatencyStats(**answer["candidate"]),
        LatencyStats(**theirs) if theirs else None,
        ratio,
        answer.get("session_ratios") or ([ratio] if ratio is not None else []),
    )


def _nonnegative(value: Any) -> float | None:
    """A number from the agent's answer (a reading's error, a level), or None where it
    sent none (an agent from before it) or not a number of 0 or more."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else None


class AgentClient:
    """What a search uses to measure on an agent."""

    def __init__(self, address: str, token: str, timeout: float = 600.0) -> None:
        self.base = f"http://{address}"
        self.token = token
        self.timeout = timeout
        # sha256 -> (file, runtime), to send again if the agent lost it
        self.sent: dict[str, tuple[Path, str]] = {}
        self.kernels: dict[str, Kernels] = {}  # sha256 -> what the agent compiled it to
        self._max_bytes: int | None = None  # the agent's upload limit, asked once

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/info", None, "application/json")

    def runtimes(self) -> dict[str, str]:
        """The runtimes the agent serves, with their versions (an agent from before
        runtimes were named serves ONNX Runtime)."""
        return dict(self.info().get("runtimes") or {"onnxruntime": "?"})

    def upload(self, path: Path, again: bool = False, runtime: str = "onnxruntime") -> str:
        """Send a runtime file (with any file beside it that the runtime loads); its name
        on the agent."""
        from paretoopt.measure.backends import served

        body = served(runtime).pack(path)
        sha = hashlib.sha256(body).hexdigest()
        if sha in self.sent and not again:
            return sha
        if self._max_bytes is None:
            self._max_bytes = int(self.info()["max_bytes"])
        limit = self._max_bytes
        if len(body) > limit:  # said here: a refused upload would break the connection
            raise AgentError(
                f"agent {self.base}: {path.name} is {len(body)} bytes; the agent takes at "
                f"most {limit} (paretoopt agent --max-bytes)"
            )
        route = "/models" if runtime == "onnxruntime" else f"/models/{runtime}"  # older agents
        answer = self._call("POST", route, body, "application/octet-stream")
        kernels = answer.get("kernels")
        if kernels:
            self.kernels[sha] = Kernels(frozenset(kernels["integer"]), str(kernels["structure"]))
        self.sent[sha] = (path, runtime)
        return sha

    def measure(
        self, model: str, reference: str | None, target: TargetSpec
    ) -> tuple[LatencyStats, LatencyStats | None, float | None, list[float]]:
        """The candidate's and the reference's statistics, their ratio, and the ratio of
        each session (an agent from before sessions times one and sends its ratio)."""
        return _timings(self._measure(model, reference, target))

    def paired(
        self,
        model: str,
        reference: str | None,
        target: TargetSpec,
        candidate_level_ms: float | None = None,
    ) -> PairedTiming:
        """The candidate timed against the reference on the agent, as time_sessions does
        here (an agent from before quiet rounds reads every pair: quiet None, not known).
        `candidate_level_ms`: the fastest round of the candidate's structure on the agent
        so far, so that a timing stuck in the slow state is not read as quiet there
        either."""
        answer = self._measure(model, reference, target, candidate_level_ms)
        ours, theirs, ratio, sessions = _timings(answer)
        if theirs is None or ratio is None:
            raise AgentError(f"agent {self.base}: it returned no reference timing")
        return PairedTiming(
            ours,
            theirs,
            ratio,
            tuple(sessions),
            int(answer.get("pairs", 0)),
            int(answer.get("quiet_pairs", 0)),
            answer.get("quiet"),
            answer.get("quiet_level_ms"),
            _nonnegative(answer.get("candidate_level_ms")) or None,
            error=_nonnegative(answer.get("error")),
        )

    def _measure(
        self,
        model: str,
        reference: str | None,
        target: TargetSpec,
        candidate_level_ms: float | None = None,
    ) -> dict[str, Any]:
        job: dict[str, Any] = {"model": model, "reference": reference}
        if candidate_level_ms is not None:  # an agent from before it ignores the key
            job["candidate_level_ms"] = candidate_level_ms
        job.update({k: getattr(target, k) for k in PROTOCOL_LIMITS})
        body = json.dumps(job).encode()
        try:
            return self._call("POST", "/measure", body, "application/json")
        except AgentError as exc:  # the agent restarted or dropped a model: send it again
            if exc.status != HTTPStatus.NOT_FOUND:
                raise
            for sha in (model, reference):
                if sha in self.sent:
                    path, runtime = self.sent[sha]
                    self.upload(path, again=True, runtime=runtime)
            return self._call("POST", "/measure", body, "application/json")

    def _call(self, method: str, path: str, body: bytes | None, kind: str) -> dict[str, Any]:
        req = request.Request(self.base + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", kind)
        try:
            with request.urlopen(req, timeout=self.timeout) as answer:
                text = answer.read()
            return json.loads(text)
        except error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except (json.JSONDecodeError, OSError):
                reason = exc.reason
            raise AgentError(
                f"agent {self.base}: {method} {path}: {exc.code} {reason}", exc.code
            ) from None
        except TimeoutError:
            raise AgentError(
                f"agent {self.base}: {method} {path}: no answer within {self.timeout:.0f} s"
            ) from None
        except json.JSONDecodeError:
            raise AgentError(
                f"agent {self.base}: {method} {path}: the answer is not JSON"
            ) from None
        except (error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AgentError(f"agent {self.base}: cannot reach it: {reason}") from None
