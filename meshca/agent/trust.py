"""The agent follows meshca's trust material (bundle + CRLs, WatchTrust) and adopts the bundle as its own anchor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.backoff import backoff_delay
from meshca.ca.crypto import CryptoError, parse_certificate_pem, parse_crl_pem, split_pem_certificates, split_pem_crls
from meshca.ca.trust_service import FULL_WATCH_METHOD, material_version
from meshca.v1 import trust_pb2

DEFAULT_INITIAL_BACKOFF = timedelta(milliseconds=200)
DEFAULT_MAX_BACKOFF = timedelta(seconds=5)  # a meshca back is followed again within this


@dataclass(frozen=True)
class TrustMaterial:
    """What the agent serves as every workload's ROOTCA: meshca's bundle and the CRLs of all its CAs."""

    bundle_pem: bytes = field(repr=False)
    crls_pem: bytes = field(repr=False)
    version: str
    roots: int
    crls: int
    source: str = ""  # the replica it came from


class UnusableMaterial(ValueError):
    """A TrustMaterial message the agent will not serve; the message says why in one line."""


def parse_material(message: trust_pb2.TrustMaterial, source: str = "") -> TrustMaterial:
    """Check what meshca sent before Envoy gets it: every certificate a CA, every CRL readable, the version right."""
    bundle = message.bundle_pem.encode("ascii", "replace")
    blocks = split_pem_certificates(bundle)
    if not blocks:
        raise UnusableMaterial("bundle_pem holds no PEM certificate")
    for index, block in enumerate(blocks):
        try:
            if not parse_certificate_pem(block).is_ca:
                raise UnusableMaterial(f"bundle_pem certificate {index} is not a CA certificate")
        except CryptoError as error:
            raise UnusableMaterial(f"bundle_pem certificate {index}: {error}") from None
    crls = [pem.encode("ascii", "replace") for pem in message.crl_pem]
    for index, crl in enumerate(crls):
        if len(split_pem_crls(crl)) != 1:
            raise UnusableMaterial(f"crl_pem[{index}] is not one PEM CRL")
        try:
            parse_crl_pem(crl)
        except CryptoError as error:
            raise UnusableMaterial(f"crl_pem[{index}]: {error}") from None
    if material_version(message.bundle_pem, message.crl_pem) != message.version:
        raise UnusableMaterial(f"version {message.version!r} does not match its content")
    crls_pem = b"".join(c if c.endswith(b"\n") else c + b"\n" for c in crls)
    return TrustMaterial(bundle, crls_pem, message.version, len(blocks), len(crls), source)


class TrustAnchor:
    """The roots the agent verifies meshca with: its `ca` file (re-read every time, as before) plus the latest
    bundle received from meshca over a channel verified with them, so that a root meshca adds is trusted for the
    next connection before the old one is pruned (meshca.node.trust does the same for `meshca trust sync`)."""

    def __init__(self, ca_path: Path) -> None:
        self.ca_path = ca_path
        self._adopted: tuple[bytes, ...] = ()

    def adopt(self, bundle_pem: bytes) -> None:
        self._adopted = tuple(split_pem_certificates(bundle_pem))

    @property
    def adopted(self) -> bool:
        return bool(self._adopted)

    def roots(self) -> bytes:
        """The PEM roots, each once: OSError only when the `ca` file is unreadable and nothing was adopted yet."""
        try:
            from_file = split_pem_certificates(self.ca_path.read_bytes())
        except OSError:
            if not self._adopted:
                raise
            from_file = []
        unique = dict.fromkeys([*self._adopted, *from_file])
        return b"".join(unique)


ChannelFactory = Callable[[str], grpc.aio.Channel]


async def follow_trust(
    targets: Sequence[str],
    connect: ChannelFactory,
    on_material: Callable[[TrustMaterial], object],
    logger: logging.Logger,
    *,
    anchor: TrustAnchor | None = None,
    initial_backoff: timedelta = DEFAULT_INITIAL_BACKOFF,
    max_backoff: timedelta = DEFAULT_MAX_BACKOFF,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    shared_channels: bool = False,
) -> None:
    """Hold a WatchTrust stream to one replica after another until cancelled; call `on_material` with every new
    material (checked by parse_material, adopted by `anchor` first). When a stream fails or ends, the next replica
    is tried after a capped backoff (reset once a stream has delivered); nothing is called meanwhile, so whatever
    was served last stays served. `connect` makes a channel per attempt, closed after it; with `shared_channels` it
    hands out channels other calls use too (meshca.agent.channels.ReplicaChannels.connect): only the stream ends."""
    if not targets:
        raise ValueError("follow_trust needs at least one meshca address")
    watch = trust_pb2.WatchTrustRequest()
    attempt = 0
    replica = 0
    last = ""
    while True:
        target = targets[replica % len(targets)]
        delivered = False
        try:
            channel = connect(target)
        except OSError as error:
            why = f"cannot read ca {error.filename}: {error.strerror}"
        else:
            call = channel.unary_stream(
                FULL_WATCH_METHOD,
                request_serializer=trust_pb2.WatchTrustRequest.SerializeToString,
                response_deserializer=trust_pb2.TrustMaterial.FromString,
            )(watch)
            try:
                async for message in call:
                    material = parse_material(message, target)
                    delivered = True
                    attempt = 0
                    if material.version == last:
                        continue
                    if anchor is not None:
                        anchor.adopt(material.bundle_pem)
                    logger.info("trust material %s from meshca at %s: %d root(s), %d CRL(s)",
                                material.version, target, material.roots, material.crls)
                    last = material.version
                    on_material(material)
                why = f"meshca at {target} ended the trust stream"
            except grpc.aio.AioRpcError as error:
                why = f"meshca at {target}: {error.code().name}: {error.details()}"
            except UnusableMaterial as error:
                why = f"meshca at {target} sent unusable trust material: {error}"
            finally:
                if shared_channels:
                    call.cancel()
                else:
                    await channel.close()
        attempt += 1
        replica += 1
        delay = backoff_delay(attempt, initial_backoff, max_backoff)
        held = f"keeping trust material {last}" if last else "no trust material yet"
        (logger.info if delivered else logger.warning)("trust stream: %s (%s); next replica in %.1f s",
                                                       why, held, delay.total_seconds())
        await sleep(delay.total_seconds())
