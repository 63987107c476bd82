"""The delta xDS state machine: per-resource versions, subscriptions, removals, nonces, NACKs, ordering."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from meshca.mesh import resources as r
from meshca.xds.delta import REMOVAL_ORDER, DeltaOutcome, DeltaRequest, DeltaResponse, DeltaStream
from meshca.xds.snapshot import PUSH_ORDER, EncodedResource, ResourceType, Snapshot

CDS, EDS, LDS, RDS, SDS = (ResourceType[n] for n in ("CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "SECRET"))


def snapshot(
    clusters: dict[str, int],
    routed: tuple[str, ...] = (),
    secret: bytes = b"bundle",
    timeout: int = 2,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Clusters with their endpoints (port = content); `routed` clusters get a route and a listener."""
    resources: list[EncodedResource] = []
    for name, port in clusters.items():
        resources.append(r.cluster(r.ClusterSpec(name, connect_timeout=timedelta(seconds=timeout))))
        resources.append(r.cluster_load_assignment(name, [("127.0.0.1", port)]))
    if routed:
        routes = tuple(r.RouteSpec(f"/{name}", ((name, 1),)) for name in routed)
        resources.append(r.route_configuration("routes", [r.VirtualHostSpec("all", routes=routes)]))
        resources.append(r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", 15006, "routes")))
    resources.append(r.validation_context_secret("ROOTCA", secret))
    return Snapshot.build(resources, previous=previous)


def new_stream(types: tuple[ResourceType, ...] = tuple(ResourceType)) -> DeltaStream:
    counter = itertools.count(1)
    return DeltaStream(types, lambda: f"n{next(counter)}")


def single(outcome: DeltaOutcome) -> DeltaResponse:
    (response,) = outcome.responses
    return response


def names(response: DeltaResponse) -> list[str]:
    return [resource.name for resource in response.resources]


def ack(stream: DeltaStream, response: DeltaResponse, snap: Snapshot) -> DeltaOutcome:
    return stream.on_request(DeltaRequest(response.type, response_nonce=response.nonce), snap)


def subscribed(stream: DeltaStream, resource_type: ResourceType, subscribe: tuple[str, ...], snap: Snapshot) -> None:
    """Subscribe and ACK everything sent, so the stream is idle and in sync."""
    outcome = stream.on_request(DeltaRequest(resource_type, subscribe), snap)
    for response in outcome.responses:
        assert ack(stream, response, snap).responses == ()


def test_legacy_wildcard_first_response_and_quiet_ack() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2})
    response = single(stream.on_request(DeltaRequest(CDS), snap))
    assert names(response) == ["a", "b"] and response.removed == ()
    assert response.version == snap.version(CDS)
    assert [res.version for res in response.resources] == [
        snap.of_type(CDS).resources[n].version for n in ("a", "b")
    ]
    acked = ack(stream, response, snap)
    assert acked.responses == () and acked.ack is not None and acked.ack.version == snap.version(CDS)
    assert stream.on_snapshot(snap).responses == ()


def test_only_changed_and_added_resources_are_sent() -> None:
    stream = new_stream()
    subscribed(stream, CDS, (), snapshot({"a": 1, "b": 2}))
    subscribed(stream, EDS, ("a", "b"), snapshot({"a": 1, "b": 2}))
    cds, eds = stream.on_snapshot(snapshot({"a": 1, "b": 3, "c": 4})).responses
    assert cds.type is CDS and names(cds) == ["c"]  # wildcard: the new cluster only
    assert eds.type is EDS and names(eds) == ["b"]  # c is not subscribed; a unchanged


def test_explicit_star_is_wildcard_and_empty_first_request_is_not_for_eds() -> None:
    snap = snapshot({"a": 1, "b": 2})
    assert names(single(new_stream().on_request(DeltaRequest(EDS, ("*",)), snap))) == ["a", "b"]
    assert new_stream().on_request(DeltaRequest(EDS), snap).responses == ()
    assert names(single(new_stream().on_request(DeltaRequest(LDS), snapshot({"a": 1}, ("a",))))) == ["inbound"]


def test_first_wildcard_request_is_answered_even_when_empty() -> None:
    response = single(new_stream().on_request(DeltaRequest(LDS), snapshot({"a": 1})))
    assert response.resources == () and response.removed == ()


def test_legacy_wildcard_ends_when_a_name_is_subscribed() -> None:
    stream = new_stream()
    subscribed(stream, CDS, (), snapshot({"a": 1}))
    assert stream.on_request(DeltaRequest(CDS, ("a",)), snapshot({"a": 1})).responses == ()
    assert stream.on_snapshot(snapshot({"a": 1, "b": 2})).responses == ()  # b: no longer wildcard


def test_star_with_names_stays_wildcard_and_star_can_be_unsubscribed() -> None:
    stream = new_stream()
    subscribed(stream, CDS, ("*", "a"), snapshot({"a": 1}))
    response = single(stream.on_snapshot(snapshot({"a": 1, "b": 2})))
    assert names(response) == ["b"]
    ack(stream, response, snapshot({"a": 1, "b": 2}))
    assert stream.on_request(DeltaRequest(CDS, (), ("*",)), snapshot({"a": 1, "b": 2})).responses == ()
    assert stream.on_snapshot(snapshot({"a": 1, "b": 3, "c": 4})).responses == ()  # only 'a' is left
    # subscribing to the wildcard again sends what the client dropped with it
    again = single(stream.on_request(DeltaRequest(CDS, ("*",)), snapshot({"a": 1, "b": 3, "c": 4})))
    assert names(again) == ["b", "c"]


def test_initial_resource_versions_are_never_resent() -> None:
    snap = snapshot({"a": 1, "b": 2})
    held = {n: res.version for n, res in snap.of_type(EDS).resources.items()}
    # explicit names, all held at the current version: nothing at all
    stream = new_stream()
    outcome = stream.on_request(DeltaRequest(EDS, ("a", "b"), initial_versions=held), snap)
    assert outcome.responses == ()
    # one changed meanwhile: only it is sent
    changed = snapshot({"a": 1, "b": 3})
    assert names(single(new_stream().on_request(DeltaRequest(EDS, ("a", "b"), initial_versions=held), changed))) == [
        "b"
    ]
    # wildcard reconnect: an empty answer, nothing already held
    cds_held = {n: res.version for n, res in snap.of_type(CDS).resources.items()}
    response = single(new_stream().on_request(DeltaRequest(CDS, initial_versions=cds_held), snap))
    assert response.resources == () and response.removed == ()


def test_reconnect_with_a_vanished_resource_gets_its_removal() -> None:
    old = snapshot({"a": 1, "gone": 2})
    held = {n: res.version for n, res in old.of_type(CDS).resources.items()}
    response = single(new_stream().on_request(DeltaRequest(CDS, initial_versions=held), snapshot({"a": 1})))
    assert response.resources == () and response.removed == ("gone",)


def test_removed_resources_for_explicit_and_wildcard_and_not_for_never_sent() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2})
    subscribed(stream, CDS, (), snap)
    subscribed(stream, EDS, ("a", "b", "never"), snap)
    smaller = snapshot({"a": 1})
    cds, eds = stream.on_snapshot(smaller).responses
    assert (cds.type, cds.removed, cds.resources) == (CDS, ("b",), ())
    assert (eds.type, eds.removed, eds.resources) == (EDS, ("b",), ())
    ack(stream, cds, smaller)
    ack(stream, eds, smaller)
    # still subscribed: b is sent again when it reappears
    (eds_again,) = [res for res in stream.on_snapshot(snap).responses if res.type is EDS]
    assert names(eds_again) == ["b"]


def test_stale_nonce_still_changes_subscriptions_but_is_no_ack() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2})
    first = single(stream.on_request(DeltaRequest(EDS, ("a",)), snap))
    ack(stream, first, snap)
    pushed = single(stream.on_snapshot(snapshot({"a": 5, "b": 2})))
    # a request answering the older response, subscribing to b: applied, not an ACK of `pushed`
    stale = stream.on_request(DeltaRequest(EDS, ("b",), response_nonce=first.nonce), snapshot({"a": 5, "b": 2}))
    assert stale.stale and stale.ack is None and stale.nack is None
    assert stale.responses == ()  # `pushed` is still unacknowledged
    caught_up = single(ack(stream, pushed, snapshot({"a": 5, "b": 2})))
    assert names(caught_up) == ["b"]


def test_stale_nonce_subscription_change_is_answered_when_nothing_is_outstanding() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2, "c": 3})
    first = single(stream.on_request(DeltaRequest(EDS, ("a",)), snap))
    ack(stream, first, snap)
    second = single(stream.on_request(DeltaRequest(EDS, ("b",)), snap))
    ack(stream, second, snap)
    stale = stream.on_request(DeltaRequest(EDS, ("c",), ("a",), response_nonce=first.nonce), snap)
    assert stale.stale and stale.ack is None
    answer = single(stale)
    assert names(answer) == ["c"]
    ack(stream, answer, snap)
    assert stream.on_snapshot(snapshot({"a": 7, "b": 2, "c": 3})).responses == ()  # a was unsubscribed
    assert names(single(stream.on_snapshot(snapshot({"a": 7, "b": 2, "c": 4})))) == ["c"]


def test_nack_is_recorded_and_rejected_versions_are_not_resent() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    subscribed(stream, CDS, (), snap)
    bad = snapshot({"a": 1, "b": 2})
    pushed = single(stream.on_snapshot(bad))
    nacked = stream.on_request(
        DeltaRequest(CDS, response_nonce=pushed.nonce, error_code=13, error_message="bad cluster b"), bad
    )
    assert nacked.nack is not None and nacked.ack is None
    assert nacked.nack.rejected_version == bad.version(CDS)
    assert nacked.nack.last_good_version == snap.version(CDS)
    assert nacked.nack.error_message == "bad cluster b" and nacked.responses == ()
    assert stream.on_snapshot(bad).responses == ()  # same versions published again: nothing
    fixed = single(stream.on_snapshot(snapshot({"a": 1, "b": 2, "c": 3})))
    assert names(fixed) == ["c"]  # what changed; the rejected b is still not sent again


def test_at_most_one_unacked_response_per_type_then_the_latest_changes() -> None:
    stream = new_stream()
    subscribed(stream, CDS, (), snapshot({"a": 1}))
    subscribed(stream, EDS, ("a", "b", "c"), snapshot({"a": 1}))
    first = single(stream.on_snapshot(snapshot({"a": 2})))
    assert first.type is EDS
    assert stream.on_snapshot(snapshot({"a": 3})).responses == ()  # waiting for the EDS ACK
    latest = snapshot({"a": 4, "b": 5})
    assert [res.type for res in stream.on_snapshot(latest).responses] == [CDS]  # EDS still waits
    caught_up = single(ack(stream, first, latest))
    assert caught_up.type is EDS and names(caught_up) == ["a", "b"]
    assert caught_up.resources[0].version == latest.of_type(EDS).resources["a"].version


def test_names_subscribed_before_they_exist_are_sent_when_they_appear() -> None:
    stream = new_stream()
    assert stream.on_request(DeltaRequest(SDS, ("default",)), snapshot({"a": 1})).responses == ()
    subscribed(stream, EDS, ("a", "late"), snapshot({"a": 1}))
    (late,) = stream.on_snapshot(snapshot({"a": 1, "late": 2})).responses
    assert late.type is EDS and names(late) == ["late"]


def test_unsubscribe_forgets_without_a_response_and_resubscribe_sends_again() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2})
    subscribed(stream, EDS, ("a", "b"), snap)
    assert stream.on_request(DeltaRequest(EDS, (), ("b",)), snap).responses == ()
    assert stream.on_snapshot(snapshot({"a": 1, "b": 9})).responses == ()
    assert stream.on_snapshot(snapshot({"a": 1})).responses == ()  # no removal for a name it dropped
    assert names(single(stream.on_request(DeltaRequest(EDS, ("b",)), snap))) == ["b"]


def test_unsubscribing_a_name_in_wildcard_mode_sends_it_again() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2})
    subscribed(stream, CDS, ("*", "a"), snap)
    assert names(single(stream.on_request(DeltaRequest(CDS, (), ("a",)), snap))) == ["a"]


def test_updates_in_push_order_then_removals_in_break_order() -> None:
    assert REMOVAL_ORDER == (LDS, RDS, CDS, EDS, SDS)
    stream = new_stream()
    before = snapshot({"a": 1, "b": 2}, routed=("a", "b"))
    for resource_type, subscribe in ((CDS, ()), (EDS, ("a", "b")), (LDS, ()), (RDS, ("routes",)), (SDS, ("ROOTCA",))):
        subscribed(stream, resource_type, subscribe, before)
    # b goes away with its route; the secret and a's endpoints change
    after = snapshot({"a": 3}, routed=("a",), secret=b"new bundle")
    responses = stream.on_snapshot(after).responses
    assert [(res.type, bool(res.resources), bool(res.removed)) for res in responses] == [
        (SDS, True, False),
        (EDS, True, False),
        (RDS, True, False),
        (CDS, False, True),
    ]
    for response in responses:
        assert not (response.resources and response.removed)
    assert [res.type for res in responses if res.resources] == [t for t in PUSH_ORDER if t in (SDS, EDS, RDS)]
    # EDS had both an update and a removal: the removal follows its ACK
    eds = responses[1]
    assert names(eds) == ["a"]
    removal = single(ack(stream, eds, after))
    assert (removal.type, removal.removed, removal.resources) == (EDS, ("b",), ())


def test_a_type_not_served_on_the_stream_is_refused() -> None:
    stream = new_stream((CDS,))
    with pytest.raises(ValueError, match="not served"):
        stream.on_request(DeltaRequest(LDS), snapshot({"a": 1}))


def test_no_snapshot_yet_then_first_wildcard_answer_on_snapshot() -> None:
    stream = new_stream()
    assert stream.on_request(DeltaRequest(CDS), None).responses == ()
    assert names(single(stream.on_snapshot(snapshot({"a": 1})))) == ["a"]


def test_a_changed_cluster_gets_its_unchanged_endpoints_again() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1, "b": 2})
    subscribed(stream, CDS, (), snap)
    subscribed(stream, EDS, ("a", "b"), snap)
    changed = snapshot({"a": 1, "b": 2}, timeout=7)  # every cluster changes, no CLA does
    cds, eds = stream.on_snapshot(changed).responses
    assert (cds.type, names(cds)) == (CDS, ["a", "b"])
    assert (eds.type, names(eds)) == (EDS, ["a", "b"])  # Envoy warms a changed cluster until it gets its CLA
    ack(stream, cds, changed)
    ack(stream, eds, changed)
    assert stream.on_snapshot(changed).responses == ()  # once, not in a loop


def test_a_cluster_sent_on_the_ack_brings_its_endpoints_along() -> None:
    stream = new_stream()
    snap = snapshot({"a": 1})
    first_cds = single(stream.on_request(DeltaRequest(CDS), snap))
    subscribed(stream, EDS, ("a",), snap)
    changed = snapshot({"a": 1}, timeout=7)
    assert stream.on_snapshot(changed).responses == ()  # CDS waits for its ACK; EDS has nothing new
    cds, eds = ack(stream, first_cds, changed).responses
    assert (cds.type, names(cds), eds.type, names(eds)) == (CDS, ["a"], EDS, ["a"])


def test_reconnect_with_a_changed_cluster_resends_the_held_endpoints() -> None:
    old = snapshot({"a": 1, "b": 2})
    held_clusters = {n: res.version for n, res in old.of_type(CDS).resources.items()}
    held_endpoints = {n: res.version for n, res in old.of_type(EDS).resources.items()}
    changed = snapshot({"a": 1, "b": 2}, timeout=7)
    stream = new_stream()
    cds = single(stream.on_request(DeltaRequest(CDS, initial_versions=held_clusters), changed))
    assert names(cds) == ["a", "b"]
    eds = single(stream.on_request(DeltaRequest(EDS, ("a", "b"), initial_versions=held_endpoints), changed))
    assert names(eds) == ["a", "b"]
    # unchanged clusters on reconnect: the held endpoints are not sent
    quiet = new_stream()
    single(quiet.on_request(DeltaRequest(CDS, initial_versions=held_clusters), old))
    assert quiet.on_request(DeltaRequest(EDS, ("a", "b"), initial_versions=held_endpoints), old).responses == ()


def test_in_sync_streams_look_only_at_what_changed_and_send_exactly_what_a_full_diff_sends() -> None:
    """Snapshots built knowing their predecessor let an in-sync stream diff only the changed names;
    a twin stream fed the same states without that history diffs everything: same responses."""
    import random

    rng = random.Random(7)
    states = [{f"c{i}": 1 for i in range(12)}]
    for _ in range(25):
        state = dict(states[-1])
        for _ in range(rng.randint(1, 3)):
            name = f"c{rng.randrange(16)}"
            if name in state and rng.random() < 0.3:
                del state[name]
            else:
                state[name] = rng.randrange(1, 5)
        states.append(state)
    fast, full = new_stream(), new_stream()
    known_history, previous = [], None
    for state in states:
        previous = snapshot(state, previous=previous)
        known_history.append(previous)
    subscribed(fast, CDS, ("*",), known_history[0])
    subscribed(full, CDS, ("*",), snapshot(states[0]))
    subscribed(fast, EDS, ("c1", "c3", "c5", "c14"), known_history[0])
    subscribed(full, EDS, ("c1", "c3", "c5", "c14"), snapshot(states[0]))
    for with_history, state in zip(known_history[1:], states[1:]):
        without = snapshot(state)
        for _ in range(3):  # updates, then removals, then nothing: ACK each
            got = fast.on_snapshot(with_history).responses
            want = full.on_snapshot(without).responses
            shape = [(x.type, sorted((res.name, res.version) for res in x.resources), x.removed) for x in got]
            assert shape == [
                (x.type, sorted((res.name, res.version) for res in x.resources), x.removed) for x in want
            ]
            for response in got:
                ack(fast, response, with_history)
            for response in want:
                ack(full, response, without)
