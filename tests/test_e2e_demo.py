"""`meshca demo` as a user runs it: the admin URL, progress, Ctrl-C (exit 130), a child that dies (fails fast)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


class DemoRun:
    """`meshca demo ...` in a child process; its stdout lines arrive in a queue as they are printed."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshca.cli.main", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, text: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}; output so far:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        code = self.process.wait(timeout)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()


@pytest.fixture
def runs() -> Iterator[list[DemoRun]]:
    started: list[DemoRun] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def processes_under(directory: Path) -> dict[int, str]:
    """pid -> command line of every process whose command line names `directory` (the demo's children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline and int(entry.name) != os.getpid():
            found[int(entry.name)] = cmdline
    return found


def test_ctrl_c_stops_everything_and_exits_130(runs: list[DemoRun], tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    run = DemoRun("--workdir", str(workdir))
    runs.append(run)
    admin = run.wait_for_line("meshca admin: http://127.0.0.1:")
    assert "meshca status --admin http://127.0.0.1:" in admin
    run.wait_for_line("sending a request every second")
    run.process.send_signal(signal.SIGINT)
    code, stderr = run.finish()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert processes_under(workdir) == {}  # meshca and the Envoys are gone


def test_a_dying_child_fails_the_demo_at_once_and_progress_is_shown(runs: list[DemoRun], tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    run = DemoRun("--check", "--duration", "120s", "--workdir", str(workdir))
    runs.append(run)
    run.wait_for_line("sending requests continuously for 120 s")
    progress = run.wait_for_line(" s: ", timeout=15)
    assert " ok, 0 failed; certificate rotations seen " in progress
    [backend_envoy] = [pid for pid, cmd in processes_under(workdir).items() if "envoy-backend" in cmd]
    os.kill(backend_envoy, signal.SIGKILL)
    killed = time.monotonic()
    code, stderr = run.finish(timeout=30)
    assert time.monotonic() - killed < 10, "the demo noticed the dead sidecar late"
    assert code == 2
    assert stderr.startswith("meshca: error: demo failed: the backend sidecar (Envoy) exited"), stderr
    assert processes_under(workdir) == {}
