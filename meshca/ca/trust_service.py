"""meshca.v1.TrustBundleService/GetBundle: the current trust bundle as a SPIFFE bundle document, to anyone.

The bundle is public; what makes it trustworthy is the TLS channel it travels on, which the caller verifies
with the bundle it already holds (meshca.node.trust). The method has no protobuf types: the request is empty
and the response body is the JSON document itself (UTF-8)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Protocol

import grpc

from meshca.ca.bundle import encode_spiffe_bundle

SERVICE = "meshca.v1.TrustBundleService"
METHOD = "GetBundle"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
DEFAULT_REFRESH_HINT = timedelta(minutes=5)


class BundleSource(Protocol):
    """What the service needs from a CA backend (every meshca.ca.api.MeshCa fits)."""

    def trust_bundle_pem(self) -> bytes: ...

    @property
    def generation(self) -> int: ...


class TrustBundleServicer:
    """Encodes the bundle once per change; calls only read it."""

    def __init__(self, source: BundleSource, refresh_hint: timedelta = DEFAULT_REFRESH_HINT) -> None:
        self._source = source
        self._refresh_hint = refresh_hint
        self._lock = threading.Lock()
        self._cached: tuple[bytes, int, bytes] = (b"", -1, b"")

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


def add_to_server(server: grpc.aio.Server, servicer: TrustBundleServicer) -> None:
    # no (de)serializers: the request and the response are raw bytes
    handler = grpc.unary_unary_rpc_method_handler(servicer.get_bundle)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
