"""Shared pieces: result rows, profiles, child processes spoken to in JSON lines, RSS, percentiles."""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRUST_DOMAIN = "mesh.test"
REPO = Path(__file__).resolve().parent.parent


# -- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured figure, its same-run baseline and the issue's target."""

    name: str
    value: float | None
    unit: str
    baseline_name: str | None
    baseline_value: float | None
    target: str
    met: bool | None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "name": self.name,
            "value": _round(self.value),
            "unit": self.unit,
            "baseline_name": self.baseline_name,
            "baseline_value": _round(self.baseline_value),
            "ratio": _round(ratio),
            "target": self.target,
            "met": self.met,
            "parameters": self.parameters,
        }


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}") if abs(value) < 1e6 else round(value)


def failed_row(name: str, unit: str, target: str, error: BaseException | str, **parameters: Any) -> Row:
    """A row for a benchmark that could not produce its figure: value null, met null, the error named."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Row(name, None, unit, None, None, target, None, {**parameters, "error": text[-2000:]})


@dataclass(frozen=True)
class Profile:
    """Counts and durations of one run; `quick` finishes in minutes, `full` has the 10,000-stream rows."""

    name: str
    leaf_seconds: float = 3.0
    csr_concurrency: int = 16
    csr_seconds: float = 5.0
    csr_warmup: float = 1.0
    build_services: int = 1000
    build_endpoints: int = 10
    build_budget_seconds: float = 40.0  # repetitions of the snapshot build stop when this is spent
    build_max_reps: int = 3
    rss_streams: int = 1000
    convergence_streams: int = 1000
    convergence_services: int = 1000
    stream_processes: int = 2
    streams_per_channel: int = 100
    envoys: int = 3
    envoy_rounds: int = 10
    rotation_streams: int = 1000  # rotation_storm runs in the full profile, or when asked for by --only
    rotation_window_seconds: float = 30.0
    failover_streams: int = 3000  # failover_reconnect: streams on the replica that is killed
    agent_workloads: int = 200  # agent_start: workloads started at once through agents, then through central SDS
    agent_processes: int = 2  # agent_start: load-generator processes the workloads are split over
    agent_waves: tuple[int, ...] = (0,)  # agent_start: one pass per wave size (0: all at once, the row's value)


QUICK = Profile("quick")
FULL = Profile(
    "full",
    leaf_seconds=5.0,
    csr_seconds=10.0,
    build_max_reps=5,
    build_budget_seconds=120.0,
    rss_streams=10_000,
    convergence_streams=10_000,
    stream_processes=5,
    envoys=10,
    envoy_rounds=20,
    rotation_streams=10_000,
    rotation_window_seconds=120.0,
    agent_waves=(0, 20),
)


def server_args(**args: Any) -> dict[str, Any]:
    """Arguments for benchmarks.meshca_server; with run.py --cprofile, the server profiles itself."""
    path = os.environ.get("MESHCA_BENCH_CPROFILE")
    if path:
        args["cprofile"] = path
    return args


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def settle_rss(pid: int, seconds: float = 2.0, interval: float = 0.25) -> int:
    """RSS once it stops growing for `seconds` (or after 6x that): the value after the last sample."""
    deadline = time.monotonic() + seconds * 6
    last = rss_kb(pid)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = rss_kb(pid)
        if abs(now - last) > 256:  # KiB
            stable_since = time.monotonic()
        last = now
        if time.monotonic() - stable_since >= seconds:
            break
    return last


# -- child processes ---------------------------------------------------------------------------


class ChildError(RuntimeError):
    pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


class Child:
    """A `python -m benchmarks.<module>` subprocess: one JSON line when ready, then one reply per command.

    Killed by PID on stop, on garbage collection and at interpreter exit.
    """

    def __init__(self, module: str, args: Mapping[str, Any], log_path: Path, *, env: Mapping[str, str] | None = None):
        self.module = module
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{module}", json.dumps(dict(args))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            env=child_env,
        )
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True, name=f"child-{module}")
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.module} (pid {self.pid}) gave no answer within {timeout:.0f}s; {self.tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise ChildError(f"{self.module} (pid {self.pid}) exited with {self.proc.wait()}; {self.tail()}")
            text = line.decode(errors="replace").strip()
            if not text.startswith("{"):
                continue  # stray output of a library
            message = json.loads(text)
            if "error" in message:
                raise ChildError(f"{self.module}: {message['error']}")
            return message

    def ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return self._next(timeout)

    def call(self, cmd: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        self.proc.stdin.flush()
        return self._next(timeout)

    def send(self, cmd: str, **args: Any) -> None:
        """Send a command without waiting; collect its answer with `reply`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        self.proc.stdin.flush()

    def reply(self, timeout: float = 120.0) -> dict[str, Any]:
        return self._next(timeout)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return "log tail:\n" + "\n".join(text)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self._finalizer()
        self._log.close()


def stop_all(children: Sequence[Child | None]) -> None:
    for child in children:
        if child is not None:
            child.stop()


# -- child side --------------------------------------------------------------------------------


def child_args() -> dict[str, Any]:
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


def emit(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


Handler = Callable[[dict[str, Any]], Awaitable[Mapping[str, Any]]]


async def serve_commands(handlers: Mapping[str, Handler]) -> None:
    """Answer JSON-line commands from stdin until `quit` or EOF (the parent went away)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(inbox.put_nowait, line)
        loop.call_soon_threadsafe(inbox.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True, name="stdin").start()
    while True:
        line = await inbox.get()
        if line is None:
            return
        if not line.strip():
            continue
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            return
        handler = handlers.get(name)
        if handler is None:
            emit({"error": f"unknown command {name!r}"})
            continue
        try:
            emit(dict(await handler(command)))
        except Exception as error:  # reported to the parent, which fails the benchmark with it
            traceback.print_exc()
            emit({"error": f"{name}: {type(error).__name__}: {error}"})
