"""The gRPC CertificateService (grpc.aio): signs a caller's CSR for the SPIFFE ID its bearer token proves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from datetime import timedelta
from typing import Protocol

import grpc

from meshca.audit import AuditEvent, AuditSink, IssuerIds, NoAudit
from meshca.ca.api import CaError, CsrRejected, IdentityRejected, InvalidTtl, IssuedCertificate, IssuerExpired
from meshca.ca.crypto import split_pem_certificates
from meshca.ca.signed import SignedLeaf, SignedLeaves
from meshca.identity.jwt import AuthenticationError, VerifiedIdentity
from meshca.identity.spiffe import SpiffeId
from meshca.v1 import certificate_pb2, certificate_pb2_grpc

# timedelta cannot hold more than ~2.7e12 s; anything near it is nonsense and the CA caps it anyway.
_MAX_TTL_SECONDS = 100 * 366 * 24 * 3600
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----\n"
_PEM_END = b"-----END CERTIFICATE-----\n"
NODE_METADATA_KEY = "x-meshca-node"  # optional: the node id a CSR client sends, recorded in the audit log


class Authenticator(Protocol):
    """Turns call metadata into a verified identity; raises meshca.identity.jwt.AuthenticationError."""

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> VerifiedIdentity: ...


class CsrSigner(Protocol):
    """What the service needs from a CA backend (every meshca.ca.api.MeshCa fits)."""

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None) -> IssuedCertificate: ...

    def trust_bundle_pem(self) -> bytes: ...


_CSR_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
}


class CertificateServicer(certificate_pb2_grpc.CertificateServiceServicer):
    """meshca.v1.CertificateService/Sign: the SAN is the authenticated identity, never the CSR's."""

    def __init__(
        self,
        authenticator: Authenticator,
        signer: CsrSigner,
        logger: logging.Logger | None = None,
        ca_executor: Executor | None = None,
        revoked: Callable[[SpiffeId], bool] | None = None,
        audit: AuditSink | None = None,
        default_ttl: timedelta | None = None,
        signed: SignedLeaves | None = None,
    ) -> None:
        """`default_ttl`: the lifetime of a certificate whose request names none (meshca's `leaf_ttl`, so a node
        agent's certificates live as long as those meshca issues itself; None: the CA's default). `revoked`: True for an identity `meshca revoke --spiffe-id` revoked (refused, PERMISSION_DENIED).
        `ca_executor`: where signing runs when the signer may block (a Vault-backed signer may wait
        seconds on Vault, and the event loop with every other call would wait with it); None signs on
        the loop (an in-memory CA: a thread hop would only cost). `audit`: every signed CSR is recorded there.
        `signed`: every signed leaf is recorded there too, so that revoking its identity lists its serial on the CRLs
        (meshca.sds.crl); a leaf signed while its identity was being revoked is then not handed out."""
        self._authenticator = authenticator
        self._audit: AuditSink = audit if audit is not None else NoAudit()
        self._issuer_ids = IssuerIds()
        self._signer = signer
        self._ca_executor = ca_executor
        self._revoked = revoked
        self._log = logger or logging.getLogger(__name__)
        self._chain_tail: tuple[bytes, tuple[str, ...]] = (b"", ())
        self._default_ttl = default_ttl
        self._signed = signed

    def _chain(self, issued: IssuedCertificate) -> list[str]:
        """The chain's PEM blocks; what follows the leaf (the same intermediates every call) is split once."""
        leaf, chain = issued.certificate_pem, issued.chain_pem
        single_block = (
            leaf.startswith(_PEM_BEGIN) and leaf.endswith(_PEM_END) and leaf.count(b"-----END CERTIFICATE-----") == 1
        )
        if not (single_block and chain.startswith(leaf)):
            return [block.decode("ascii") for block in split_pem_certificates(chain)]
        tail = chain[len(leaf):]
        cached_tail, blocks = self._chain_tail
        if tail != cached_tail:
            blocks = tuple(block.decode("ascii") for block in split_pem_certificates(tail))
            self._chain_tail = (tail, blocks)
        return [leaf.decode("ascii"), *blocks]

    async def Sign(  # noqa: N802 - gRPC method name
        self, request: certificate_pb2.SignRequest, context: grpc.aio.ServicerContext
    ) -> certificate_pb2.SignResponse:
        metadata = [(m[0], m[1]) for m in (context.invocation_metadata() or ())]
        try:
            identity = self._authenticator.authenticate(metadata)
        except AuthenticationError as e:
            self._log.info("Sign refused: unauthenticated: %s", e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

        ttl: timedelta | None = self._default_ttl
        if request.HasField("ttl_seconds"):
            if not 0 < request.ttl_seconds <= _MAX_TTL_SECONDS:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"ttl_seconds must be a positive number of seconds, got {request.ttl_seconds}",
                )
            ttl = timedelta(seconds=request.ttl_seconds)

        spiffe_id = identity.spiffe_id
        if self._revoked is not None and self._revoked(spiffe_id):
            self._log.info("Sign refused for %s: the identity is revoked", spiffe_id)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity {spiffe_id} is revoked")
        try:
            csr_pem = request.csr_pem.encode("utf-8")
            if self._ca_executor is None:
                issued = self._signer.sign_csr(csr_pem, spiffe_id, ttl)
            else:
                issued = await asyncio.get_running_loop().run_in_executor(
                    self._ca_executor, self._signer.sign_csr, csr_pem, spiffe_id, ttl
                )
        except CsrRejected as e:
            self._log.info("Sign refused for %s: %s", spiffe_id, e.reason)
            await context.abort(_CSR_STATUS[e.kind], e.reason)
        except InvalidTtl as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ttl_seconds: {e}")
        except IdentityRejected as e:
            self._log.info("Sign refused for %s: %s", spiffe_id, e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except IssuerExpired as e:
            self._log.error("Sign failed for %s: %s", spiffe_id, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the CA cannot issue certificates right now")
        except CaError as e:  # a backend outage (e.g. Vault down or rate limited): retryable
            self._log.error("Sign failed for %s: %s", spiffe_id, e)
            # The detail (a Vault path and address) is for the operator's log, not for the caller.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the CA cannot issue certificates right now; retry later")

        issuer = self._issuer_ids.of_chain(issued.chain_pem)
        if self._signed is not None:
            self._signed.record(SignedLeaf(issued.not_after, issued.serial_number, spiffe_id, issuer))
            # Recorded first, checked again after: a revocation adopted meanwhile either saw this record (and lists
            # the serial) or is seen here (and the certificate is not handed out).
            if self._revoked is not None and self._revoked(spiffe_id):
                self._log.info("Sign refused for %s: the identity was revoked while signing", spiffe_id)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity {spiffe_id} is revoked")
        self._log.info(
            "issued certificate serial %x to %s, expires %s", issued.serial_number, spiffe_id, issued.not_after.isoformat()
        )
        self._audit.record(AuditEvent(
            "sign", spiffe_id=spiffe_id.uri, serial=issued.serial_number, node_id=_node_id(metadata),
            issuer=issuer, not_before=issued.not_before,
            not_after=issued.not_after,
        ))
        return certificate_pb2.SignResponse(
            certificate_chain=self._chain(issued),
            trust_bundle_pem=self._signer.trust_bundle_pem().decode("ascii"),
            spiffe_id=str(spiffe_id),
            expires_at=int(issued.not_after.timestamp()),
            not_before=int(issued.not_before.timestamp()),
            serial_number=f"{issued.serial_number:x}",
        )


def _node_id(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The caller's `x-meshca-node` metadata, if it sent one (unverified: the audit line says who asked)."""
    for key, value in metadata:
        if key == NODE_METADATA_KEY and isinstance(value, str):
            return value[:256]
    return None


def add_to_server(server: grpc.aio.Server, servicer: CertificateServicer) -> None:
    """Register `servicer` on a grpc.aio server."""
    certificate_pb2_grpc.add_CertificateServiceServicer_to_server(servicer, server)
