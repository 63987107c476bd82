"""`meshca demo`: real Envoy sidecars talking mTLS with certificates and routes from a real meshca."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml
from cryptography import x509

from meshca.ca.api import CaSettings
from meshca.clock import Clock
from meshca.dev.envoy_process import (
    EnvoyProcess,
    dynamic_active_clusters,
    dynamic_listeners,
    wait_until,
)
from meshca.dev.harness import (
    BACKEND,
    FRONTEND,
    INTRUDER,
    TRUST_DOMAIN,
    ChainWatcher,
    Ports,
    RequestResult,
    Responder,
    TrafficLoop,
    Workload,
    backend_app,
    crl_serials,
    envoy_certificate,
    envoy_chain,
    frontend_app,
    http_get,
    mesh_config,
    serve_app,
)
from meshca.dev.material import create_dev_material
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap
from meshca.node.trust import TRUST_PEM_FILE, TRUST_SDS_FILE


@dataclass(frozen=True)
class DemoSettings:
    check: bool = False
    requests: int = 20
    interval: float = 1.0
    workdir: Path | None = None
    keep_workdir: bool = False
    startup_timeout: float = 60.0
    cert_ttl: timedelta | None = None  # short leaves (e.g. 20 s) to watch rotation happen
    duration: timedelta | None = None  # with --check: send traffic for this long instead of N requests
    rotate_intermediate_at: timedelta | None = None  # force an intermediate rotation this far in
    ca: str = "internal"  # or "vault" (Vault signs meshca's intermediate) or "vault-leaf" (Vault signs every leaf)
    api_type: str = "DELTA_GRPC"  # the sidecars' ADS flavour; GRPC for state of the world
    progress_every: float = 5.0  # with --duration: a progress line this often (seconds)
    ha: bool = False  # three meshca replicas on a three-member etcd (meshca.dev.demo_ha)
    agent: bool = False  # the sidecars take their keys from one `meshca agent` (meshca.dev.demo_agent)
    # each sidecar takes its trust in meshca from a directory a `meshca trust sync --watch` keeps current
    # (meshca issues its own server certificate then); `trust_sync_interval` is that sync's --interval
    trust_sync: bool = False
    trust_sync_interval: timedelta = timedelta(seconds=1)
    token_files: bool = False  # sidecars read their JWT from a file (each in its own directory), not inline
    ca_settings: CaSettings | None = None  # the internal CA's settings instead of those derived from cert_ttl

    def __post_init__(self) -> None:
        if self.ca == "vault-leaf" and self.rotate_intermediate_at is not None:
            raise ValueError("--rotate-intermediate-at: with --ca vault-leaf Vault signs every leaf; "
                             "meshca has no intermediate to rotate")
        if self.ha and self.ca != "internal":
            raise ValueError("--ha runs the internal CA in etcd; --ca vault with replicas is in docs/ha.md")
        if self.agent and self.ha:
            raise ValueError("--agent and --ha do not combine in this demo: run them one at a time")

    @property
    def vault_mode(self) -> Literal["vault-intermediate", "vault-leaf"] | None:
        """The CA mode of meshca's settings for a Vault demo, None for the internal CA."""
        if self.ca == "vault-leaf":
            return "vault-leaf"
        return "vault-intermediate" if self.ca == "vault" else None


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"meshca exited with status {process.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"meshca did not listen on port {port} within {timeout} s")


def meshca_cli(*args: str) -> str:
    """Run a meshca command as an operator would; its output, or RuntimeError with its error line."""
    result = subprocess.run([sys.executable, "-m", "meshca.cli.main", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"meshca {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class CallerRemoval:
    """What happened when frontend was removed from backend's callers and then put back."""

    changed_at: float  # wall-clock time of the mesh file edit (comparable with Envoy's last_updated)
    refused_at: float | None  # the first request answered other than 200, or None if none within the timeout
    status: int  # that request's status (403 from backend's RBAC; 503 would be a refused new connection)
    same_connection: bool  # frontend's sidecar opened no new connection to backend up to that refusal
    readmitted: bool  # after the edit was undone, requests passed again

    @property
    def refused(self) -> bool:
        return self.refused_at is not None and self.status == 403 and self.same_connection

    @property
    def seconds(self) -> float | None:
        return None if self.refused_at is None else self.refused_at - self.changed_at


UPSTREAM_CONNECTIONS = "cluster.outbound|backend.upstream_cx_total"  # in frontend's sidecar
ABSENT_CALLER = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/auditor"  # an allowed caller no workload is


class ChildDied(RuntimeError):
    """A process the demo started (meshca or an Envoy) exited while the demo ran."""


class Demo:
    """Starts meshca, three sidecars and two tiny apps; sends traffic; reports; cleans everything up."""

    def __init__(self, settings: DemoSettings, out: TextIO, clock: Clock) -> None:
        self.settings = settings
        self.out = out
        self.clock = clock
        self.ports = Ports()
        self.workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="meshca-demo-"))
        self.meshca: subprocess.Popen[bytes] | None = None
        self.openbao: Any = None
        self.vault_address = ""
        self.envoys: dict[str, EnvoyProcess] = {}
        self.bootstraps: dict[str, dict[str, Any]] = {}
        self.trust_syncs: dict[str, subprocess.Popen[bytes]] = {}
        self.servers: list[ThreadingHTTPServer] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- setup --------------------------------------------------------------------------------

    @property
    def mesh_path(self) -> Path:
        return self.workdir / "mesh.yaml"

    def mesh_data(self) -> dict[str, Any]:
        """The demo's mesh file as written at start (and put back after an edit)."""
        return mesh_config(self.ports)

    def agent_socket(self, workload: Workload) -> Path | None:
        """The Unix socket `workload`'s sidecar takes its secrets from (agent mode), or None: from meshca over ADS."""
        return None

    def write_mesh(self, config: dict[str, Any]) -> None:
        """Replace the mesh file atomically; meshca notices the change and pushes it."""
        write_atomic(self.mesh_path, yaml.safe_dump(config, sort_keys=False).encode(), 0o644)

    def start(self) -> None:
        mesh_path = self.mesh_path
        self.write_mesh(self.mesh_data())
        extra: dict[str, Any] = {"mesh": str(mesh_path), "metrics_port": self.ports.metrics}
        ca_settings = None
        if self.settings.cert_ttl is not None:
            ttl = self.settings.cert_ttl.total_seconds()
            extra["leaf_ttl"] = f"{ttl}s"
            # re-issue after a CA change within a fraction of a leaf's life; look for CA changes often
            extra["rotation"] = {"reissue_window": f"{max(ttl / 5, 1)}s", "ca_check_interval": "0.5s"}
            ca_settings = CaSettings(trust_domain=TRUST_DOMAIN, leaf_ttl_min=min(self.settings.cert_ttl, timedelta(minutes=5)))
        if self.settings.vault_mode is not None:
            extra.update(self._vault_settings(self.settings.vault_mode))
        if self.settings.trust_sync:
            # meshca serves a certificate under a new root once every sync has had a few rounds to fetch it
            propagation = self.settings.trust_sync_interval * 4
            extra["rotation"] = {**extra.get("rotation", {}), "trust_propagation": f"{propagation.total_seconds()}s"}
        material = create_dev_material(
            self.workdir / "dev",
            TRUST_DOMAIN,
            self.clock,
            listen=f"127.0.0.1:{self.ports.meshca}",
            extra_settings=extra,
            ca_settings=self.settings.ca_settings or ca_settings,
            self_issued_server_certificate=self.settings.trust_sync,
        )
        self.material = material
        self.say(f"workdir {self.workdir}")
        self.start_meshca()

        self.serve_app(self.ports.backend_app, backend_app("backend"))
        self.serve_app(self.ports.frontend_app, frontend_app(self.ports.frontend_outbound))
        signing_key = material.signing_key.read_bytes()
        for workload in (BACKEND, FRONTEND, INTRUDER):
            token = mint_token(
                signing_key,
                namespace=workload.namespace,
                service_account=workload.service_account,
                node_id=workload.node_id,
                now=self.clock(),
            )
            token_path = None
            if self.settings.token_files:
                token_path = self.token_file(workload.name)
                token_path.parent.mkdir(exist_ok=True)
                write_atomic(token_path, token.encode(), 0o600)
            ca_path, trust_sds = material.root_bundle, None
            if self.settings.trust_sync:
                ca_path, trust_sds = self._start_trust_sync(workload.name, token_path)
            (meshca_address, meshca_port), *more_meshca = self.meshca_endpoints(workload)
            bootstrap = BootstrapSettings(
                node_id=workload.node_id,
                cluster=workload.name,
                meshca_address=meshca_address,
                meshca_port=meshca_port,
                meshca_ca_path=ca_path,
                meshca_server_name="localhost",
                token=None if token_path else token,
                token_path=token_path,
                admin_port=self.ports.admin[workload.name],
                api_type=self.settings.api_type,
                more_meshca=tuple(more_meshca),
                meshca_trust_sds_path=trust_sds,
                agent_socket=self.agent_socket(workload),
            )
            self.bootstraps[workload.name] = build_bootstrap(bootstrap)
            envoy = EnvoyProcess(self.bootstraps[workload.name], workdir=self.workdir / f"envoy-{workload.name}")
            self.envoys[workload.name] = envoy
            envoy.start()
            envoy.wait_ready(self.settings.startup_timeout, live=False)
            self.say(f"started Envoy sidecar for {workload.name} (admin {envoy.admin_url})")
        self._wait_converged()
        admin = f"http://127.0.0.1:{self.ports.metrics}"
        self.say(f"meshca admin: {admin}/status, {admin}/metrics; try: meshca status --admin {admin}")

    def trust_dir(self, name: str) -> Path:
        return self.workdir / f"trust-{name}"

    def token_file(self, name: str) -> Path:
        return self.workdir / f"token-{name}" / "token"

    def _start_trust_sync(self, name: str, token_file: Path | None = None) -> tuple[Path, Path]:
        """A first `meshca trust sync` from the day-one root.pem, then one with --watch kept running, as a node
        would; (the PEM bundle, the SDS file) for the sidecar's bootstrap."""
        directory = self.trust_dir(name)
        directory.mkdir(exist_ok=True)
        where = ["--dir", str(directory), "--meshca", f"127.0.0.1:{self.ports.meshca}", "--server-name", "localhost"]
        if token_file is not None:
            where += ["--token-file", str(token_file)]
        meshca_cli("trust", "sync", *where, "--ca", str(self.material.root_bundle))
        with (self.workdir / f"trust-sync-{name}.log").open("ab") as log:
            self.trust_syncs[name] = subprocess.Popen(
                [sys.executable, "-m", "meshca.cli.main", "trust", "sync", *where, "--watch",
                 "--interval", f"{self.settings.trust_sync_interval.total_seconds()}s"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return directory / TRUST_PEM_FILE, directory / TRUST_SDS_FILE

    def restart_envoy(self, name: str) -> EnvoyProcess:
        """Stop a sidecar and start it again from the same bootstrap file, as a node reboot would."""
        self.envoys[name].stop()
        envoy = EnvoyProcess(self.bootstraps[name], workdir=self.workdir / f"envoy-{name}")
        self.envoys[name] = envoy
        envoy.start()
        envoy.wait_ready(self.settings.startup_timeout, live=False)
        return envoy

    def _vault_settings(self, mode: Literal["vault-intermediate", "vault-leaf"]) -> dict[str, Any]:
        """Use VAULT_ADDR/VAULT_TOKEN when given, else start an OpenBao dev server; set up PKI and AppRole."""
        import hvac

        from meshca.ca.vault.setup import setup_approle, setup_pki
        from meshca.dev.openbao_process import OpenBaoProcess

        address = os.environ.get("VAULT_ADDR")
        if address:
            token = os.environ.get("VAULT_TOKEN")
            if not token:
                raise RuntimeError("VAULT_ADDR is set but VAULT_TOKEN is not: the demo needs a token to set up PKI")
        else:
            self.openbao = OpenBaoProcess()
            self.openbao.start()
            address, token = self.openbao.address, self.openbao.root_token
            self.say(f"started an OpenBao dev server at {address} (no VAULT_ADDR given)")
        client = hvac.Client(url=address, token=token)
        setup_pki(client, trust_domain=TRUST_DOMAIN, mode=mode)
        credentials = setup_approle(client, policies=("meshca",))
        secret_file = self.workdir / "approle-secret-id"
        write_atomic(secret_file, credentials.secret_id.encode(), 0o600)
        self.vault_address = address
        signs = (
            "Vault signs every workload certificate (role pki/roles/meshca)"
            if mode == "vault-leaf"
            else "Vault signed meshca's intermediate, which signs the workload certificates"
        )
        self.say(f"Vault PKI ready: root in Vault's `pki` mount; {signs}; meshca logs in with AppRole "
                 "(least-privilege policy)")
        return {
            "state_dir": str(self.workdir / "vault-ca"),
            "ca": {
                "mode": mode,
                "trust_domain": TRUST_DOMAIN,
                **({"leaf_ttl_min": "10s"} if self.settings.cert_ttl else {}),
                "vault": {
                    "address": address,
                    "mount": "pki",
                    "auth": {"method": "approle", "role_id": credentials.role_id, "secret_id_file": str(secret_file)},
                },
            },
        }

    def vault_root_report(self) -> dict[str, Any]:
        """Vault's root as Vault itself serves it, and whether every sidecar's chain verifies to it."""
        from cryptography.x509.verification import PolicyBuilder, Store

        from meshca.ca import crypto

        with urllib.request.urlopen(f"{self.vault_address}/v1/pki/ca/pem", timeout=5) as response:
            root_pem = response.read()
        root = x509.load_pem_x509_certificate(root_pem)
        verifier = PolicyBuilder().store(Store([root])).build_client_verifier()

        def verifies(chain: list[x509.Certificate]) -> bool:
            try:
                verifier.verify(chain[0], chain[1:])
            except Exception:
                return False
            return True

        def leaf_ca_false(chain: list[x509.Certificate]) -> bool:  # the SPIFFE X509-SVID spec: cA=false
            try:
                return chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
            except x509.ExtensionNotFound:
                return False

        chains = [envoy_chain(envoy) for envoy in self.envoys.values()]
        return {
            "mode": self.settings.vault_mode,
            "vault_address": self.vault_address,
            "root_subject": root.subject.rfc4514_string(),
            "root_fingerprint_sha256": crypto.parse_certificate_pem(root_pem).fingerprint_sha256,
            "chains_verify_to_vault_root": bool(chains) and all(chain and verifies(chain) for chain in chains),
            "leaves_basic_constraints_ca_false": bool(chains) and all(chain and leaf_ca_false(chain) for chain in chains),
            "leaf_issuers": sorted({chain[0].issuer.rfc4514_string() for chain in chains if chain}),
        }

    def more_meshca(self) -> tuple[tuple[str, int], ...]:
        """meshca addresses beside the first in the sidecars' bootstraps (the HA demo's other replicas)."""
        return ()

    def meshca_endpoints(self, workload: Workload) -> tuple[tuple[str, int], ...]:
        """The meshca addresses in `workload`'s bootstrap, the first first (a test may pin a sidecar to a replica)."""
        return (("127.0.0.1", self.ports.meshca), *self.more_meshca())

    @property
    def meshca_log(self) -> Path:
        return self.workdir / "meshca.log"

    def start_meshca(self) -> None:
        self.say(f"starting meshca on 127.0.0.1:{self.ports.meshca} (log: {self.meshca_log})")
        with self.meshca_log.open("ab") as log:
            self.meshca = subprocess.Popen(
                [sys.executable, "-m", "meshca.cli.main", "serve", "--config", str(self.material.serve_config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for_port(self.ports.meshca, self.settings.startup_timeout, self.meshca, self.meshca_log)

    def check_children(self) -> None:
        """Raise ChildDied naming the process and the end of its log when meshca or an Envoy has exited."""
        if self.meshca is not None and self.meshca.poll() is not None:
            tail = "\n".join(self.meshca_log.read_text(errors="replace").splitlines()[-15:])
            raise ChildDied(f"meshca exited with status {self.meshca.returncode} (log {self.meshca_log}):\n{tail}")
        for name, envoy in self.envoys.items():
            if not envoy.running():
                raise ChildDied(f"the {name} sidecar (Envoy) exited ({envoy.log_path}):\n{envoy.log_tail(15)}")

    def kill_meshca(self) -> None:
        """SIGKILL, as a crash would: no cleanup, no graceful stop."""
        if self.meshca is not None and self.meshca.poll() is None:
            self.meshca.kill()
            self.meshca.wait()

    def ca_command(self, *args: str) -> str:
        """Run `meshca ca ...` against the demo's CA state, as an operator would."""
        where = (
            ["--config", str(self.material.serve_config)]
            if self.settings.vault_mode is not None
            else ["--state-dir", str(self.material.state_dir)]
        )
        return meshca_cli("ca", *args, *where)

    def serve_app(self, port: int, respond: Responder) -> None:
        self.servers.append(serve_app(port, respond))

    def _wait_converged(self) -> None:
        expected = {
            BACKEND.name: "inbound|backend",
            FRONTEND.name: f"outbound|{self.ports.frontend_outbound}",
            INTRUDER.name: f"outbound|{self.ports.intruder_outbound}",
        }
        for name, listener in expected.items():
            envoy = self.envoys[name]

            def ready(envoy: EnvoyProcess = envoy, listener: str = listener, name: str = name) -> bool:
                dump = envoy.config_dump()
                return listener in dynamic_listeners(dump) and (
                    name == BACKEND.name or "outbound|backend" in dynamic_active_clusters(dump)
                )

            self.wait_for(ready, f"{name} sidecar configured by meshca")
        self.say("all sidecars configured by meshca over ADS (listeners, clusters, routes, secrets)")

    def wait_for(self, predicate: Callable[[], object], what: str) -> None:
        """wait_until within the startup timeout, failing at once (ChildDied) if a child exits meanwhile."""
        deadline = time.monotonic() + self.settings.startup_timeout
        while True:
            self.check_children()
            try:
                wait_until(predicate, min(1.0, max(deadline - time.monotonic(), 0.0)), 0.1, what)
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    # -- traffic ------------------------------------------------------------------------------

    def workloads_report(self) -> dict[str, dict[str, str | None]]:
        report = {}
        for name, envoy in self.envoys.items():
            view = envoy_certificate(envoy)
            report[name] = {
                "spiffe_id": view.spiffe_id if view else None,
                "serial": view.serial if view else None,
                "expires": view.expires if view else None,
            }
        return report

    def one_request(self) -> RequestResult:
        """client -> frontend app -> frontend sidecar -> mTLS -> backend sidecar -> backend app."""
        status, body = http_get(f"http://127.0.0.1:{self.ports.frontend_app}/")
        backend = body.get("backend") if isinstance(body, dict) else None
        peer = backend.get("peer") if isinstance(backend, dict) else None
        served_by = backend.get("service") if isinstance(backend, dict) else None
        ok = status == 200 and peer == FRONTEND.spiffe_id
        return RequestResult(ok, status, peer, served_by)

    def intruder_request(self) -> int:
        """The intruder's sidecar calls backend; backend's sidecar only admits frontend's identity."""
        status, _ = http_get(f"http://127.0.0.1:{self.ports.intruder_outbound}/steal")
        return status

    def _now(self) -> float:
        """Wall-clock seconds from the injected clock (comparable with Envoy's `last_updated`)."""
        return self.clock().timestamp()

    def caller_removal(self, timeout: float = 10.0, when_refused: Callable[[], object] | None = None) -> CallerRemoval:
        """Remove frontend from backend's `allow` while frontend's sidecar holds a kept-alive connection
        to backend, send requests until one is refused, then undo the edit.

        Requests go to frontend's sidecar directly (what frontend's app does), one after another, so
        its pooled connection to backend is reused: the refusal comes from backend's RBAC filter, per
        request (the route configuration over RDS), not from a new handshake. `when_refused` runs
        after the refusal, before the edit is undone (a test inspects the Envoys there)."""
        outbound = f"http://127.0.0.1:{self.ports.frontend_outbound}/hello"
        frontend = self.envoys[FRONTEND.name]
        self.wait_for(lambda: http_get(outbound)[0] == 200, "frontend -> backend answering")
        opened = frontend.stats().get(UPSTREAM_CONNECTIONS)
        original = self.mesh_data()
        edited = copy.deepcopy(original)
        edited["services"][BACKEND.name]["allow"] = [ABSENT_CALLER]  # an empty list would admit the trust domain
        changed_at = self._now()
        self.write_mesh(edited)
        status, refused_at = 200, None
        while self._now() - changed_at < timeout:
            status, _ = http_get(outbound)
            if status != 200:
                refused_at = self._now()
                break
            time.sleep(0.01)
        same_connection = frontend.stats().get(UPSTREAM_CONNECTIONS) == opened
        if when_refused is not None:
            when_refused()
        self.write_mesh(original)
        readmitted_at = self._now()
        readmitted = False
        while not readmitted and self._now() - readmitted_at < timeout:
            readmitted = http_get(outbound)[0] == 200
            time.sleep(0.01)
        return CallerRemoval(changed_at, refused_at, status, same_connection, readmitted)

    def backend_refused_handshakes(self) -> int:
        stats = self.envoys[BACKEND.name].stats()
        return sum(int(v) for k, v in stats.items() if k.endswith("ssl.fail_verify_san") and str(v).isdigit())

    def revocation_check(self) -> bool | None:
        """`meshca revoke --spiffe-id` frontend, as after a leak (the last step of a check: frontend stays revoked):
        True when its certificate reached every peer's CRL and its next request is refused. In vault-leaf mode Vault
        signed the certificate and no CRL of meshca's lists it: only the refusal counts there."""
        serial = envoy_chain(self.envoys[FRONTEND.name])[0].serial_number
        meshca_cli("revoke", "--spiffe-id", FRONTEND.spiffe_id, "--config", str(self.material.serve_config))
        started = time.monotonic()
        peers = self.crl_peers()
        try:
            wait_until(lambda: all(serial in crl_serials(envoy) for envoy in peers), 10, 0.05, "CRLs")
        except TimeoutError:
            self.say("revoked frontend: its certificate did not reach every peer's CRL within 10 s")
            return False
        propagated = time.monotonic() - started
        try:  # the CRL and the rebuilt routes (RBAC) are separate pushes: the refusal may trail the CRL a little
            wait_until(lambda: not self.one_request().ok, 5, 0.05, "refused")
            refused_after: float | None = time.monotonic() - started
        except TimeoutError:
            refused_after = None
        crls = f"its serial on every peer's CRL after {propagated:.2f} s" if peers else self.no_crl_reason
        self.say(f"revoked {FRONTEND.spiffe_id}: {crls}; its requests "
                 + (f"refused after {refused_after:.2f} s" if refused_after is not None else "still served after 5 s"))
        return refused_after is not None

    no_crl_reason = "Vault signed its certificate: on no CRL of meshca's"

    def crl_peers(self) -> list[EnvoyProcess]:
        """The sidecars whose CRLs must list a revoked frontend (none when its certificate is not meshca's to list)."""
        if self.settings.vault_mode == "vault-leaf":
            return []
        return [envoy for name, envoy in self.envoys.items() if name != FRONTEND.name]

    def print_workloads(self, report: dict[str, dict[str, str | None]]) -> None:
        self.say("workloads (certificates as held by each Envoy, from its admin /certs):")
        for name, info in report.items():
            self.say(f"  {name:<9} {info['spiffe_id']}  serial {info['serial']}  expires {info['expires']}")

    def run_rotation_check(self) -> tuple[int, dict[str, Any]]:
        """Traffic for `duration` while leaves rotate (and the intermediate is forced to)."""
        assert self.settings.duration is not None
        watcher = ChainWatcher(self.envoys)
        watcher.sample()
        rotate_at = self.settings.rotate_intermediate_at
        rotated = False
        started = time.monotonic()
        next_progress = self.settings.progress_every
        self.say(f"sending requests continuously for {self.settings.duration.total_seconds():.0f} s")
        with TrafficLoop(self.one_request) as traffic:
            while (elapsed := time.monotonic() - started) < self.settings.duration.total_seconds():
                self.check_children()
                if elapsed >= next_progress:
                    next_progress += self.settings.progress_every
                    self.say(
                        f"  {elapsed:3.0f} s: {traffic.ok} ok, {len(traffic.failures)} failed; certificate "
                        f"rotations seen {sum(watcher.leaf_rotations().values())}, CA changes {watcher.ca_rotations()}"
                    )
                if rotate_at is not None and not rotated and elapsed >= rotate_at.total_seconds():
                    self.say("forcing an intermediate CA rotation: meshca ca rotate --intermediate --now")
                    self.say("  " + self.ca_command("rotate", "--intermediate", "--now").strip().replace("\n", "\n  "))
                    rotated = True
                watcher.sample()
                time.sleep(0.5)
            watcher.sample()
        leaf_rotations = watcher.leaf_rotations()
        for name, count in leaf_rotations.items():
            self.say(f"  {name:<9} certificate rotations seen in Envoy: {count}")
        self.say(f"  intermediate CA changes seen in every sidecar's chain: {watcher.ca_rotations()}")
        for failure in traffic.failures[:5]:
            self.say(f"  request failed: {failure.detail}")
        self.say(f"requests during rotation: {traffic.ok} ok, {len(traffic.failures)} failed")
        intruder_status = self.intruder_request()
        refused = self.backend_refused_handshakes()
        denied = intruder_status != 200 and refused > 0
        summary = {
            "requests_ok": traffic.ok,
            "requests_failed": len(traffic.failures),
            "denied_as_expected": denied,
            "leaf_rotations": sum(leaf_rotations.values()),
            "leaf_rotations_by_workload": leaf_rotations,
            "ca_rotations": watcher.ca_rotations(),
            "workloads": self.workloads_report(),
        }
        enough = min(leaf_rotations.values(), default=0) >= 2 and (rotate_at is None or watcher.ca_rotations() >= 1)
        ok = traffic.ok > 0 and not traffic.failures and denied and enough
        return (0 if ok else 1), summary

    def run_check(self) -> tuple[int, dict[str, Any]]:
        if self.settings.duration is not None:
            return self.run_rotation_check()
        report = self.workloads_report()
        self.print_workloads(report)
        ok = failed = 0
        peers: set[str] = set()
        for _ in range(self.settings.requests):
            self.check_children()
            result = self.one_request()
            if result.ok:
                ok += 1
            else:
                failed += 1
                self.say(f"  request failed: {result.detail}")
            if result.peer:
                peers.add(result.peer)
        self.say(f"sent {self.settings.requests} requests client -> frontend -> backend over mTLS: {ok} ok, {failed} failed")
        self.say(f"backend saw caller identity: {', '.join(sorted(peers)) or 'none'}")
        intruder_status = self.intruder_request()
        refused = self.backend_refused_handshakes()
        denied = intruder_status != 200 and refused > 0
        self.say(
            f"intruder ({INTRUDER.spiffe_id}) -> backend: HTTP {intruder_status}; "
            f"backend sidecar refused {refused} TLS handshake(s) for a SPIFFE ID not allowed"
        )
        removal = self.caller_removal()
        when = f"{removal.seconds:.2f} s after the edit" if removal.seconds is not None else "never"
        self.say(
            f"removed frontend from backend's allow: its next request on its open connection got HTTP "
            f"{removal.status} ({when}; same connection: {removal.same_connection}); put back: "
            f"{'requests pass again' if removal.readmitted else 'requests still refused'}"
        )
        summary = {
            "requests_ok": ok,
            "requests_failed": failed,
            "denied_as_expected": denied,
            "intruder_status": intruder_status,
            "backend_refused_handshakes": refused,
            "caller_removed_refused": removal.refused,
            "caller_removed_refused_seconds": None if removal.seconds is None else round(removal.seconds, 3),
            "caller_readmitted": removal.readmitted,
            "peer_seen_by_backend": sorted(peers),
            "workloads": report,
        }
        revoked = self.revocation_check()
        if revoked is not None:
            summary["revoked_refused"] = revoked
        vault_ok = True
        if self.settings.vault_mode is not None:
            summary["vault"] = self.vault_root_report()
            vault_ok = summary["vault"]["chains_verify_to_vault_root"] and summary["vault"]["leaves_basic_constraints_ca_false"]
            self.say(f"workload chains verify to Vault's root {summary['vault']['root_subject']}: "
                     f"{summary['vault']['chains_verify_to_vault_root']}; "
                     f"leaves have basicConstraints CA:FALSE: {summary['vault']['leaves_basic_constraints_ca_false']}")
        held = removal.refused and removal.readmitted and revoked is not False
        return (0 if ok == self.settings.requests and failed == 0 and denied and held and vault_ok else 1), summary

    def run_forever(self, stop: threading.Event) -> int:
        self.print_workloads(self.workloads_report())
        self.say("sending a request every second; Ctrl-C stops everything")
        ok = failed = count = 0
        while not stop.is_set():
            self.check_children()
            result = self.one_request()
            count += 1
            ok += result.ok
            failed += not result.ok
            self.say(
                f"  #{count} frontend -> {result.served_by}: {result.detail}; caller identity seen: {result.peer}"
                f"  (ok {ok}, failed {failed})"
            )
            if count % 15 == 0:
                self.say(f"  intruder -> backend: HTTP {self.intruder_request()} (refused, as configured)")
            if count % 60 == 0:
                self.print_workloads(self.workloads_report())
            stop.wait(self.settings.interval)
        return 0

    # -- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        for sync in self.trust_syncs.values():
            sync.terminate()
            try:
                sync.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sync.kill()
                sync.wait()
        for server in self.servers:
            server.shutdown()
            server.server_close()
        if self.meshca is not None and self.meshca.poll() is None:
            self.meshca.send_signal(signal.SIGTERM)
            try:
                self.meshca.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.meshca.kill()
                self.meshca.wait()
        if self.openbao is not None:
            self.openbao.stop()
        if not self.settings.keep_workdir and self.settings.workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)


INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


def run_demo(settings: DemoSettings, out: TextIO, clock: Clock) -> int:
    """Run the demo; with `check`, the last line printed is the JSON summary (after cleanup).

    Ctrl-C stops everything and returns 130; a child that dies raises ChildDied (after cleanup)."""
    if settings.ha:
        from meshca.dev.demo_ha import HaDemo

        demo: Demo = HaDemo(settings, out, clock)
    elif settings.agent:
        from meshca.dev.demo_agent import AgentDemo

        demo = AgentDemo(settings, out, clock)
    else:
        demo = Demo(settings, out, clock)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    summary: dict[str, Any] | None = None
    status = 1
    try:
        demo.start()
        if settings.check:
            status, summary = demo.run_check()
        else:
            status = demo.run_forever(stop)
    except KeyboardInterrupt:
        demo.say("interrupted (Ctrl-C)")
        status, summary = INTERRUPTED, None
    except Exception:
        # A dead child shows up first as a refused admin call or a timeout: report the cause instead.
        for _ in range(10):
            demo.check_children()
            time.sleep(0.1)
        raise
    finally:
        demo.say("stopping: Envoys, apps and meshca")
        demo.stop()
        signal.signal(signal.SIGTERM, previous)
    if summary is not None:
        print(json.dumps(summary), file=out, flush=True)
    return status
