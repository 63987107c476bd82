"""The agent's CSR client: meshca.v1.CertificateService/Sign over TLS verified with the agent's `ca`, each replica in turn."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

from meshca.ca.csr_service import NODE_METADATA_KEY
from meshca.listen import format_address
from meshca.v1 import certificate_pb2, certificate_pb2_grpc


class SignFailed(Exception):
    """No replica signed the CSR; the message names each address and why (never the token or the key)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class SignedCertificate:
    """What meshca answered: the chain (leaf first), the trust bundle, and the leaf's facts."""

    chain_pem: bytes = field(repr=False)
    trust_bundle_pem: bytes = field(repr=False)
    spiffe_id: str
    serial_number: str
    not_before: datetime
    not_after: datetime


# Refusals a retry of the same request cannot fix soon; the agent still retries (the token file may be replaced),
# but logs them as errors rather than as an outage.
_PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class CsrClient:
    """Sends CSRs to meshca's replicas, trying each address in turn until one signs."""

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        server_name: str,
        ca_path: Path,
        timeout: timedelta = timedelta(seconds=10),
        node_id: str | None = None,
        roots: Callable[[], bytes] | None = None,
        channels: Sequence[grpc.aio.Channel] | None = None,
    ) -> None:
        """`ca_path` is re-read for every call (the roots meshca is verified with may be replaced); `roots`, when
        given, is called instead (meshca.agent.trust.TrustAnchor.roots: the file plus the bundle followed).
        `channels`: one per address, shared and left open (meshca.agent.channels.ReplicaChannels, which reads the
        roots itself); without them each call opens its own TLS channel per address and closes it."""
        if not addresses:
            raise ValueError("at least one meshca address is needed")
        self._addresses = tuple(addresses)
        self._server_name = server_name
        self._ca_path = ca_path
        self._timeout = timeout.total_seconds()
        self._node_id = node_id
        self._roots = roots if roots is not None else ca_path.read_bytes
        if channels is not None and len(channels) != len(self._addresses):
            raise ValueError("one channel per meshca address is needed")
        self._channels = channels

    async def sign(self, csr_pem: bytes, token: str, ttl: timedelta | None = None) -> SignedCertificate:
        metadata = [("authorization", f"Bearer {token}")]
        if self._node_id:
            metadata.append((NODE_METADATA_KEY, self._node_id))
        request = certificate_pb2.SignRequest(csr_pem=csr_pem.decode("ascii"))
        if ttl is not None:
            request.ttl_seconds = int(ttl.total_seconds())
        problems: list[str] = []
        retryable = False
        for replica, (host, port) in enumerate(self._addresses):
            where = format_address(host, port)
            try:
                async with self._channel(replica, where) as channel:
                    stub = certificate_pb2_grpc.CertificateServiceStub(channel)
                    response = await stub.Sign(request, metadata=metadata, timeout=self._timeout)
            except OSError as error:
                raise SignFailed(f"cannot read ca {self._ca_path}: {error.strerror}") from None
            except grpc.aio.AioRpcError as error:
                # details come from meshca's refusal messages, which never hold the token
                problems.append(f"meshca at {where}: {error.code().name}: {error.details() or ''}")
                retryable = retryable or error.code() not in _PERMANENT
                continue
            try:
                return _signed(response)
            except ValueError as error:
                problems.append(f"meshca at {where} sent an unusable answer: {error}")
                retryable = True
        raise SignFailed("; ".join(problems), retryable)

    @contextlib.asynccontextmanager
    async def _channel(self, replica: int, where: str) -> AsyncIterator[grpc.aio.Channel]:
        """The shared channel to this replica, or one of its own closed after the call (OSError: roots unreadable)."""
        if self._channels is not None:
            yield self._channels[replica]
            return
        credentials = grpc.ssl_channel_credentials(root_certificates=self._roots())
        options = [("grpc.ssl_target_name_override", self._server_name), ("grpc.default_authority", self._server_name)]
        async with grpc.aio.secure_channel(where, credentials, options=options) as channel:
            yield channel


def _signed(response: certificate_pb2.SignResponse) -> SignedCertificate:
    if not response.certificate_chain:
        raise ValueError("no certificate chain")
    if not response.trust_bundle_pem:
        raise ValueError("no trust bundle")
    chain = "".join(pem if pem.endswith("\n") else pem + "\n" for pem in response.certificate_chain)
    return SignedCertificate(
        chain_pem=chain.encode("ascii"),
        trust_bundle_pem=response.trust_bundle_pem.encode("ascii"),
        spiffe_id=response.spiffe_id,
        serial_number=response.serial_number,
        not_before=datetime.fromtimestamp(response.not_before, timezone.utc),
        not_after=datetime.fromtimestamp(response.expires_at, timezone.utc),
    )
