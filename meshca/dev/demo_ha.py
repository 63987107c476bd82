"""`meshca demo --ha`: three etcd members, three meshca replicas on them and the demo's sidecars; while traffic
flows, the replica most sidecars use and then the etcd leader are killed with SIGKILL, and a mesh edit is
applied afterwards."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import yaml

from meshca.clock import Clock
from meshca.dev.demo import ChildDied, Demo, DemoSettings, _wait_for_port, meshca_cli
from meshca.dev.envoy_process import dynamic_active_clusters, free_port
from meshca.dev.etcd_process import EtcdCluster
from meshca.dev.harness import INTRUDER, TRUST_DOMAIN, ChainWatcher, TrafficLoop, mesh_config
from meshca.files import write_atomic

REPLICAS = 3
DEFAULT_HA_DURATION = timedelta(seconds=40)
_EXTRA_SERVICE = "audit"  # the service the mesh edit after the etcd leader's death adds


class HaDemo(Demo):
    """The demo with meshca as three replicas sharing a three-member etcd (docs/ha.md)."""

    lease_ttl = "4s"  # the replicas' leader and registry leases (tests take a shorter one)

    def __init__(self, settings: DemoSettings, out: TextIO, clock: Clock) -> None:
        super().__init__(settings, out, clock)
        self.replica_ports = [self.ports.meshca, *(free_port() for _ in range(REPLICAS - 1))]
        self.replica_admin = [self.ports.metrics, *(free_port() for _ in range(REPLICAS - 1))]
        self.replicas: list[subprocess.Popen[bytes] | None] = [None] * REPLICAS
        self.killed: list[int] = []
        self.etcd: EtcdCluster | None = None
        self.extra_port = free_port()

    def more_meshca(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", port) for port in self.replica_ports[1:])

    def replica_config(self, index: int) -> Path:
        return self.material.serve_config.parent / f"replica-{index}.yaml"

    def replica_log(self, index: int) -> Path:
        return self.workdir / f"meshca-{index}.log"

    # -- setup --------------------------------------------------------------------------------

    def start_meshca(self) -> None:
        """etcd, the CA and the mesh imported into it, then the replicas (instead of one meshca)."""
        self.say(f"starting {REPLICAS} etcd members on loopback")
        self.etcd = EtcdCluster(REPLICAS, workdir=self.workdir / "etcd").start()
        kek = self.workdir / "store-kek"
        write_atomic(kek, base64.b64encode(os.urandom(32)) + b"\n", 0o600)
        base = yaml.safe_load(self.material.serve_config.read_text())
        base.pop("mesh", None)
        base.pop("state_dir", None)
        base["store"] = {"etcd": {"endpoints": self.etcd.endpoints, "kek_file": str(kek),
                                  "lease_ttl": self.lease_ttl}}
        for index in range(REPLICAS):
            settings = {**base, "listen": f"127.0.0.1:{self.replica_ports[index]}",
                        "metrics_port": self.replica_admin[index]}
            write_atomic(self.replica_config(index), yaml.safe_dump(settings, sort_keys=False).encode(), 0o644)
        self.say("  " + self.meshca_command("ca", "import", "--state-dir", str(self.ca_state_dir())).strip())
        self.say("  " + self.meshca_command("mesh", "apply", "-f", str(self.mesh_path)).strip())
        for index in range(REPLICAS):
            self.start_replica(index)

    def ca_state_dir(self) -> Path:
        """The internal CA imported into etcd: the dev material's (a test may make one with its own schedule)."""
        return self.material.state_dir

    def start_replica(self, index: int) -> None:
        port = self.replica_ports[index]
        self.say(f"starting meshca replica {index} on 127.0.0.1:{port} (log: {self.replica_log(index)})")
        with self.replica_log(index).open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "meshca.cli.main", "serve", "--config", str(self.replica_config(index))],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.replicas[index] = process
        _wait_for_port(port, self.settings.startup_timeout, process, self.replica_log(index))

    def meshca_command(self, *args: str) -> str:
        """A meshca command against the store, as an operator runs it (replica 0's settings name the store)."""
        return meshca_cli(*args, "--config", str(self.replica_config(0)))

    def ca_command(self, *args: str) -> str:
        return self.meshca_command("ca", *args)

    def check_children(self) -> None:
        for index, process in enumerate(self.replicas):
            if process is not None and index not in self.killed and process.poll() is not None:
                tail = "\n".join(self.replica_log(index).read_text(errors="replace").splitlines()[-15:])
                raise ChildDied(f"meshca replica {index} exited with status {process.returncode}:\n{tail}")
        super().check_children()

    # -- what the replicas say ------------------------------------------------------------------

    def replica_id(self, index: int) -> str:
        process = self.replicas[index]
        assert process is not None
        return f"{socket.gethostname()}-{process.pid}"

    def own_proxies(self, index: int) -> dict[str, dict[str, Any]]:
        """node id → /status entry, for the streams replica `index` holds itself (not the fleet's)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.replica_admin[index]}/status", timeout=2) as response:
                entries = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        own = self.replica_id(index)
        return {e["node_id"]: e for e in entries if e.get("replica", own) == own}

    def synced_on_live_replicas(self) -> set[str]:
        """Nodes a live replica serves with every type it sent ACKed."""
        synced: set[str] = set()
        for index in self.live():
            for node, entry in self.own_proxies(index).items():
                types = entry.get("types", {}).values()
                if any(t.get("sent") for t in types) and all(t.get("sent") == t.get("acked") for t in types):
                    synced.add(node)
        return synced

    def live(self) -> list[int]:
        return [i for i in range(REPLICAS) if i not in self.killed]

    def kill_busiest_replica(self) -> tuple[int, float, int]:
        """SIGKILL the live replica holding most sidecars; (its index, seconds until every sidecar it held is
        ACKed on another replica, how many it held)."""
        held = {index: set(self.own_proxies(index)) for index in self.live()}
        index = max(held, key=lambda i: len(held[i]))
        process = self.replicas[index]
        assert process is not None
        self.say(f"kill -9 meshca replica {index} (pid {process.pid}), which serves {len(held[index])} sidecar(s): "
                 f"{', '.join(sorted(held[index])) or 'none'}")
        killed_at = time.monotonic()
        process.kill()
        process.wait()
        self.killed.append(index)
        moved = held[index]
        deadline = killed_at + self.settings.startup_timeout
        while not moved <= self.synced_on_live_replicas():
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecars {sorted(moved)} not ACKed on another replica within "
                                   f"{self.settings.startup_timeout:g} s of replica {index}'s death")
            time.sleep(0.05)
        seconds = time.monotonic() - killed_at
        self.say(f"  every sidecar of replica {index} reconnected to another replica and ACKed in {seconds:.2f} s")
        return index, seconds, len(moved)

    def kill_etcd_leader(self) -> str:
        assert self.etcd is not None
        leader = self.etcd.leader()
        self.say(f"kill -9 the etcd leader {leader.name} ({leader.endpoint}); two of three members keep the quorum")
        leader.kill()
        return leader.name

    def apply_mesh_edit(self, after: str = "the etcd leader's death") -> float:
        """Add a service through the store; seconds until every sidecar has its cluster."""
        config = mesh_config(self.ports)
        config["services"][_EXTRA_SERVICE] = {
            "namespace": "audit",
            "service_account": "audit",
            "inbound": {"port": self.extra_port, "app": "127.0.0.1:9", "listen_address": "127.0.0.1"},
        }
        self.write_mesh(config)
        applied_at = time.monotonic()
        self.say(f"meshca mesh apply (a new service, `audit`) through the store, after {after}")
        self.say("  " + self.meshca_command("mesh", "apply", "-f", str(self.mesh_path)).strip())
        cluster = f"outbound|{_EXTRA_SERVICE}"
        self.wait_for(
            lambda: all(cluster in dynamic_active_clusters(envoy.config_dump()) for envoy in self.envoys.values()),
            f"cluster {cluster} in every sidecar",
        )
        seconds = time.monotonic() - applied_at
        self.say(f"  every sidecar has cluster {cluster} {seconds:.2f} s after the apply")
        return seconds

    # -- the run --------------------------------------------------------------------------------

    def run_check(self) -> tuple[int, dict[str, Any]]:
        duration = (self.settings.duration or DEFAULT_HA_DURATION).total_seconds()
        watcher = ChainWatcher(self.envoys)
        watcher.sample()
        failovers: list[float] = []
        etcd_killed: list[str] = []
        mesh_apply_seconds: float | None = None
        started = time.monotonic()
        next_progress = self.settings.progress_every
        self.say(f"sending requests continuously for {duration:.0f} s; a replica dies at {duration * 0.25:.0f} s, "
                 f"the etcd leader at {duration * 0.5:.0f} s")
        with TrafficLoop(self.one_request) as traffic:
            while (elapsed := time.monotonic() - started) < duration:
                self.check_children()
                if elapsed >= next_progress:
                    next_progress += self.settings.progress_every
                    self.say(f"  {elapsed:3.0f} s: {traffic.ok} ok, {len(traffic.failures)} failed; certificate "
                             f"rotations seen {sum(watcher.leaf_rotations().values())}")
                if not failovers and elapsed >= duration * 0.25:
                    failovers.append(self.kill_busiest_replica()[1])
                if not etcd_killed and elapsed >= duration * 0.5:
                    etcd_killed.append(self.kill_etcd_leader())
                    mesh_apply_seconds = self.apply_mesh_edit()
                watcher.sample()
                time.sleep(0.5)
            watcher.sample()
        for failure in traffic.failures[:5]:
            self.say(f"  request failed: {failure.detail}")
        self.say(f"requests: {traffic.ok} ok, {len(traffic.failures)} failed")
        intruder_status = self.intruder_request()
        denied = intruder_status != 200 and self.backend_refused_handshakes() > 0
        leaf_rotations = watcher.leaf_rotations()
        summary = {
            "requests_ok": traffic.ok,
            "requests_failed": len(traffic.failures),
            "denied_as_expected": denied,
            "replicas": REPLICAS,
            "replicas_killed": len(self.killed),
            "failover_seconds_max": round(max(failovers), 3) if failovers else None,
            "etcd_members_killed": len(etcd_killed),
            "mesh_apply_after_etcd_leader_death_seconds": None if mesh_apply_seconds is None else round(mesh_apply_seconds, 3),
            "leaf_rotations": sum(leaf_rotations.values()),
            "leaf_rotations_by_workload": leaf_rotations,
            "intruder": INTRUDER.spiffe_id,
            "trust_domain": TRUST_DOMAIN,
            "workloads": self.workloads_report(),
        }
        ok = traffic.ok > 0 and not traffic.failures and denied and len(self.killed) >= 1 and mesh_apply_seconds is not None
        return (0 if ok else 1), summary

    # -- teardown -------------------------------------------------------------------------------

    def stop(self) -> None:
        super().stop()
        for process in self.replicas:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.etcd is not None:
            self.etcd.stop()
