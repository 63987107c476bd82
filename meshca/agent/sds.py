"""SDS on a workload's Unix socket: meshca.xds's server behind a gate that admits every local peer (the socket's
permissions are the access control), the socket made with its final mode before it appears at its path."""

from __future__ import annotations

import errno
import grp
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc

from meshca.agent.settings import WorkloadSettings
from meshca.clock import Clock
from meshca.xds.cache import SnapshotCache
from meshca.xds.server import Admission, NodeInfo, XdsServer
from meshca.xds.status import ProxyRegistry


class SocketError(Exception):
    """A workload's socket cannot be served; the message is one line naming the socket and why."""


class LocalGate:
    """Admits every stream on one workload's socket to that workload's snapshot."""

    def __init__(self, workload: str) -> None:
        self._workload = workload

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> object:
        return None

    async def admit(self, principal: object, node: NodeInfo) -> Admission:
        return Admission(snapshot_key=self._workload, identity=f"local:{self._workload}")

    def release(self, admission: Admission) -> None:
        pass


def check_socket_path(path: Path) -> None:
    """Remove a stale socket a killed agent left at `path`; SocketError when a live process serves it or it is
    not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise SocketError(f"socket {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SocketError(f"socket {path}: exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketError(f"socket {path}: cannot check whether it is in use: {error.strerror}") from None
        path.unlink(missing_ok=True)  # nobody listens: left by an agent that was killed
        return
    finally:
        probe.close()
    raise SocketError(f"socket {path}: another process is serving it (is another meshca agent running?)")


class WorkloadSocket:
    """A grpc.aio server with SDS (meshca.xds, SotW and delta) for one workload on its Unix socket."""

    def __init__(self, settings: WorkloadSettings, cache: SnapshotCache, clock: Clock, logger: logging.Logger) -> None:
        self.settings = settings
        self.registry = ProxyRegistry(clock)
        self._xds = XdsServer(cache, LocalGate(settings.name), self.registry, logger, max_stream_age=None, clock=clock)
        self._log = logger
        self._server: grpc.aio.Server | None = None

    @property
    def path(self) -> Path:
        return self.settings.socket

    async def start(self) -> None:
        path = self.path
        check_socket_path(path)
        gid = grp.getgrnam(self.settings.socket_group).gr_gid if self.settings.socket_group else -1
        # Bound in a private directory, given its mode and group, then renamed into place: the socket is never
        # reachable at its path with the umask's permissions.
        try:
            private = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        except OSError as error:
            raise SocketError(f"socket {path}: cannot create a file in {path.parent}: {error.strerror}") from None
        server = grpc.aio.server()
        self._xds.add_to_server(server)
        try:
            staged = private / "s"
            if server.add_insecure_port(f"unix:{staged}") == 0:
                raise SocketError(f"socket {path}: gRPC cannot listen on {staged}")
            await server.start()
            try:
                os.chown(staged, -1, gid)
                os.chmod(staged, self.settings.socket_mode)
                os.rename(staged, path)
            except OSError as error:
                await server.stop(0)
                raise SocketError(f"socket {path}: {error.strerror}") from None
        finally:
            shutil.rmtree(private, ignore_errors=True)
        self._server = server
        self._log.info(
            "workload %s: SDS on unix:%s (mode %04o%s)", self.settings.name, path, self.settings.socket_mode,
            f", group {self.settings.socket_group}" if self.settings.socket_group else "",
        )

    async def stop(self, grace: float | None = 0) -> None:
        if self._server is None:
            return
        self._xds.shutdown()
        await self._server.stop(grace)
        self._server = None
        self.path.unlink(missing_ok=True)
