"""The SotW protocol state machine: ACK, NACK without resend loop, stale nonce, late names, ordering."""

from __future__ import annotations

import itertools

from meshca.mesh import resources as r
from meshca.xds.protocol import Outcome
from meshca.xds.snapshot import PUSH_ORDER, ResourceType, Snapshot
from meshca.xds.sotw import SotwStream, XdsRequest, XdsResponse

CDS, EDS, LDS, RDS, SDS = (
    ResourceType.CLUSTER,
    ResourceType.ENDPOINT,
    ResourceType.LISTENER,
    ResourceType.ROUTE,
    ResourceType.SECRET,
)


def snapshot(clusters: dict[str, int], previous: Snapshot | None = None) -> Snapshot:
    resources = []
    for name, port in clusters.items():
        resources.append(r.cluster(r.ClusterSpec(name)))
        resources.append(r.cluster_load_assignment(name, [("127.0.0.1", port)]))
    resources.append(r.validation_context_secret("ROOTCA", b"bundle"))
    return Snapshot.build(resources, previous=previous)


def new_stream() -> SotwStream:
    counter = itertools.count(1)
    return SotwStream(list(ResourceType), lambda: f"n{next(counter)}")


def test_first_request_is_answered_and_ack_is_quiet() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    first = stream.on_request(XdsRequest(CDS), snap)
    (response,) = first.responses
    assert [res.name for res in response.resources] == ["a"]
    assert response.version == snap.version(CDS)
    ack = stream.on_request(XdsRequest(CDS, response.version, (), response.nonce), snap)
    assert ack.responses == ()
    assert ack.ack is not None and ack.ack.version == response.version


def test_stale_nonce_gets_no_response() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    (response,) = stream.on_request(XdsRequest(CDS), snap).responses
    stream.on_request(XdsRequest(CDS, response.version, (), response.nonce), snap)
    (pushed,) = stream.on_snapshot(snapshot({"a": 1, "b": 2})).responses
    stale = stream.on_request(XdsRequest(CDS, response.version, (), response.nonce), snapshot({"a": 1, "b": 2}))
    assert stale.stale and stale.responses == () and stale.ack is None
    assert pushed.nonce != response.nonce


def test_nack_is_recorded_and_not_answered_with_the_same_version() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    (response,) = stream.on_request(XdsRequest(CDS), snap).responses
    nack = stream.on_request(XdsRequest(CDS, "", (), response.nonce, 13, "bad cluster"), snap)
    assert nack.nack is not None
    assert nack.nack.rejected_version == response.version and nack.nack.error_message == "bad cluster"
    assert nack.responses == ()
    # the same snapshot published again: still nothing (no resend loop)
    assert stream.on_snapshot(snap).responses == ()
    # a re-sent NACK-ed nonce without error (Envoy re-requesting) does not resend the rejected version
    assert stream.on_request(XdsRequest(CDS, "", (), response.nonce), snap).responses == ()
    # a new snapshot is sent
    newer = snapshot({"a": 1, "b": 2})
    (fixed,) = stream.on_snapshot(newer).responses
    assert fixed.version == newer.version(CDS)


def test_one_unacked_response_per_type_then_catch_up_on_ack() -> None:
    stream = new_stream()
    (response,) = stream.on_request(XdsRequest(CDS), snapshot({"a": 1})).responses
    latest = snapshot({"a": 1, "b": 2, "c": 3})
    assert stream.on_snapshot(snapshot({"a": 1, "b": 2})).responses == ()  # still waiting for the ACK
    caught_up = stream.on_request(XdsRequest(CDS, response.version, (), response.nonce), latest)
    (next_response,) = caught_up.responses
    assert {res.name for res in next_response.resources} == {"a", "b", "c"}


def test_names_requested_before_they_exist_are_sent_when_they_appear() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    (response,) = stream.on_request(XdsRequest(EDS, "", ("a", "late")), snap).responses
    assert [res.name for res in response.resources] == ["a"]
    assert stream.on_request(XdsRequest(EDS, response.version, ("a", "late"), response.nonce), snap).responses == ()
    (with_late,) = stream.on_snapshot(snapshot({"a": 1, "late": 2})).responses
    assert sorted(res.name for res in with_late.resources) == ["a", "late"]


def test_request_for_only_missing_names_waits() -> None:
    stream = new_stream()
    assert stream.on_request(XdsRequest(SDS, "", ("default",)), snapshot({"a": 1})).responses == ()


def test_wildcard_and_legacy_wildcard() -> None:
    snap = snapshot({"a": 1, "b": 2})
    legacy = new_stream().on_request(XdsRequest(CDS), snap)
    star = new_stream().on_request(XdsRequest(EDS, "", ("*",)), snap)
    empty_eds = new_stream().on_request(XdsRequest(EDS), snap)
    assert {res.name for res in legacy.responses[0].resources} == {"a", "b"}
    assert {res.name for res in star.responses[0].resources} == {"a", "b"}
    assert empty_eds.responses == ()  # legacy wildcard is for LDS/CDS only


def test_full_state_for_cds_includes_unchanged_resources() -> None:
    stream = new_stream()
    (first,) = stream.on_request(XdsRequest(CDS), snapshot({"a": 1})).responses
    stream.on_request(XdsRequest(CDS, first.version, (), first.nonce), snapshot({"a": 1}))
    (second,) = stream.on_snapshot(snapshot({"a": 1, "b": 2})).responses
    assert {res.name for res in second.resources} == {"a", "b"}


def test_repeated_ack_nonce_is_answered_for_warming_clusters() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    (response,) = stream.on_request(XdsRequest(EDS, "", ("a",)), snap).responses
    assert stream.on_request(XdsRequest(EDS, response.version, ("a",), response.nonce), snap).responses == ()
    (again,) = stream.on_request(XdsRequest(EDS, response.version, ("a",), response.nonce), snap).responses
    assert again.version == response.version and again.nonce != response.nonce


def test_push_order_is_make_before_break() -> None:
    assert PUSH_ORDER == (SDS, CDS, EDS, LDS, RDS)
    stream = new_stream()
    snap = snapshot({"a": 1})
    for resource_type, names in ((LDS, ()), (EDS, ("a",)), (CDS, ()), (SDS, ("ROOTCA",))):
        outcome = stream.on_request(XdsRequest(resource_type, "", names), snap)
        for response in outcome.responses:
            stream.on_request(XdsRequest(resource_type, response.version, names, response.nonce), snap)
    changed = snapshot({"a": 2, "b": 3})
    pushed = [response.type for response in stream.on_snapshot(changed).responses]
    assert pushed == [CDS, EDS, LDS] or pushed == [CDS, EDS]
    assert pushed.index(CDS) < pushed.index(EDS)


def test_unchanged_types_are_not_pushed() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    for resource_type, names in ((CDS, ()), (EDS, ("a",))):
        (response,) = stream.on_request(XdsRequest(resource_type, "", names), snap).responses
        stream.on_request(XdsRequest(resource_type, response.version, names, response.nonce), snap)
    pushed = stream.on_snapshot(snapshot({"a": 2})).responses
    assert [response.type for response in pushed] == [EDS]



def successor(previous: Snapshot, clusters: dict[str, int]) -> Snapshot:
    """The next snapshot, built knowing the previous one (as the publisher does), so changes are known."""
    return snapshot(clusters, previous)


def ack(stream: SotwStream, response: XdsResponse, names: tuple[str, ...], snap: Snapshot) -> Outcome[XdsResponse]:
    return stream.on_request(XdsRequest(response.type, response.version, names, response.nonce), snap)


def test_named_types_carry_only_what_changed_since_the_client_synced() -> None:
    """EDS/RDS/SDS are not full state in SotW: Envoy keeps the CLAs a response leaves out."""
    stream = new_stream()
    names = ("a", "b", "c")
    one = snapshot({"a": 1, "b": 2, "c": 3, "z": 4})
    (first,) = stream.on_request(XdsRequest(EDS, "", names), one).responses
    assert [res.name for res in first.resources] == ["a", "b", "c"]
    ack(stream, first, names, one)
    two = successor(one, {"a": 1, "b": 9, "c": 3, "z": 4})
    (pushed,) = stream.on_snapshot(two).responses
    assert [res.name for res in pushed.resources] == ["b"] and pushed.version == two.version(EDS)
    # the ACK subscribes one more name: just that one is sent
    (added,) = ack(stream, pushed, (*names, "z"), two).responses
    assert [res.name for res in added.resources] == ["z"]
    ack(stream, added, (*names, "z"), two)
    # a change to a CLA this stream does not subscribe to: nothing to send
    stream_without_z = new_stream()
    (initial,) = stream_without_z.on_request(XdsRequest(EDS, "", names), two).responses
    ack(stream_without_z, initial, names, two)
    assert stream_without_z.on_snapshot(successor(two, {"a": 1, "b": 9, "c": 3, "z": 5})).responses == ()


def test_after_a_nack_the_next_response_carries_every_subscribed_resource() -> None:
    stream = new_stream()
    names = ("a", "b")
    one = snapshot({"a": 1, "b": 2})
    (first,) = stream.on_request(XdsRequest(EDS, "", names), one).responses
    ack(stream, first, names, one)
    two = successor(one, {"a": 1, "b": 3})
    (pushed,) = stream.on_snapshot(two).responses
    assert [res.name for res in pushed.resources] == ["b"]
    stream.on_request(XdsRequest(EDS, first.version, names, pushed.nonce, 13, "bad"), two)
    (resent,) = stream.on_snapshot(successor(two, {"a": 1, "b": 4})).responses
    assert [res.name for res in resent.resources] == ["a", "b"]


def test_full_state_types_and_unknown_history_send_everything() -> None:
    stream = new_stream()
    one = snapshot({"a": 1, "b": 2})
    (cds,) = stream.on_request(XdsRequest(CDS), one).responses
    (eds,) = stream.on_request(XdsRequest(EDS, "", ("a", "b")), one).responses
    ack(stream, cds, (), one)
    ack(stream, eds, ("a", "b"), one)
    two = successor(one, {"a": 1, "b": 3, "c": 5})
    pushed = {res.type: [x.name for x in res.resources] for res in stream.on_snapshot(two).responses}
    assert pushed == {CDS: ["a", "b", "c"], EDS: ["b"]}  # CDS is full state: all of it
    unknown = snapshot({"a": 1, "b": 4, "c": 5})  # built without `previous`: what changed is unknown
    stream2 = new_stream()
    (eds2,) = stream2.on_request(XdsRequest(EDS, "", ("a", "b")), one).responses
    ack(stream2, eds2, ("a", "b"), one)
    (everything,) = stream2.on_snapshot(unknown).responses
    assert [res.name for res in everything.resources] == ["a", "b"]


def test_repeated_ack_nonce_still_resends_everything() -> None:
    """Envoy re-requests EDS with an ACKed nonce while a changed cluster warms: it needs all of them."""
    stream = new_stream()
    one = snapshot({"a": 1, "b": 2})
    (eds,) = stream.on_request(XdsRequest(EDS, "", ("a", "b")), one).responses
    ack(stream, eds, ("a", "b"), one)
    (again,) = ack(stream, eds, ("a", "b"), one).responses
    assert [res.name for res in again.resources] == ["a", "b"]


def test_a_stream_some_versions_behind_gets_what_changed_over_all_of_them() -> None:
    stream = new_stream()
    names = ("a", "b", "c")
    one = snapshot({"a": 1, "b": 2, "c": 3})
    (first,) = stream.on_request(XdsRequest(EDS, "", names), one).responses
    ack(stream, first, names, one)
    two = successor(one, {"a": 1, "b": 5, "c": 3})
    three = successor(two, {"a": 1, "b": 5, "c": 6})  # published before the stream woke up for `two`
    (pushed,) = stream.on_snapshot(three).responses
    assert [res.name for res in pushed.resources] == ["b", "c"]


def test_wire_requests_compare_their_names_by_canonical_bytes() -> None:
    """parse_request keys the names by their wire bytes; the stream rebuilds its name set only when they change."""
    from meshca.v1 import xds_wire_pb2
    from meshca.xds.server import parse_request

    def wire(names: list[str], nonce: str, version: str = "v") -> XdsRequest:
        raw = xds_wire_pb2.DiscoveryRequest(
            version_info=version, resource_names=names, type_url=EDS.type_url, response_nonce=nonce
        ).SerializeToString()
        request, _ = parse_request(raw, None)
        assert request is not None
        return request

    one, same, other = wire(["a", "b"], "1"), wire(["a", "b"], "2", "w"), wire(["a", "c"], "1")
    assert one.names_key == same.names_key != other.names_key
    assert list(one.resource_names) == ["a", "b"] and (one.version_info, one.response_nonce) == ("v", "1")
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2, "c": 3})
    (first,) = stream.on_request(wire(["a", "b"], ""), snap).responses
    assert [res.name for res in first.resources] == ["a", "b"]
    (changed,) = stream.on_request(wire(["a", "c"], first.nonce, first.version), snap).responses
    assert [res.name for res in changed.resources] == ["c"]  # names changed: the newly subscribed one is sent
