"""meshca serving with vault-leaf on a real OpenBao: short leaves keep renewing (Vault backdates notBefore by 60 s),
and a CSR or a first issuance waiting on a stopped Vault stalls nothing else (CA calls run off the event loop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from xds_client import ROOTCA_AND_DEFAULT, XdsClient

from meshca.app import MeshcaApp, issue_server_credentials
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.vault.leaf import VaultLeafCa, VaultLeafOptions
from meshca.ca.vault.session import TokenAuth, VaultSession, VaultSettings
from meshca.ca.vault.setup import setup_pki
from meshca.clock import system_clock
from meshca.dev.openbao_process import OpenBaoProcess
from meshca.dev.tokens import DEV_AUDIENCE, DEV_ISSUER, mint_token, write_dev_issuer
from meshca.identity.jwt import TrustedIssuer
from meshca.v1 import certificate_pb2, certificate_pb2_grpc
from meshca.xds.snapshot import ResourceType

TD = "vault.example"
LOG = logging.getLogger("meshca.test.offloop")


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoProcess]:
    with OpenBaoProcess() as server:
        setup_pki(server.root_client(), trust_domain=TD, mode="vault-leaf", policy="meshca-leaf")
        yield server


class Served:
    """meshca (vault-leaf on the module's OpenBao) serving on a loopback port, and a TLS channel to it."""

    def __init__(self, bao: OpenBaoProcess, tmp_path: Path, leaf_ttl: timedelta) -> None:
        token = bao.root_client().auth.token.create(policies=["meshca-leaf"], ttl="1h")["auth"]["client_token"]
        session = VaultSession(VaultSettings(bao.address, TokenAuth(token), timeout=3.0), system_clock, LOG)
        self.ca = VaultLeafCa(
            CaSettings(TD, leaf_ttl_min=timedelta(seconds=10)), session, system_clock, LOG,
            VaultLeafOptions(retry_deadline=timedelta(seconds=4)),
        )
        issuer_files = write_dev_issuer(tmp_path / "jwt")
        self.signing_key = issuer_files.signing_key.read_bytes()
        issuer = TrustedIssuer(
            issuer=DEV_ISSUER, audiences=(DEV_AUDIENCE,), trust_domain=TD, jwks_path=issuer_files.jwks
        )
        self.app = MeshcaApp(self.ca, [issuer], system_clock, LOG, leaf_ttl=leaf_ttl)  # type: ignore[arg-type]
        self.server_ca = CertificateAuthority.init(tmp_path / "server-ca", CaSettings(TD), system_clock)

    async def start(self) -> grpc.aio.Channel:
        credentials = issue_server_credentials(self.server_ca, ["localhost"], timedelta(hours=1))
        port = await self.app.start("127.0.0.1", 0, credentials)
        return grpc.aio.secure_channel(
            f"127.0.0.1:{port}", grpc.ssl_channel_credentials(self.server_ca.trust_bundle_pem()),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )

    def bearer(self, sa: str, node: str | None = None) -> str:
        return mint_token(self.signing_key, namespace="shop", service_account=sa, node_id=node, now=system_clock())


@pytest.mark.e2e  # 13 s of real time: Vault's 10 s leaves
async def test_short_vault_leaves_keep_renewing_over_one_stream(bao: OpenBaoProcess, tmp_path: Path) -> None:
    """10 s leaves, notBefore 60 s in the past: renewed every 4-6 s, each pushed on the open stream.
    (Timed from notBefore, the first renewal was due 25 s before issuance, ran at once, and, rescheduled
    from inside its own job, was dropped by apscheduler: nothing renewed again.)"""
    served = Served(bao, tmp_path, leaf_ttl=timedelta(seconds=10))
    channel = await served.start()
    try:
        client = XdsClient(channel, served.bearer("frontend", "frontend-1"))
        await client.send(ResourceType.SECRET.type_url, ROOTCA_AND_DEFAULT, node_id="frontend-1")
        first = await client.recv(timeout=15)
        version, nonce = first.version_info, first.nonce
        began = time.monotonic()
        pushes: list[float] = []
        while time.monotonic() - began < 13:
            await client.send(ResourceType.SECRET.type_url, ROOTCA_AND_DEFAULT, version, nonce)  # ACK
            try:
                pushed = await client.recv(timeout=max(0.1, 13 - (time.monotonic() - began)))
            except asyncio.TimeoutError:
                break
            version, nonce = pushed.version_info, pushed.nonce
            pushes.append(time.monotonic() - began)
        assert len(pushes) >= 2, f"renewed certificates pushed at {pushes} s in 13 s of 10 s leaves"
        assert pushes[0] > 3.0  # renewed at about half of the 10 s it was issued for, not at once
        assert served.app.rotator.counters().leaf_rotations_failed == 0
        leaf = served.app.secrets.certificates()[0]
        assert leaf.not_after > datetime.now(UTC)  # what is served has not expired
        client.call.cancel()
    finally:
        await channel.close()
        await served.app.stop(0)


@pytest.mark.e2e  # about 6 s of real time: Vault's request timeouts
async def test_a_csr_waiting_on_a_stopped_vault_does_not_stall_other_streams(bao: OpenBaoProcess, tmp_path: Path) -> None:
    served = Served(bao, tmp_path, leaf_ttl=timedelta(minutes=10))
    app = served.app
    channel = await served.start()
    bearer = served.bearer

    async def secrets_for(sa: str, node: str) -> float:
        began = time.monotonic()
        client = XdsClient(channel, bearer(sa, node))
        await client.send(ResourceType.SECRET.type_url, ROOTCA_AND_DEFAULT, node_id=node)
        response = await client.recv(timeout=15)
        client.call.cancel()
        assert {r.value for r in response.resources}  # default and ROOTCA arrived
        return time.monotonic() - began

    try:
        await secrets_for("frontend", "frontend-1")  # issued while Vault is up
        bao.pause()  # SIGSTOP: connections hang, nothing answers
        csr = certificate_pb2.SignRequest(csr_pem=crypto.build_csr_pem(crypto.generate_private_key_pem()).decode())
        sign = certificate_pb2_grpc.CertificateServiceStub(channel).Sign(
            csr, metadata=[("authorization", f"Bearer {bearer('payments')}")]
        )
        first_issue = asyncio.ensure_future(secrets_for("backend", "backend-1"))  # needs Vault: waits
        await asyncio.sleep(0.5)  # both are now waiting on Vault
        assert not sign.done() and not first_issue.done()
        began = time.monotonic()
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        health_latency = time.monotonic() - began
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reconnect_latency = await secrets_for("frontend", "frontend-1")  # held certificate: no CA call
        assert health_latency < 1.0 and reconnect_latency < 1.0, (health_latency, reconnect_latency)
        # Still waiting on Vault: the answers above did not wait for it. (With the call on the loop,
        # this test's own client, on the same loop, stalled too: the CSR had failed by now.)
        assert not sign.done()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sign
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        details = refused.value.details() or ""
        assert "right now" in details and bao.address not in details and "pki/" not in details
        bao.resume()
        try:  # the first issuance either got through after the resume or was refused as retryable
            await asyncio.wait_for(first_issue, 20)
        except EOFError as ended:
            assert "UNAVAILABLE" in str(ended)
        await secrets_for("backend", "backend-1")  # and Vault is usable again
    finally:
        if bao.paused:
            bao.resume()
        await channel.close()
        await app.stop(0)
