"""The agent's admin HTTP endpoint (`admin: host:port`): /healthz (every workload has a certificate that has not
expired) and /status (JSON: each workload's certificate facts, key fingerprint, SDS streams, endpoints; the trust)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from http import HTTPStatus
from typing import Any

from meshca.admin.server import HttpEndpoint
from meshca.agent.service import NodeAgent, WorkloadStatus
from meshca.clock import Clock
from meshca.listen import format_address

_TEXT = "text/plain; charset=utf-8"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def health_problems(agent: NodeAgent, now: datetime) -> list[str]:
    """One line per reason the agent is not ready: not running, a task that ended, and each workload without a
    certificate or with an expired one (a workload found in workloads_dir counts from when it is found)."""
    if not agent.running:
        return ["agent: not running"]
    problems = [f"agent: task {name} ended" for name in agent.ended_tasks()]
    for status in agent.status():
        served = status.served
        if served is None:
            why = "no certificate yet"
        elif served.not_after <= now:
            why = f"certificate {served.serial_number} expired at {served.not_after.isoformat()}"
        else:
            continue
        if status.last_failure is not None:
            why += f" (last CSR failed: {_one_line(status.last_failure)})"
        problems.append(f"{status.name}: {why}")
    return problems


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def workload_json(status: WorkloadStatus) -> dict[str, Any]:
    """One workload as /status shows it: facts about its certificate and key, never the key, never its token."""
    served = status.served
    endpoints = status.endpoints
    registered = None if endpoints is None else endpoints.registered
    return {
        "name": status.name,
        "socket": status.socket,
        "spiffe_id": None if served is None else served.spiffe_id,
        "serial": None if served is None else served.serial_number,
        "not_before": _time(None if served is None else served.not_before),
        "not_after": _time(None if served is None else served.not_after),
        "received_at": _time(None if served is None else served.received_at),
        "renew_at": _time(None if served is None else served.renew_at),
        "key_sha256": None if served is None else served.key_sha256,
        "issued": status.issued,
        "failures": status.failures,
        "last_failure": status.last_failure,
        "sds_streams": status.streams,
        "endpoints": None if endpoints is None else {
            "endpoints": [{"service": e.service, "address": e.address, "port": e.port} for e in endpoints.endpoints],
            "registered": registered is not None,
            "accepted_services": [] if registered is None else list(registered.accepted_services),
        },
    }


def status_json(agent: NodeAgent, now: datetime) -> dict[str, Any]:
    """What /status answers."""
    problems = health_problems(agent, now)
    trust = agent.trust
    directory = agent.directory
    return {
        "ready": not problems,
        "problems": problems,
        "workloads": [workload_json(s) for s in sorted(agent.status(), key=lambda s: s.name)],
        "trust": None if trust is None else {
            "version": trust.version, "roots": trust.roots, "crls": trust.crls, "source": trust.source,
        },
        "workloads_dir": None if directory is None else {
            "path": str(directory.settings.path), "problems": dict(sorted(dict(directory.problems).items())),
        },
    }


class AgentAdmin:
    """Serves the agent's /healthz and /status over HTTP from a daemon thread (meshca.admin.server.HttpEndpoint)."""

    def __init__(self, agent: NodeAgent, clock: Clock, logger: logging.Logger) -> None:
        self._agent = agent
        self._clock = clock
        self._log = logger
        self._http = HttpEndpoint(self, logger, "admin", "meshca-agent-admin")

    @property
    def port(self) -> int | None:
        return self._http.port

    def get(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        if path == "/healthz":
            problems = health_problems(self._agent, self._clock())
            if not problems:
                return HTTPStatus.OK, _TEXT, b"ok\n"
            return HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, "".join(f"{p}\n" for p in problems).encode()
        if path == "/status":
            body = json.dumps(status_json(self._agent, self._clock()), indent=2).encode() + b"\n"
            return HTTPStatus.OK, "application/json", body
        return HTTPStatus.NOT_FOUND, _TEXT, b"not found: try /healthz, /status\n"

    def start(self, host: str, port: int) -> int:
        """Bind and serve; the bound port. ListenError (naming `admin` and the address) when it cannot bind."""
        bound = self._http.start(host, port)
        self._log.info("admin endpoint (healthz, status) on http://%s", format_address(host, bound))
        return bound

    def stop(self) -> None:
        self._http.stop()
