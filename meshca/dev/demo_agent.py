"""`meshca demo --agent`: the demo's sidecars in agent mode: one `meshca agent` makes every workload's key, serves its
certificate over SDS on a Unix socket and registers the backend's endpoint; meshca sends no private key."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from meshca.ca import crypto
from meshca.clock import Clock
from meshca.dev.demo import ChildDied, Demo, DemoSettings
from meshca.dev.envoy_process import EnvoyProcess, dynamic_active_secrets, dynamic_endpoint_configs
from meshca.dev.harness import BACKEND, FRONTEND, INTRUDER, Workload
from meshca.dev.processes import terminate
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic

WORKLOADS = (BACKEND, FRONTEND, INTRUDER)
CALLERS = (FRONTEND, INTRUDER)  # the sidecars with an outbound route to backend
PRIVATE_KEYS_METRIC = "meshca_xds_private_keys_sent_total"
_SOCKET_PATH_LIMIT = 100  # sun_path holds 108 bytes on Linux (104 on macOS); a long --workdir gets a short directory
# The agent's line for each certificate it serves (meshca.agent.workload): the serial and its key's SHA-256 prefix.
_SERVED = re.compile(r"workload (\S+): serving certificate serial ([0-9a-f]+) for \S+, expires \S+, key sha256 ([0-9a-f]+);")


@dataclass(frozen=True)
class ServedKey:
    """A certificate the agent said it serves, with the fingerprint of the key it generated for it."""

    workload: str
    serial: int
    key_sha256_prefix: str


def agent_served_keys(log_text: str) -> list[ServedKey]:
    """Every certificate the agent's log says it served, oldest first (its JSON lines; other lines skipped)."""
    served = []
    for line in log_text.splitlines():
        try:
            message = json.loads(line).get("msg", "")
        except (ValueError, AttributeError):
            continue
        match = _SERVED.match(message) if isinstance(message, str) else None
        if match is not None:
            served.append(ServedKey(match.group(1), int(match.group(2), 16), match.group(3)))
    return served


def envoy_leaf_key(envoy: EnvoyProcess) -> tuple[int, str] | None:
    """(serial, SHA-256 of the public key) of the `default` leaf the Envoy accepted, from its /config_dump."""
    secret = dynamic_active_secrets(envoy.config_dump()).get("default")
    inline = (secret or {}).get("tls_certificate", {}).get("certificate_chain", {}).get("inline_bytes", "")
    blocks = crypto.split_pem_certificates(base64.b64decode(inline)) if inline else []
    if not blocks:
        return None
    leaf = crypto.parse_certificate_pem(blocks[0])
    return leaf.serial_number, hashlib.sha256(leaf.public_key.spki_der).hexdigest()


def eds_endpoints(envoy: EnvoyProcess, cluster: str) -> set[tuple[str, int]]:
    """The (address, port) pairs the Envoy's EDS holds for `cluster` (its /config_dump?include_eds)."""
    assignment = dynamic_endpoint_configs(envoy.config_dump(include_eds=True)).get(cluster, {})
    return {
        (lb["endpoint"]["address"]["socket_address"]["address"], lb["endpoint"]["address"]["socket_address"]["port_value"])
        for group in assignment.get("endpoints", [])
        for lb in group.get("lb_endpoints", [])
    }


class AgentDemo(Demo):
    """The demo with every sidecar in agent mode (docs/demo.md, "Agent mode")."""

    def __init__(self, settings: DemoSettings, out: TextIO, clock: Clock) -> None:
        super().__init__(settings, out, clock)
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_dir = self.workdir / "agent"
        self.socket_dir = self.agent_dir
        self._own_socket_dir: Path | None = None
        if len(str(self.agent_dir / "intruder.sock")) > _SOCKET_PATH_LIMIT:
            self._own_socket_dir = self.socket_dir = Path(tempfile.mkdtemp(prefix="meshca-agent-"))

    @property
    def agent_log(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def agent_config(self) -> Path:
        return self.agent_dir / "agent.yaml"

    def registered_endpoints(self) -> dict[str, list[dict[str, Any]]]:
        """workload → the endpoints the agent registers for it: the backend's sidecar inbound listener."""
        return {BACKEND.name: [{"service": BACKEND.name, "address": "127.0.0.1", "port": self.ports.backend_inbound}]}

    def mesh_data(self) -> dict[str, Any]:
        """The demo's mesh without the backend's static endpoint: callers learn it only from the agent's registration."""
        data = super().mesh_data()
        data["services"][BACKEND.name]["endpoints"] = []
        return data

    def workload_socket(self, workload: Workload) -> Path:
        """Where the agent serves `workload`'s secrets."""
        return self.socket_dir / f"{workload.name}.sock"

    def agent_socket(self, workload: Workload) -> Path | None:
        return self.workload_socket(workload)

    # -- setup --------------------------------------------------------------------------------

    def start_meshca(self) -> None:
        super().start_meshca()
        self.start_agent()

    def start_agent(self) -> None:
        """One `meshca agent --config` for the node's three workloads, as an operator runs it; returns once it serves
        a certificate on every workload's socket."""
        self.agent_dir.mkdir(parents=True, exist_ok=True)
        signing_key = self.material.signing_key.read_bytes()
        workloads = []
        endpoints = self.registered_endpoints()
        for workload in WORKLOADS:
            token_file = self.agent_dir / f"{workload.name}.jwt"
            token = mint_token(signing_key, namespace=workload.namespace, service_account=workload.service_account,
                               node_id=workload.node_id, now=self.clock())
            write_atomic(token_file, token.encode(), 0o600)
            entry: dict[str, Any] = {"name": workload.name, "token_file": str(token_file),
                                     "socket": str(self.workload_socket(workload)), "socket_mode": "0600"}
            if workload.name in endpoints:
                entry["endpoints"] = endpoints[workload.name]
            workloads.append(entry)
        settings = {"meshca": [f"{host}:{port}" for host, port in self.meshca_endpoints(FRONTEND)],
                    "server_name": "localhost", "ca": str(self.material.root_bundle), "workloads": workloads}
        if self.settings.cert_ttl is not None:  # the agent asks for the lifetime the CSR service signs (its default: 1 h)
            settings["ttl"] = f"{self.settings.cert_ttl.total_seconds():g}s"
        write_atomic(self.agent_config, yaml.safe_dump(settings, sort_keys=False).encode(), 0o644)
        self.say(f"starting meshca agent --config {self.agent_config} (log: {self.agent_log})")
        started = time.monotonic()
        with self.agent_log.open("ab") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "meshca.cli.main", "agent", "--config", str(self.agent_config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        names = {w.name for w in WORKLOADS}
        self.wait_for(lambda: names <= {s.workload for s in agent_served_keys(self.agent_log.read_text())},
                      "the agent serving every workload's certificate")
        self.say(f"  the agent generated {len(names)} keys, had them signed by CSR and serves them on "
                 f"{self.socket_dir}/<workload>.sock ({time.monotonic() - started:.2f} s)")

    def check_children(self) -> None:
        if self.agent is not None and self.agent.poll() is not None:
            tail = "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-15:])
            raise ChildDied(f"the meshca agent exited with status {self.agent.returncode} (log {self.agent_log}):\n{tail}")
        super().check_children()

    def _wait_converged(self) -> None:
        super()._wait_converged()
        expected = self.expected_endpoints()
        cluster = f"outbound|{BACKEND.name}"
        self.wait_for(lambda: all(expected <= eds_endpoints(self.envoys[c.name], cluster) for c in CALLERS),
                      "the registered endpoints in every caller's EDS")
        where = ", ".join(f"{address}:{port}" for address, port in sorted(expected))
        self.say(f"backend's endpoint {where}, registered by the agent, is in the EDS of "
                 f"{' and '.join(c.name for c in CALLERS)}'s sidecars (the mesh file lists none)")

    # -- what the check adds ------------------------------------------------------------------

    def expected_endpoints(self) -> set[tuple[str, int]]:
        return {(e["address"], e["port"]) for entries in self.registered_endpoints().values() for e in entries}

    def endpoints_registered(self) -> int:
        """How many registered endpoints every caller's Envoy holds in EDS; -1 when an Envoy holds one more (then EDS
        did not come only from the registrations)."""
        expected = self.expected_endpoints()
        held = [eds_endpoints(self.envoys[c.name], f"outbound|{BACKEND.name}") for c in CALLERS]
        if any(endpoints - expected for endpoints in held):
            return -1
        return min(len(endpoints & expected) for endpoints in held)

    def envoy_keys_from_agent(self) -> bool:
        """Every sidecar's `default` leaf is one the agent served, and its key is the one the agent generated (the
        SHA-256 of the public key the agent logged for that serial)."""
        served = agent_served_keys(self.agent_log.read_text(errors="replace"))
        for name, envoy in self.envoys.items():
            leaf = envoy_leaf_key(envoy)
            if leaf is None:
                return False
            serial, key_sha256 = leaf
            if not any(s.workload == name and s.serial == serial and key_sha256.startswith(s.key_sha256_prefix)
                       for s in served):
                return False
        return True

    def private_keys_sent_by_server(self) -> int | None:
        """meshca's own count of private keys its xDS server sent, from its /metrics (None: not readable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=5) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        found = re.search(rf"^{PRIVATE_KEYS_METRIC} (\S+)$", text, re.MULTILINE)
        return None if found is None else int(float(found.group(1)))

    def run_check(self) -> tuple[int, dict[str, Any]]:
        status, summary = super().run_check()
        registered = self.endpoints_registered()
        from_agent = self.envoy_keys_from_agent()
        keys = self.private_keys_sent_by_server()
        expected = len(self.expected_endpoints())
        self.say(f"meshca's {PRIVATE_KEYS_METRIC}: {keys}"
                 + (" (no private key left meshca: the sidecars' keys were made by the agent)" if keys == 0 else ""))
        self.say(f"registered endpoints in every caller's EDS: {registered} of {expected}; every sidecar's key is one "
                 f"the agent generated (/config_dump leaf vs the agent's key sha256): {from_agent}")
        summary.update({
            "private_keys_sent_by_server": keys,
            "endpoints_registered": registered,
            "endpoints_expected": expected,
            "envoy_keys_from_agent": from_agent,
        })
        ok = status == 0 and keys == 0 and registered == expected and from_agent
        return (0 if ok else 1), summary

    # -- teardown -------------------------------------------------------------------------------

    def stop(self) -> None:
        for envoy in self.envoys.values():  # the sidecars first: they lose their SDS server last
            envoy.stop()
        if self.agent is not None:
            terminate(self.agent, 10)
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
        super().stop()
