"""N agents registering at once through meshca.v1.EndpointService: how many mesh rebuilds, how long until all are in EDS.

Run: `python -m benchmarks.endpoint_burst [N]` (in-process meshca, plaintext gRPC on loopback, real JWTs)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment

from meshca.app import MeshcaApp
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.tokens import DEV_AUDIENCE, DEV_ISSUER, mint_token, write_dev_issuer
from meshca.identity.jwt import TrustedIssuer
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import parse_mesh_config
from meshca.sds.workloads import MeshPublisher
from meshca.v1 import endpoints_pb2, endpoints_pb2_grpc
from meshca.xds.snapshot import ResourceType

TD = "mesh.test"
SERVICES = int(os.environ.get("BURST_SERVICES", "50"))  # services beside the registered one: a rebuild costs what such a mesh costs


def mesh_yaml() -> dict[str, object]:
    services: dict[str, object] = {
        f"svc-{i}": {"namespace": "shop", "inbound": {"port": 15006, "app": "127.0.0.1:8080"}} for i in range(SERVICES)
    }
    services["echo"] = {"namespace": "shop", "service_account": "agent", "inbound": {"port": 15006,
                        "app": "127.0.0.1:8080"}, "endpoints": []}
    services["caller"] = {"namespace": "shop", "outbound": {"port": 15001}}
    return {"trust_domain": TD, "services": services,
            "routes": [{"prefix": "/", "to": "echo"}]}


def eds_count(app: MeshcaApp, caller: SpiffeId) -> int:
    snapshot = app.cache.get(MeshPublisher.snapshot_key(caller))
    if snapshot is None:
        return 0
    resource = snapshot.of_type(ResourceType.ENDPOINT).resources.get("outbound|echo")
    if resource is None:
        return 0
    return sum(len(g.lb_endpoints) for g in ClusterLoadAssignment().parse(resource.payload).endpoints)


async def burst(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca = CertificateAuthority.init(directory / "ca", CaSettings(trust_domain=TD), system_clock)
        files = write_dev_issuer(directory / "jwt")
        issuer = TrustedIssuer(issuer=DEV_ISSUER, audiences=(DEV_AUDIENCE,), trust_domain=TD, jwks_path=files.jwks)
        logging.getLogger("bench").setLevel(logging.WARNING)
        app = MeshcaApp(ca, [issuer], system_clock, logging.getLogger("bench"))
        rebuilds = [0]
        coalesced = getattr(app, "endpoint_rebuilds", None)
        if coalesced is None:  # before coalescing: count the calls
            original = app._rebuild

            def counted(why: str) -> None:
                rebuilds[0] += 1
                original(why)

            app._rebuild = counted  # type: ignore[method-assign]
        app.apply_mesh_config(parse_mesh_config(Path("mesh.yaml"), mesh_yaml()))
        caller = SpiffeId.for_service_account(TD, "shop", "caller")
        app.publisher.ensure_identity(caller)
        port = await app.start("127.0.0.1", 0, None)
        token = mint_token(files.signing_key.read_bytes(), namespace="shop", service_account="agent", now=system_clock())
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
        calls = []
        for i in range(n):
            stub = endpoints_pb2_grpc.EndpointServiceStub(channels[i % len(channels)])
            calls.append(stub.Register(metadata=(("authorization", f"Bearer {token}"),)))
        for call in calls:  # the streams are open; now every request at once
            await call.wait_for_connection()
        requests = [endpoints_pb2.RegisterRequest(endpoints=[endpoints_pb2.Endpoint(
            service="echo", address=f"10.1.{i // 250}.{i % 250 + 1}", port=15006)]) for i in range(n)]
        base = coalesced.runs if coalesced is not None else 0
        started = time.perf_counter()
        await asyncio.gather(*(call.write(request) for call, request in zip(calls, requests, strict=True)))
        answered = await asyncio.gather(*(call.read() for call in calls))
        answered_at = time.perf_counter() - started
        while eds_count(app, caller) < n:
            await asyncio.sleep(0.001)
        in_eds = time.perf_counter() - started
        await asyncio.sleep(0.5)  # let a last folded rebuild finish before counting
        count = (coalesced.runs - base) if coalesced is not None else rebuilds[0]
        assert all(a.spiffe_id for a in answered)
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        await app.stop(0)
        return {"n": n, "rebuilds": count, "all_answered_s": round(answered_at, 3), "all_in_eds_s": round(in_eds, 3)}


if __name__ == "__main__":
    print(asyncio.run(burst(int(sys.argv[1]) if len(sys.argv) > 1 else 200)))
