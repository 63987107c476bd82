"""Test support: minimal Python xDS clients that speak SotW and delta over grpc.aio like Envoy does."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.protobuf import Struct, Value
from envoy_data_plane.google.rpc import Status

from meshca.xds.server import ADS_METHOD, DELTA_ADS_METHOD

ROOTCA_AND_DEFAULT = ("default", "ROOTCA")
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_CORE_INTERNAL = "Internal error from Core"


class XdsClient:
    """One xDS stream; `send` builds a DiscoveryRequest, `recv` parses the next DiscoveryResponse.

    The status is the server's, even when a write raced the server ending the stream: grpc.aio then
    sets its own INTERNAL "Internal error from Core" over (or before) the server's status
    (grpc/grpc#36066). Each status the call is given is seen by a done callback, which keeps the
    first that is not that one; writes are skipped once the stream has ended.
    """

    def __init__(self, channel: grpc.aio.Channel, token: str | None, method: str = ADS_METHOD) -> None:
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        self.call = channel.stream_stream(method)(metadata=metadata)
        self._final: asyncio.Future[tuple[grpc.StatusCode, str]] = asyncio.get_running_loop().create_future()
        self.call.add_done_callback(self._on_status)
        # grpc.aio cancels the whole RPC when a pending read() is cancelled, so one task reads
        # and timeouts apply to this queue instead.
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read_all())

    async def _read_all(self) -> None:
        try:
            while True:
                raw = await self.call.read()
                if raw is grpc.aio.EOF:
                    break
                await self._inbox.put(raw)
        except grpc.aio.AioRpcError:
            pass
        await self._inbox.put(None)

    def _on_status(self, call: grpc.aio.Call) -> None:
        # Called each time grpc.aio sets the call's status; read it now, before it can be overwritten.
        status = getattr(getattr(call, "_cython_call", None), "_status", None)
        if status is None or self._final.done():
            return
        code = _CODES.get(status.code(), grpc.StatusCode.UNKNOWN)
        if code is grpc.StatusCode.INTERNAL and status.details() == _CORE_INTERNAL:
            return  # grpc.aio's own, for a failed write: the server's status comes (or came) separately
        self._final.set_result((code, status.details()))

    async def send(
        self,
        type_url: str,
        names: Sequence[str] = (),
        version: str = "",
        nonce: str = "",
        *,
        node_id: str | None = None,
        node_metadata: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        request = DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
        )
        if node_id is not None:
            metadata = Struct(fields={k: Value(string_value=v) for k, v in (node_metadata or {}).items()})
            request.node = Node(id=node_id, cluster="test", metadata=metadata)
        if error is not None:
            request.error_detail = Status(code=13, message=error)
        await self.send_raw(bytes(request))

    async def send_raw(self, payload: bytes) -> None:
        if self.call.done():
            return  # the server already closed the stream (e.g. refused it): status() tells why
        try:
            await self.call.write(payload)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # it closed the stream meanwhile

    async def recv(self, timeout: float = 5.0) -> DiscoveryResponse:
        raw = await asyncio.wait_for(self._inbox.get(), timeout)
        if raw is None:
            code, details = await asyncio.wait_for(asyncio.shield(self._final), timeout)
            raise EOFError(f"stream ended: {code} {details}")
        return DiscoveryResponse.parse(raw)

    async def silent_for(self, seconds: float) -> bool:
        """True if nothing arrives within `seconds`."""
        try:
            await asyncio.wait_for(self._inbox.get(), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    async def ack(self, response: DiscoveryResponse, names: Sequence[str] = ()) -> None:
        await self.send(response.type_url, names, response.version_info, response.nonce)

    async def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
        """Wait for the stream to end; its status code and details."""
        while await asyncio.wait_for(self._inbox.get(), timeout) is not None:
            pass
        return await asyncio.wait_for(asyncio.shield(self._final), timeout)

    def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


def _node(node_id: str, node_metadata: Mapping[str, str] | None) -> Node:
    metadata = Struct(fields={k: Value(string_value=v) for k, v in (node_metadata or {}).items()})
    return Node(id=node_id, cluster="test", metadata=metadata)


class DeltaXdsClient(XdsClient):
    """One delta xDS stream: `send` builds a DeltaDiscoveryRequest, `recv` parses a DeltaDiscoveryResponse."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None, method: str = DELTA_ADS_METHOD) -> None:
        super().__init__(channel, token, method)

    async def send(  # type: ignore[override]
        self,
        type_url: str,
        subscribe: Sequence[str] = (),
        unsubscribe: Sequence[str] = (),
        nonce: str = "",
        *,
        initial_versions: Mapping[str, str] | None = None,
        node_id: str | None = None,
        node_metadata: Mapping[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        request = DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=dict(initial_versions or {}),
            response_nonce=nonce,
        )
        if node_id is not None:
            request.node = _node(node_id, node_metadata)
        if error is not None:
            request.error_detail = Status(code=13, message=error)
        await self.send_raw(bytes(request))

    async def recv(self, timeout: float = 5.0) -> DeltaDiscoveryResponse:  # type: ignore[override]
        raw = await asyncio.wait_for(self._inbox.get(), timeout)
        if raw is None:
            code, details = await asyncio.wait_for(asyncio.shield(self._final), timeout)
            raise EOFError(f"stream ended: {code} {details}")
        return DeltaDiscoveryResponse.parse(raw)

    async def ack(self, response: DeltaDiscoveryResponse) -> None:  # type: ignore[override]
        await self.send(response.type_url, nonce=response.nonce)
