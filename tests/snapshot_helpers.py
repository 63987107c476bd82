"""Snapshot helpers only tests use: the full consistency check and encoding an envoy-data-plane message."""

from __future__ import annotations

from collections.abc import Iterable

import betterproto2

from meshca.xds.snapshot import EncodedResource, InconsistentSnapshot, Reference, ResourceType, Snapshot, encode_payload


def check_consistency(snapshot: Snapshot) -> None:
    """Check every reference of every resource in `snapshot` (the snapshot's own checks cover only what each
    step changed; this is what they must agree with). Raises InconsistentSnapshot listing the dangling ones."""
    problems = [
        f"{resource.type.short_name} {resource.name!r} references {ref.type.short_name} {ref.name!r}, which does not exist"
        for type_resources in snapshot.types.values()
        for resource in type_resources.resources.values()
        for ref in sorted(resource.references, key=lambda r: (r.type.value, r.name))
        if ref.name not in snapshot.of_type(ref.type).resources
    ]
    if problems:
        raise InconsistentSnapshot(problems)


def encode_resource(
    resource_type: ResourceType, name: str, message: betterproto2.Message, references: Iterable[Reference] = ()
) -> EncodedResource:
    """`message` serialized by envoy-data-plane and wrapped as meshca's builders wrap their own bytes."""
    return encode_payload(resource_type, name, bytes(message), references)
