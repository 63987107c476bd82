"""What the SotW and delta protocols share: a request's ACK/NACK, what one input did, the stream interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from meshca.xds.snapshot import ResourceType, Snapshot

WILDCARD = "*"


class Request:
    """What a SotW or delta request says about the last response of its type: the nonce it answers
    and, for a NACK, the client's error. Mixed into both request dataclasses, which declare these
    fields among their own (in their constructors' order)."""

    type: ResourceType
    response_nonce: str
    error_code: int | None
    error_message: str

    @property
    def is_nack(self) -> bool:
        return self.error_code is not None


@dataclass(frozen=True)
class Ack:
    """The client accepted the response its nonce names; `version` is the version it now holds."""

    type: ResourceType
    version: str


@dataclass(frozen=True)
class Nack:
    """The client rejected `rejected_version` (None: unknown) and keeps `last_good_version`."""

    type: ResourceType
    rejected_version: str | None
    last_good_version: str
    error_code: int
    error_message: str


ResponseT = TypeVar("ResponseT")
RequestT = TypeVar("RequestT", contravariant=True)


@dataclass(frozen=True)
class Outcome(Generic[ResponseT]):
    """What one input did: responses to send (in order) and what the client told us (SotW and delta)."""

    responses: tuple[ResponseT, ...] = ()
    ack: Ack | None = None
    nack: Nack | None = None
    stale: bool = False


class ProtocolStream(Protocol[RequestT, ResponseT]):
    """One stream's protocol state machine (SotwStream or DeltaStream): pure, no I/O. The server hands
    it each decoded request and each newer snapshot, sends the outcome's responses in order and
    records its ACK or NACK."""

    def on_request(self, request: RequestT, snapshot: Snapshot | None) -> Outcome[ResponseT]: ...

    def on_snapshot(self, snapshot: Snapshot) -> Outcome[ResponseT]: ...
