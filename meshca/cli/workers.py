"""`meshca serve --workers N`: a supervisor that runs N serve processes sharing one listening port."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

from meshca.backoff import backoff_delay
from meshca.clock import format_duration

MAX_WORKERS = 256
WORKER_OF_FLAG = "--worker-of"
WORKER_INDEX_FLAG = "--worker-index"


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows about itself: its index (0..N-1) and its supervisor's pid."""

    index: int
    supervisor_pid: int

    def admin_port(self, metrics_port: int | None) -> int | None:
        """Each worker keeps its own proxy registry and metrics, so each serves its own admin endpoint
        (a port cannot be shared: a scrape would land on a random worker): worker i on metrics_port + i."""
        return None if metrics_port is None else metrics_port + self.index


@dataclass(frozen=True)
class SupervisorSettings:
    count: int
    config_path: Path
    restart_initial: timedelta = timedelta(milliseconds=500)
    restart_cap: timedelta = timedelta(seconds=30)
    stable_after: timedelta = timedelta(seconds=30)  # a worker that ran this long restarts from the initial delay
    stop_timeout: timedelta = timedelta(seconds=15)  # after SIGTERM, then SIGKILL
    poll_interval: float = 0.1

    def worker_command(self, index: int, supervisor_pid: int) -> list[str]:
        return [
            sys.executable, "-m", "meshca.cli.main", "serve", "--config", str(self.config_path),
            WORKER_OF_FLAG, str(supervisor_pid), WORKER_INDEX_FLAG, str(index),
        ]


def describe_exit(returncode: int) -> str:
    """'status 3' or 'killed by SIGKILL' for a Popen return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"status {returncode}"


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


Spawn = Callable[[Sequence[str]], "subprocess.Popen[bytes]"]


class Supervisor:
    """Starts `count` workers, restarts one that exits unexpectedly (with a capped exponential backoff),
    and on SIGTERM/SIGINT forwards SIGTERM to every worker and returns once all have exited."""

    def __init__(
        self,
        settings: SupervisorSettings,
        logger: logging.Logger,
        monotonic: Callable[[], float] = time.monotonic,
        spawn: Spawn | None = None,
    ) -> None:
        self._settings = settings
        self._log = logger
        self._monotonic = monotonic
        self._spawn: Spawn = spawn or (lambda argv: subprocess.Popen(list(argv)))
        self._slots = [_Slot(i) for i in range(settings.count)]
        self._stop_signal: int | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _start(self, slot: _Slot) -> None:
        slot.process = self._spawn(self._settings.worker_command(slot.index, os.getpid()))
        slot.started = self._monotonic()
        slot.restart_at = None
        self._log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _reap(self, slot: _Slot) -> None:
        assert slot.process is not None
        code = slot.process.poll()
        if code is None:
            return
        now = self._monotonic()
        ran = now - slot.started
        slot.failures = 1 if ran >= self._settings.stable_after.total_seconds() else slot.failures + 1
        delay = backoff_delay(slot.failures, self._settings.restart_initial, self._settings.restart_cap)
        self._log.warning(
            "worker %d (pid %d) exited unexpectedly (%s) after %.1f s; restarting in %s",
            slot.index, slot.process.pid, describe_exit(code), ran, format_duration(delay),
        )
        slot.process = None
        slot.restart_at = now + delay.total_seconds()

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; 0 once every worker has exited."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in self._slots:
                self._start(slot)
            while self._stop_signal is None:
                for slot in self._slots:
                    if slot.process is not None:
                        self._reap(slot)
                    elif slot.restart_at is not None and self._monotonic() >= slot.restart_at:
                        self._start(slot)
                time.sleep(self._settings.poll_interval)
            return self._stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_all(self) -> int:
        assert self._stop_signal is not None
        running = [s.process for s in self._slots if s.process is not None and s.process.poll() is None]
        self._log.info(
            "%s received: stopping %d worker(s)", signal.Signals(self._stop_signal).name, len(running)
        )
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = self._monotonic() + self._settings.stop_timeout.total_seconds()
        for process in running:
            try:
                process.wait(timeout=max(deadline - self._monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                self._log.warning("worker pid %d did not stop in time: killing it", process.pid)
                process.kill()
                process.wait()
        self._log.info("all workers stopped")
        return 0
