"""Workload directory discovery: every `<name>/` under `workloads_dir` holding a `token` file is a workload."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from meshca.agent.registration import TOKEN_LIMIT, Endpoint
from meshca.agent.sds import SocketError
from meshca.agent.settings import WorkloadsDirSettings, WorkloadSettings, parse_endpoints
from meshca.clock import Clock
from meshca.fields import ConfigError, parse_yaml_mapping
from meshca.files import read_no_follow

TOKEN = "token"
ENDPOINTS = "endpoints.yaml"
SOCKET = "sds.sock"
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class Problem:
    """Why a workload directory is unusable (one line naming the file); `stop`: a workload running from it stops."""

    line: str
    stop: bool = False


class WorkloadHost(Protocol):
    """What discovery drives (meshca.agent.service.NodeAgent)."""

    async def add_workload(self, workload: WorkloadSettings) -> None: ...

    async def remove_workload(self, name: str) -> None: ...

    async def set_endpoints(self, name: str, endpoints: Sequence[Endpoint]) -> None: ...


def token_expiry(token: bytes) -> datetime | None:
    """The `exp` claim of a JWT, read without verifying it (meshca verifies the token; here it only tells that a
    workload stopped refreshing its token); None when there is none to read."""
    try:
        payload = token.strip().split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(float(claims["exp"]), UTC)
    except (IndexError, ValueError, KeyError, TypeError, OverflowError, binascii.Error):
        return None


def read_workload(settings: WorkloadsDirSettings, directory: Path, now: datetime) -> WorkloadSettings | Problem | None:
    """The workload `directory` describes; None when it holds no `token` (not a workload, or not yet / no more);
    a Problem when it is unusable. The workload writes this directory, so nothing in it is followed through a
    symlink, nor read past a size limit. A token that has expired means its writer is gone (a pod deleted while
    its `meshca agent enroll` could not clean up): the workload stops."""
    token = directory / TOKEN
    try:
        token_text = read_no_follow(token, TOKEN_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as error:
        return Problem(f"{token}: cannot read it ({error.strerror})")
    if not token_text.strip():
        return Problem(f"{token}: empty")
    expiry = token_expiry(token_text)
    if expiry is not None and expiry <= now:
        return Problem(f"{token}: expired at {expiry.isoformat()} (nothing refreshes it any more)", stop=True)
    endpoints: tuple[Endpoint, ...] = ()
    endpoints_file = directory / ENDPOINTS
    try:
        raw = read_no_follow(endpoints_file, TOKEN_LIMIT)
    except FileNotFoundError:
        pass
    except OSError as error:
        return Problem(f"{endpoints_file}: cannot read it ({error.strerror})")
    else:
        try:
            endpoints = parse_endpoints(endpoints_file, parse_yaml_mapping(endpoints_file, raw))
        except ConfigError as error:
            return Problem(str(error))
    socket = directory / SOCKET
    if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
        return Problem(f"{socket}: longer than a Unix socket path may be ({_MAX_SOCKET_PATH} bytes)")
    return WorkloadSettings(
        directory.name, token, socket, settings.socket_mode, settings.socket_group, endpoints, token_no_symlink=True
    )


def scan(settings: WorkloadsDirSettings, now: datetime) -> dict[str, WorkloadSettings | Problem]:
    """Every workload under `settings.path` by name (or the line saying why its directory is unusable).
    OSError when the directory itself cannot be listed."""
    found: dict[str, WorkloadSettings | Problem] = {}
    with os.scandir(settings.path) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    for name in names:
        workload = read_workload(settings, settings.path / name, now)
        if workload is not None:
            found[name] = workload
    return found


class WorkloadDirectory:
    """Starts a workload when its directory gains a `token`, stops it when the token or the directory goes, and
    re-registers its endpoints when endpoints.yaml changes; a bad directory is logged once (again only when
    its problem changes) and retried at every scan, the others unaffected."""

    def __init__(
        self, settings: WorkloadsDirSettings, host: WorkloadHost, clock: Clock, logger: logging.Logger,
        reserved: Sequence[str] = (),
    ) -> None:
        """`reserved`: names of the configured workloads (a directory may not take one)."""
        self.settings = settings
        self._host = host
        self._clock = clock
        self._log = logger
        self._reserved = frozenset(reserved)
        self.running: dict[str, WorkloadSettings] = {}
        self.problems: dict[str, str] = {}
        self._listing_problem: str | None = None
        self._scanning = asyncio.Lock()

    async def scan_once(self) -> None:
        async with self._scanning:  # one scan at a time (run's and a caller's)
            await self._scan()

    async def _scan(self) -> None:
        try:
            found = await asyncio.to_thread(scan, self.settings, self._clock())
        except OSError as error:
            line = f"workloads_dir {self.settings.path}: cannot list it ({error.strerror}); its workloads keep running"
            if line != self._listing_problem:
                self._log.error(line)
                self._listing_problem = line
            return
        self._listing_problem = None
        for name in list(self.running):
            problem = found.get(name)
            if isinstance(problem, WorkloadSettings) or isinstance(problem, Problem) and not problem.stop:
                continue  # e.g. a bad endpoints.yaml: it keeps running as it was (and the problem is logged below)
            del self.running[name]
            await self._host.remove_workload(name)
            why = problem.line if problem is not None else f"{self.settings.path / name / TOKEN} is gone"
            self._log.info("workload %s: %s: stopped (socket removed, endpoints deregistered, key dropped)", name, why)
        for name in [n for n in self.problems if n not in found]:
            del self.problems[name]
        for name, workload in found.items():
            if isinstance(workload, Problem):
                self._problem(name, workload.line)
            elif name in self.running:
                self._update(name, workload)
                await self._reregister(name, workload)
            else:
                await self._start(name, workload)

    async def _start(self, name: str, workload: WorkloadSettings) -> None:
        if name in self._reserved:
            self._problem(name, f"{self.settings.path / name}: the name {name!r} is a configured workload's")
            return
        try:
            await self._host.add_workload(workload)
        except SocketError as error:
            self._problem(name, str(error))
            return
        self.running[name] = workload
        self.problems.pop(name, None)
        self._log.info("workload %s: found in %s (%d endpoint(s)): started", name, self.settings.path / name,
                       len(workload.endpoints))

    def _update(self, name: str, workload: WorkloadSettings) -> None:
        if self.problems.pop(name, None) is not None:
            self._log.info("workload %s: %s is usable again", name, self.settings.path / name)

    async def _reregister(self, name: str, workload: WorkloadSettings) -> None:
        if workload.endpoints == self.running[name].endpoints:
            return
        self.running[name] = workload
        await self._host.set_endpoints(name, workload.endpoints)
        self._log.info("workload %s: endpoints.yaml changed: %d endpoint(s) registered", name, len(workload.endpoints))

    def _problem(self, name: str, line: str) -> None:
        if self.problems.get(name) != line:
            self.problems[name] = line
            running = "; it keeps running as it was" if name in self.running else ""
            self._log.error("workload directory %s%s; retried every %s", line, running,
                            f"{self.settings.interval.total_seconds():g} s")

    async def run(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Scan every `interval` until cancelled."""
        while True:
            await self.scan_once()
            await sleep(self.settings.interval.total_seconds())
