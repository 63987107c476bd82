"""The node agent's channels to meshca: one long-lived TLS channel per replica, shared by every CSR and stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import grpc

from meshca.agent.registration import CHANNEL_OPTIONS
from meshca.listen import format_address


class SharedChannel(grpc.aio.Channel):
    """A grpc.aio channel that counts the calls started on it, so that a channel made with older roots is closed
    when the last of them ends (ReplicaChannels), never under a running call."""

    def __init__(self, target: str, roots: bytes, options: Sequence[tuple[str, Any]],
                 on_idle: Callable[[SharedChannel], None]) -> None:
        self.target = target
        self.roots = roots
        self._channel = grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=roots), options=list(options)
        )
        self._on_idle = on_idle
        self.calls = 0  # started on this channel and not ended yet
        self.calls_started = 0
        self.closed = False

    def _started(self, call: Any) -> Any:
        self.calls += 1
        self.calls_started += 1
        call.add_done_callback(self._ended)
        return call

    def _ended(self, _call: object) -> None:
        self.calls -= 1
        if self.calls == 0:
            self._on_idle(self)

    def _counted(self, multicallable: Callable[..., Any]) -> Any:
        return _Counted(multicallable, self)

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool | None = False) -> Any:
        return self._counted(self._channel.unary_unary(method, request_serializer, response_deserializer,
                                                       _registered_method))

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> Any:
        return self._counted(self._channel.unary_stream(method, request_serializer, response_deserializer,
                                                        _registered_method))

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> Any:
        return self._counted(self._channel.stream_unary(method, request_serializer, response_deserializer,
                                                        _registered_method))

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: bool | None = False) -> Any:
        return self._counted(self._channel.stream_stream(method, request_serializer, response_deserializer,
                                                         _registered_method))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Only ReplicaChannels closes it: a user of a shared channel leaves it open."""
        self.closed = True
        await self._channel.close(grace)

    async def __aenter__(self) -> SharedChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


class _Counted:
    """A multicallable whose calls SharedChannel counts (from the call's creation to its end, cancelled or not)."""

    def __init__(self, inner: Callable[..., Any], channel: SharedChannel) -> None:
        self._inner = inner
        self._channel = channel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel._started(self._inner(*args, **kwargs))


class ReplicaChannels(Sequence[grpc.aio.Channel]):
    """One TLS channel per meshca replica (`self[i]`, made when first used), verified with `roots()` (the agent's
    TrustAnchor: the `ca` file re-read plus the bundle followed from meshca) and shared by every call the agent
    makes: its CSRs, each workload's registration stream and the trust stream, multiplexed over one HTTP/2
    connection per replica instead of one per call or stream.

    `roots()` is read again at every `self[i]`: when its bytes changed (a root adopted, the file replaced), that
    and later uses get new channels made with them; the older ones stay open for the calls already started on
    them (a registration or trust stream may last long) and are closed when the last one ends, or by close().
    An unreadable `ca` file with nothing adopted: OSError when no channel was made yet, else the current channels
    are kept (their connection was verified already)."""

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        server_name: str,
        roots: Callable[[], bytes],
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
    ) -> None:
        if not addresses:
            raise ValueError("at least one meshca address is needed")
        self.targets = tuple(format_address(host, port) for host, port in addresses)
        self._roots = roots
        self._options = (
            *options, ("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)
        )
        self._current: tuple[SharedChannel, ...] = ()
        self._retired: set[SharedChannel] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.generations = 0  # how many times channels were made (1 + the roots changes seen)

    def __len__(self) -> int:
        return len(self.targets)

    @overload
    def __getitem__(self, index: int) -> grpc.aio.Channel: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[grpc.aio.Channel]: ...

    def __getitem__(self, index: int | slice) -> grpc.aio.Channel | Sequence[grpc.aio.Channel]:
        current = self.current()
        return current[index]

    def __iter__(self) -> Iterator[grpc.aio.Channel]:
        return iter(self.current())

    def connect(self, target: str) -> grpc.aio.Channel:
        """The channel to `target` (one of self.targets): a meshca.agent.trust.ChannelFactory."""
        return self[self.targets.index(target)]

    def current(self) -> tuple[SharedChannel, ...]:
        """The channels to use now (made, or made again with new roots, here)."""
        try:
            roots = self._roots()
        except OSError:
            if not self._current:
                raise
            return self._current
        if self._current and self._current[0].roots == roots:
            return self._current
        old, self._current = self._current, tuple(
            SharedChannel(target, roots, self._options, self._idle) for target in self.targets
        )
        self.generations += 1
        for channel in old:
            self._retired.add(channel)
            if channel.calls == 0:
                self._idle(channel)
        return self._current

    def _idle(self, channel: SharedChannel) -> None:
        if channel in self._retired:
            self._retired.discard(channel)
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def open_channels(self) -> list[SharedChannel]:
        """Every channel not closed yet: the current ones and the older ones still running a call."""
        return [c for c in (*self._current, *self._retired) if not c.closed]

    async def close(self) -> None:
        """Close every channel (calls still running on them are cancelled); a later use makes new ones."""
        channels = [*self._current, *self._retired]
        self._current = ()
        self._retired.clear()
        for channel in channels:
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
