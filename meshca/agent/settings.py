"""The agent's YAML settings (`meshca agent --config FILE`): where meshca is, and each local workload's token and socket."""

from __future__ import annotations

import grp
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshca.agent.registration import Endpoint
from meshca.fields import FieldReader, parse_host_port, read_yaml_mapping

_SOCKET_MODES = {"0600": 0o600, "0660": 0o660}


@dataclass(frozen=True)
class WorkloadSettings:
    """One local workload: its JWT file (re-read on every use) and the Unix socket its Envoy takes SDS from."""

    name: str
    token_file: Path
    socket: Path
    socket_mode: int = 0o600
    socket_group: str | None = None
    endpoints: tuple[Endpoint, ...] = ()
    # The token file is in a directory the workload itself writes (workloads_dir): read it without following a
    # symlink, so that a workload cannot point the agent at another workload's token.
    token_no_symlink: bool = False


@dataclass(frozen=True)
class WorkloadsDirSettings:
    """`workloads_dir`: every subdirectory `<name>/` holding a `token` file is a workload (docs/agent.md, "On Kubernetes")."""

    path: Path
    socket_mode: int = 0o600  # of each `<name>/sds.sock`
    socket_group: str | None = None
    interval: timedelta = timedelta(seconds=1)  # how often the directory is scanned


@dataclass(frozen=True)
class AgentSettings:
    """meshca's replicas (tried in turn), how to verify them, and the workloads this node runs."""

    meshca: tuple[tuple[str, int], ...]
    server_name: str
    ca: Path
    workloads: tuple[WorkloadSettings, ...]
    ttl: timedelta | None = None  # the leaf TTL asked for (None: meshca's default)
    timeout: timedelta = timedelta(seconds=10)  # one CSR call
    workloads_dir: WorkloadsDirSettings | None = None  # workloads discovered from a directory, besides `workloads`
    admin: tuple[str, int] | None = None  # host:port of the HTTP /healthz and /status (meshca.agent.admin); None: off


def load_agent_settings(path: Path) -> AgentSettings:
    """The settings in `path`; ConfigError naming the file and the field otherwise."""
    return parse_agent_settings(path, read_yaml_mapping(path))


def parse_agent_settings(path: Path, data: Mapping[str, Any]) -> AgentSettings:
    reader = FieldReader(path, data)
    reader.check_known({"meshca", "server_name", "ca", "workloads", "workloads_dir", "ttl", "timeout", "admin"})
    addresses = reader.get("meshca", (list, str))
    if isinstance(addresses, str):
        addresses = [addresses]
    if not addresses:
        raise reader.error("meshca", "must list at least one host:port")
    endpoints = []
    for index, text in enumerate(addresses):
        try:
            endpoints.append(parse_host_port(text))
        except ValueError as error:
            raise reader.error(f"meshca[{index}]", str(error)) from None
    server_name = reader.get("server_name", str)
    ca = reader.file("ca")
    assert ca is not None
    workloads_dir = _workloads_dir(reader)
    raw_workloads = reader.get("workloads", list, [] if workloads_dir is not None else ...)
    if not raw_workloads and workloads_dir is None:
        raise reader.error("workloads", "must list at least one workload (or give workloads_dir)")
    workloads = tuple(_workload(reader, index, item) for index, item in enumerate(raw_workloads))
    for key, values in (("name", [w.name for w in workloads]), ("socket", [w.socket for w in workloads])):
        for index, value in enumerate(values):
            if value in values[:index]:
                raise reader.error(f"workloads[{index}].{key}", f"{str(value)!r} is given to two workloads")
    ttl = reader.duration("ttl", required=False)
    if ttl is not None and ttl <= timedelta(0):
        raise reader.error("ttl", "must be positive")
    timeout = reader.duration("timeout", required=False)
    timeout = timedelta(seconds=10) if timeout is None else timeout
    if timeout <= timedelta(0):
        raise reader.error("timeout", "must be positive")
    admin_text = reader.get("admin", str, None)
    admin = None
    if admin_text is not None:
        try:
            admin = parse_host_port(admin_text)
        except ValueError as error:
            raise reader.error("admin", str(error)) from None
    return AgentSettings(tuple(endpoints), server_name, ca, workloads, ttl, timeout, workloads_dir, admin)


def _workloads_dir(parent: FieldReader) -> WorkloadsDirSettings | None:
    """`workloads_dir: PATH`, or `workloads_dir: {path, socket_mode, socket_group, interval}`."""
    raw = parent.get("workloads_dir", (str, Mapping), None)
    if raw is None:
        return None
    reader = parent.child("workloads_dir", raw if isinstance(raw, Mapping) else {"path": raw})
    reader.check_known({"path", "socket_mode", "socket_group", "interval"})
    key = "path" if isinstance(raw, Mapping) else ""
    path = (parent.path.parent / reader.get("path", str)).resolve()
    if not path.is_dir():
        raise reader.error(key, f"directory {str(path)!r} does not exist")
    interval = reader.duration("interval", required=False)
    interval = timedelta(seconds=1) if interval is None else interval
    if interval <= timedelta(0):
        raise reader.error("interval", "must be positive")
    return WorkloadsDirSettings(path, _socket_mode(reader), _socket_group(reader), interval)


def _socket_mode(reader: FieldReader) -> int:
    mode_text = reader.get("socket_mode", (str, int), "0600")
    mode = _SOCKET_MODES.get(mode_text if isinstance(mode_text, str) else f"0{mode_text:o}")
    if mode is None:
        raise reader.error("socket_mode", f"{mode_text!r} is not \"0600\" or \"0660\" (quote it in YAML)")
    return mode


def _socket_group(reader: FieldReader) -> str | None:
    group = reader.get("socket_group", str, None)
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise reader.error("socket_group", f"no group named {group!r} on this node") from None
    return group


def parse_endpoints(path: Path, data: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    """A workload directory's endpoints.yaml: `endpoints:` as in a configured workload (one line naming the field)."""
    reader = FieldReader(path, data)
    reader.check_known({"endpoints"})
    raw_endpoints = reader.get("endpoints", list, [])
    return tuple(_endpoint(reader, i, item) for i, item in enumerate(raw_endpoints))


def _workload(parent: FieldReader, index: int, data: object) -> WorkloadSettings:
    key = f"workloads[{index}]"
    if not isinstance(data, Mapping):
        raise parent.error(key, f"must be a mapping, got {type(data).__name__}")
    reader = parent.child(key, data)
    reader.check_known({"name", "token_file", "socket", "socket_mode", "socket_group", "endpoints"})
    name = reader.get("name", str)
    if not name:
        raise reader.error("name", "must not be empty")
    token_file = reader.file("token_file")
    assert token_file is not None
    socket = (parent.path.parent / reader.get("socket", str)).resolve()
    if not socket.parent.is_dir():
        raise reader.error("socket", f"directory {str(socket.parent)!r} does not exist")
    if len(str(socket).encode()) > 107:  # sun_path holds 108 bytes with the terminating NUL
        raise reader.error("socket", f"{str(socket)!r} is longer than a Unix socket path may be (107 bytes)")
    mode = _socket_mode(reader)
    group = _socket_group(reader)
    raw_endpoints = reader.get("endpoints", list, [])
    endpoints = tuple(_endpoint(reader, i, item) for i, item in enumerate(raw_endpoints))
    return WorkloadSettings(name, token_file, socket, mode, group, endpoints)


def _endpoint(parent: FieldReader, index: int, data: object) -> Endpoint:
    key = f"endpoints[{index}]"
    if not isinstance(data, Mapping):
        raise parent.error(key, f"must be a mapping, got {type(data).__name__}")
    reader = parent.child(key, data)
    reader.check_known({"service", "address", "port"})
    port = reader.get("port", int)
    if not 0 < port < 65536:
        raise reader.error("port", f"{port} is not a port (1..65535)")
    return Endpoint(reader.get("service", str), reader.get("address", str), port)
