"""Isolation: no latency is taken while any paretoopt process on the machine computes.

A background training process on the same cores turned a 0.85 ms batch-1 latency into
124 ms here, so a measurement taken beside training is worthless. Every paretoopt
process on a machine therefore shares one gate, a pair of lock files:

- computing (a fine-tuning step, an export, an evaluation) passes the gate *shared*, so
  any number of workers compute side by side;
- measuring holds it *exclusively*: it waits for the steps already running (one step
  each, milliseconds) and no new step starts until it is done.

The ``turnstile`` lock gives measurement priority: a step must pass it before entering,
and a waiting measurement holds it, so a stream of steps from several workers cannot
starve the measurement. Locks are flock(2) locks: the kernel drops them when a process
dies, so a killed worker never leaves the gate shut.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

GATE_ENV = "PARETOOPT_GATE_DIR"  # another folder for the gate (one gate per folder)


def default_gate_dir() -> Path:
    """One gate per user and machine, unless PARETOOPT_GATE_DIR names another (a shared
    folder gives several users one gate)."""
    configured = os.environ.get(GATE_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"paretoopt-{os.getuid()}"


class MeasurementGate:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_gate_dir()
        self._files: dict[str, IO[bytes]] = {}
        self._held = False  # flock on one open file cannot nest: a nested use would unlock

    def _file(self, name: str) -> IO[bytes]:
        if name not in self._files:  # one open file per lock and gate: flock is per open file
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.directory.stat().st_uid != os.getuid():  # another user could hold it shut
                raise PermissionError(
                    f"{self.directory}: the measurement gate belongs to another user; set "
                    f"{GATE_ENV} to a folder of your own"
                )
            self._files[name] = open(self.directory / f"{name}.lock", "ab")  # noqa: SIM115
        return self._files[name]

    @contextmanager
    def _hold(self) -> Iterator[None]:
        if self._held:
            raise RuntimeError("the measurement gate is already held by this object")
        self._held = True
        try:
            yield
        finally:
            self._held = False

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Held shared around work that loads the CPU (one training step, one export)."""
        with self._hold(), self._computing():
            yield

    @contextmanager
    def _computing(self) -> Iterator[None]:
        turnstile, room = self._file("turnstile"), self._file("room")
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Held exclusively while latency is timed: nothing else computes meanwhile."""
        with self._hold(), self._measuring():
            yield

    @contextmanager
    def _measuring(self) -> Iterator[None]:
        turnstile, room = self._file("turnstile"), self._file("room")
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(room, fcntl.LOCK_UN)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
