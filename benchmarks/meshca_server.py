"""The system under test as its own process: a real MeshcaApp on loopback TLS, driven by JSON-line commands.

    python -m benchmarks.meshca_server '{"workdir": ..., "layout": {...}}'

Set up like `meshca serve` (internal CA, dev JWT issuer, TLS, INFO logs as JSON lines to stderr,
which the parent sends to a file). Nothing in meshca is modified: push/ACK timestamps for the
Envoy benchmark come from wrapping this process's ProxyRegistry instance.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import TRUST_DOMAIN, child_args, cpu_seconds, emit, rss_kb, serve_commands
from benchmarks.meshgen import Layout, mesh_config, with_endpoint_change
from meshca import logs
from meshca.app import MeshcaApp, issue_server_credentials
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.tokens import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    JWKS_FILE,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    DevIssuerFiles,
    write_dev_issuer,
)
from meshca.gcpolicy import tune_gc_for_serving
from meshca.identity.jwt import TrustedIssuer
from meshca.mesh.model import MeshConfig, load_mesh_config
from meshca.sds.rotation import RotationSettings


class RegistrationProbe:
    """Wraps a RegisteredEndpoints instance: when each registration (put) and removal began and returned.

    On the code this was written for, a put rebuilds and publishes the mesh before it returns, so its
    duration is the rebuild's; the number of rebuilds is MeshPublisher.mesh_updates_total()."""

    def __init__(self, endpoints: Any) -> None:
        self.puts: list[tuple[float, float]] = []
        self.removes: list[tuple[float, float]] = []
        self.puts_running = 0
        original_put, original_remove = endpoints.put, endpoints.remove

        async def put(*args: Any, **kw: Any) -> Any:
            started = time.monotonic()
            self.puts_running += 1
            try:
                return await original_put(*args, **kw)
            finally:
                self.puts_running -= 1
                self.puts.append((started, time.monotonic()))

        async def remove(*args: Any, **kw: Any) -> Any:
            started = time.monotonic()
            try:
                return await original_remove(*args, **kw)
            finally:
                self.removes.append((started, time.monotonic()))

        endpoints.put = put
        endpoints.remove = remove


class PushAckProbe:
    """Wraps a ProxyRegistry instance: when each (stream, type, version) was sent and when it was ACKed."""

    def __init__(self, registry: Any) -> None:
        self.samples: list[dict[str, Any]] = []
        self._sent: dict[tuple[int, Any, str], float] = {}
        original_sent, original_ack = registry.record_sent, registry.record_ack

        def record_sent(stream_id: int, resource_type: Any, version: str, *rest: Any, **kw: Any) -> Any:
            self._sent.setdefault((stream_id, resource_type, version), time.monotonic())
            return original_sent(stream_id, resource_type, version, *rest, **kw)

        def record_ack(stream_id: int, resource_type: Any, version: str, *rest: Any, **kw: Any) -> Any:
            sent_at = self._sent.pop((stream_id, resource_type, version), None)
            if sent_at is not None:
                self.samples.append(
                    {
                        "stream": stream_id,
                        "type": getattr(resource_type, "short_name", str(resource_type)),
                        "version": version,
                        "sent_at": sent_at,
                        "acked_at": time.monotonic(),
                    }
                )
            return original_ack(stream_id, resource_type, version, *rest, **kw)

        registry.record_sent = record_sent
        registry.record_ack = record_ack


async def main() -> None:
    args = child_args()
    workdir = Path(args["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    profiler = None
    if args.get("cprofile"):
        profiler = cProfile.Profile()
        profiler.enable()

    log = logs.configure(args.get("log_level", "info"))
    if args.get("state_from"):  # another replica: the same CA state and JWT issuer as that server's workdir
        shared = Path(args["state_from"])
        ca = CertificateAuthority.load(shared / "ca", system_clock)
        issuer_files = DevIssuerFiles(
            shared / "jwt" / SIGNING_KEY_FILE, shared / "jwt" / PUBLIC_KEY_FILE, shared / "jwt" / JWKS_FILE
        )
    else:
        ca = CertificateAuthority.init(workdir / "ca", CaSettings(trust_domain=TRUST_DOMAIN), system_clock)
        issuer_files = write_dev_issuer(workdir / "jwt")
    issuer = TrustedIssuer(
        issuer=DEV_ISSUER, audiences=(DEV_AUDIENCE,), trust_domain=TRUST_DOMAIN, jwks_path=issuer_files.jwks
    )
    rotation = RotationSettings()
    if "rotation" in args:
        r = args["rotation"]
        rotation = RotationSettings(
            reissue_window=timedelta(seconds=r["window_seconds"]),
            reissue_rate=r["rate"],
            ca_check_interval=timedelta(seconds=r.get("ca_check_interval", 1.0)),
        )
    leaf_ttl = timedelta(seconds=args["leaf_ttl_seconds"]) if args.get("leaf_ttl_seconds") else None
    tune_gc_for_serving()  # as `meshca serve` does
    app = MeshcaApp(ca, [issuer], system_clock, log, leaf_ttl=leaf_ttl, rotation=rotation)
    probe = PushAckProbe(app.registry) if args.get("instrument") else None
    registration_probe = RegistrationProbe(app.endpoints) if args.get("instrument_registrations") else None
    credentials = issue_server_credentials(ca, ["localhost", "127.0.0.1"], timedelta(days=1))
    root = workdir / "root.pem"
    root.write_bytes(ca.trust_bundle_pem())

    config: MeshConfig | None = None
    apply_seconds = None
    if args.get("layout"):
        config = mesh_config(Layout.from_json(args["layout"]))
    elif args.get("mesh_file"):
        config = load_mesh_config(Path(args["mesh_file"]))
    if config is not None:
        started = time.perf_counter()
        app.apply_mesh_config(config)
        apply_seconds = time.perf_counter() - started
    store = None
    if args.get("etcd"):  # a replica on a store: the mesh comes from etcd (meshca mesh apply), as with `store:`
        from meshca.cli.replica import attach_store
        from meshca.store.etcd import EtcdSettings, EtcdStore

        store = EtcdStore(EtcdSettings(tuple(args["etcd"]["endpoints"]), prefix=args["etcd"]["prefix"]),
                          log.getChild("store"))
        await store.connect()
        await attach_store(store, app, log, f"bench-{os.getpid()}")
    gc.collect()
    # `share_port`: one of several processes on one port (SO_REUSEPORT), as `meshca serve --workers N` runs them
    port = await app.start("127.0.0.1", args.get("port", 0), credentials, share_port=bool(args.get("share_port")))

    async def change_endpoint(cmd: dict[str, Any]) -> dict[str, Any]:
        nonlocal config
        assert config is not None
        changed = with_endpoint_change(config, cmd["service"], cmd["generation"])
        t0 = time.monotonic()
        version = app.apply_mesh_config(changed)
        t1 = time.monotonic()
        config = changed
        return {"t0": t0, "applied_at": t1, "apply_seconds": t1 - t0, "version": version}

    async def apply_file(cmd: dict[str, Any]) -> dict[str, Any]:
        nonlocal config
        parse_t0 = time.monotonic()  # what the file source does on a change: parse, then apply
        changed = load_mesh_config(Path(cmd["path"]))
        t0 = time.monotonic()
        version = app.apply_mesh_config(changed)
        t1 = time.monotonic()
        config = changed
        return {"t0": t0, "parse_t0": parse_t0, "apply_seconds": t1 - t0, "parse_seconds": t0 - parse_t0,
                "version": version}

    async def renew_all(cmd: dict[str, Any]) -> dict[str, Any]:
        identities = [c.spiffe_id for c in app.secrets.certificates()]
        t0 = time.monotonic()
        for spiffe_id in identities:
            app.rotator.renew(spiffe_id)
        return {"t0": t0, "renewed": len(identities), "seconds": time.monotonic() - t0}

    async def rotate_intermediate(cmd: dict[str, Any]) -> dict[str, Any]:
        before = app.ca.active_intermediate_id
        t0 = time.monotonic()
        app.ca.rotate_intermediate(now=True)
        app.ca_watcher.check()  # what the 1 s CA-watch job does; done now so t0 is the rotation moment
        return {
            "t0": t0,
            "old": before,
            "new": app.ca.active_intermediate_id,
            "tracked": len(app.secrets.certificates()),
        }

    async def registry(cmd: dict[str, Any]) -> dict[str, Any]:
        streams = app.registry.snapshot()
        synced: dict[str, int] = {}
        for status in streams:
            for resource_type, version in status.sent.items():
                if status.acked.get(resource_type) == version:
                    name = resource_type.short_name
                    synced[name] = synced.get(name, 0) + 1
        return {
            "streams": len(streams),
            "synced": synced,
            "nacks": sum(s.nacks for s in streams),
            "nodes": {s.stream_id: s.node_id for s in streams},
        }

    async def samples(cmd: dict[str, Any]) -> dict[str, Any]:
        assert probe is not None, "started without instrument"
        taken, probe.samples = probe.samples, []
        return {"samples": taken}

    async def registrations(cmd: dict[str, Any]) -> dict[str, Any]:
        """Registered endpoints now, mesh rebuilds so far, and the timed puts/removes since the last call."""
        taken: dict[str, Any] = {}
        if registration_probe is not None:
            # a put returns after the coalesced rebuild that started after it, which may be the one after the rebuild
            # that already published its endpoint: let the puts running now return, to be counted here
            deadline = time.monotonic() + 5
            while registration_probe.puts_running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            taken = {"puts": registration_probe.puts, "removes": registration_probe.removes}
            registration_probe.puts, registration_probe.removes = [], []
        return {
            "registered_endpoints": app.endpoints.count(),
            "mesh_updates": app.publisher.mesh_updates_total(),
            "cpu_seconds": cpu_seconds(os.getpid()),
            **taken,
        }

    async def store_writes(cmd: dict[str, Any]) -> dict[str, Any]:
        assert store is not None, "started without etcd"
        return {"writes": store.writes}

    async def stats(cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd.get("gc"):
            gc.collect()
        return {
            "rss_kb": rss_kb(os.getpid()),
            "cpu_seconds": cpu_seconds(os.getpid()),
            "streams": len(app.registry.snapshot()),
            "identities": len(app.secrets.certificates()),
            "issued_total": app.secrets.issued_total(),
        }

    emit(
        {
            "event": "ready",
            "port": port,
            "pid": os.getpid(),
            "root": str(root),
            "signing_key": str(issuer_files.signing_key),
            "mesh_apply_seconds": apply_seconds,
            "rss_kb": rss_kb(os.getpid()),
        }
    )
    try:
        await serve_commands(
            {
                "change_endpoint": change_endpoint,
                "apply_file": apply_file,
                "renew_all": renew_all,
                "rotate_intermediate": rotate_intermediate,
                "registry": registry,
                "registrations": registrations,
                "samples": samples,
                "stats": stats,
                "store_writes": store_writes,
            }
        )
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args["cprofile"])
        await app.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
