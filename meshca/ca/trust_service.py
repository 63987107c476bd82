"""meshca.v1.TrustBundleService: the trust bundle as a SPIFFE bundle document (GetBundle) and the trust material followed live (WatchTrust).

The bundle is public; what makes it trustworthy is the TLS channel it travels on, which the caller verifies
with the bundle it already holds (meshca.node.trust, meshca.agent.trust). GetBundle has no protobuf types: the
request is empty and the response body is the JSON document itself (UTF-8). WatchTrust streams
meshca.v1.TrustMaterial (protos/meshca/v1/trust.proto): the bundle and the CRLs the ROOTCA secret carries, at
once and again on every change."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Protocol

import grpc

from meshca.ca.bundle import encode_spiffe_bundle
from meshca.ca.crypto import split_pem_crls
from meshca.v1 import trust_pb2

SERVICE = "meshca.v1.TrustBundleService"
METHOD = "GetBundle"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
WATCH_METHOD = "WatchTrust"
FULL_WATCH_METHOD = f"/{SERVICE}/{WATCH_METHOD}"
DEFAULT_REFRESH_HINT = timedelta(minutes=5)
# A watch looks at the material this often even when nobody said it changed (a change is normally announced by
# `poke`, which the composition root calls after every CA check, where the bundle and the CRLs change).
DEFAULT_RESYNC = timedelta(seconds=5)


class BundleSource(Protocol):
    """What the service needs from a CA backend (every meshca.ca.api.MeshCa fits)."""

    def trust_bundle_pem(self) -> bytes: ...

    @property
    def generation(self) -> int: ...


def material_version(bundle_pem: str, crl_pems: Sequence[str]) -> str:
    """A content hash of TrustMaterial's bundle_pem and crl_pem, as sent (the receiver recomputes it)."""
    digest = hashlib.sha256(bundle_pem.encode("utf-8"))
    for crl in crl_pems:
        digest.update(b"\0")
        digest.update(crl.encode("utf-8"))
    return digest.hexdigest()[:16]


class TrustBundleServicer:
    """Encodes the bundle and the material once per change; calls only read them.

    `material` gives (bundle PEM, CRLs PEM) exactly as the ROOTCA secret carries them (default: the source's
    bundle, no CRLs). WatchTrust streams wait for `poke` (thread-safe: call it after anything that may change
    the material) or `resync`, and send only when the version changed; `close` ends them all."""

    def __init__(
        self,
        source: BundleSource,
        refresh_hint: timedelta = DEFAULT_REFRESH_HINT,
        material: Callable[[], tuple[bytes, bytes]] | None = None,
        resync: timedelta = DEFAULT_RESYNC,
    ) -> None:
        self._source = source
        self._refresh_hint = refresh_hint
        self._material = material if material is not None else (lambda: (source.trust_bundle_pem(), b""))
        self._resync = resync.total_seconds()
        self._lock = threading.Lock()
        self._cached: tuple[bytes, int, bytes] = (b"", -1, b"")
        self._cached_material: tuple[tuple[bytes, bytes, int], trust_pb2.TrustMaterial] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once a watch started
        self._changed: asyncio.Event | None = None  # set (and replaced) on the loop at every poke
        self._closed = False
        self.watches = 0

    def document(self) -> bytes:
        pem, generation = self._source.trust_bundle_pem(), self._source.generation
        with self._lock:
            cached_pem, cached_generation, encoded = self._cached
            if (pem, generation) != (cached_pem, cached_generation):
                encoded = encode_spiffe_bundle(pem, generation, self._refresh_hint)
                self._cached = (pem, generation, encoded)
            return encoded

    async def get_bundle(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.document()

    def trust_material(self) -> trust_pb2.TrustMaterial:
        """The current material (the same message object while nothing changed)."""
        bundle, crls = self._material()
        key = (bundle, crls, self._source.generation)
        with self._lock:
            cached = self._cached_material
            if cached is not None and cached[0] == key:
                return cached[1]
        bundle_pem = bundle.decode("ascii")
        crl_pems = [block.decode("ascii") for block in split_pem_crls(crls)]
        message = trust_pb2.TrustMaterial(
            version=material_version(bundle_pem, crl_pems), bundle_pem=bundle_pem, crl_pem=crl_pems,
            ca_generation=max(0, key[2]),
        )
        with self._lock:
            self._cached_material = (key, message)
        return message

    def poke(self) -> None:
        """The material may have changed: every watch looks (from any thread; nothing to do before the first watch)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake)

    def close(self) -> None:
        """End every watch (on the serving loop, before the server stops: they would otherwise hold its grace)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def watch_trust(
        self, request: trust_pb2.WatchTrustRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trust_pb2.TrustMaterial]:
        self._loop = asyncio.get_running_loop()
        self.watches += 1
        try:
            sent = ""
            while not self._closed:
                current = self.trust_material()
                if current.version != sent:
                    yield current
                    sent = current.version
                    continue  # look again before waiting: it may have changed while this one was written
                if self._changed is None:
                    self._changed = asyncio.Event()
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._resync)
        finally:
            self.watches -= 1


def add_to_server(server: grpc.aio.Server, servicer: TrustBundleServicer) -> None:
    # GetBundle has no (de)serializers: its request and response are raw bytes
    handlers = {
        METHOD: grpc.unary_unary_rpc_method_handler(servicer.get_bundle),
        WATCH_METHOD: grpc.unary_stream_rpc_method_handler(
            servicer.watch_trust,
            request_deserializer=trust_pb2.WatchTrustRequest.FromString,
            response_serializer=trust_pb2.TrustMaterial.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
