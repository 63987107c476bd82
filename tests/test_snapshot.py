"""Snapshot engine: consistency check, encode-once, per-type versions, watchers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import MappingProxyType

import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from snapshot_helpers import check_consistency

from meshca.mesh import resources as r
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import (
    EncodedResource,
    InconsistentSnapshot,
    Overlay,
    Reference,
    ResourceType,
    Snapshot,
    TypeResources,
)

TLS = r.MtlsPeer(("spiffe://mesh.test/ns/a/sa/b",))


def mesh_resources(endpoint_port: int = 8080) -> list:
    return [
        r.cluster(r.ClusterSpec("backend", upstream_tls=TLS)),
        r.cluster_load_assignment("backend", [("127.0.0.1", endpoint_port)]),
        r.route_configuration("routes", [r.VirtualHostSpec("all", routes=(r.RouteSpec("/", (("backend", 1),)),))]),
        r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", 15006, "routes", TLS)),
        r.tls_certificate_secret("default", b"chain", b"key"),
        r.validation_context_secret("ROOTCA", b"bundle"),
    ]


def test_consistent_snapshot_builds_and_groups_by_type() -> None:
    snapshot = Snapshot.build(mesh_resources())
    assert set(snapshot.of_type(ResourceType.SECRET).resources) == {"default", "ROOTCA"}
    assert set(snapshot.of_type(ResourceType.CLUSTER).resources) == {"backend"}


@pytest.mark.parametrize(
    "drop, expected",
    [
        ("ENDPOINT", "CDS 'backend' references EDS 'backend'"),
        ("ROUTE", "LDS 'inbound' references RDS 'routes'"),
        ("SECRET", "references SDS 'ROOTCA'"),
        ("CLUSTER", "RDS 'routes' references CDS 'backend'"),
    ],
)
def test_dangling_reference_is_refused_with_its_name(drop: str, expected: str) -> None:
    kept = [res for res in mesh_resources() if res.type is not ResourceType[drop]]
    with pytest.raises(InconsistentSnapshot) as error:
        Snapshot.build(kept)
    assert expected in str(error.value)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(InconsistentSnapshot, match="defined twice"):
        Snapshot.build(mesh_resources() + [r.cluster_load_assignment("backend", [("127.0.0.1", 1)])])


def test_resource_is_encoded_once_and_round_trips() -> None:
    resource = r.cluster(r.ClusterSpec("backend"))
    decoded = Cluster.parse(resource.payload)
    assert decoded.name == "backend"
    snapshot_a = Snapshot.build([resource, r.cluster_load_assignment("backend", [])])
    snapshot_b = snapshot_a.fill_provided(ResourceType.SECRET, TypeResources.of([r.validation_context_secret("X", b"x")]))
    # the cluster object (and its bytes) is shared, not re-encoded
    assert snapshot_b.of_type(ResourceType.CLUSTER).resources["backend"] is resource
    assert snapshot_b.of_type(ResourceType.CLUSTER).resources["backend"].payload is resource.payload


def test_type_version_changes_only_with_that_types_content() -> None:
    one = Snapshot.build(mesh_resources(8080))
    two = Snapshot.build(mesh_resources(9090))
    assert one.version(ResourceType.ENDPOINT) != two.version(ResourceType.ENDPOINT)
    for unchanged in (ResourceType.CLUSTER, ResourceType.LISTENER, ResourceType.ROUTE, ResourceType.SECRET):
        assert one.version(unchanged) == two.version(unchanged)
    assert Snapshot.build(mesh_resources(8080)).version(ResourceType.ENDPOINT) == one.version(ResourceType.ENDPOINT)


def test_private_key_bytes_are_not_in_repr() -> None:
    secret = r.tls_certificate_secret("default", b"chain", b"-----BEGIN PRIVATE KEY-----Zq9KeyMaterial")
    assert b"Zq9KeyMaterial" in secret.payload
    assert "Zq9KeyMaterial" not in repr(secret)
    assert "Zq9KeyMaterial" not in repr(Snapshot.build([secret]))


async def test_watchers_are_woken_from_another_thread() -> None:
    cache = SnapshotCache()
    watch = cache.watch("group")
    snapshot = Snapshot.build(mesh_resources())
    thread = threading.Thread(target=cache.set_snapshot, args=("group", snapshot))
    thread.start()
    await asyncio.wait_for(watch.event.wait(), 5)
    thread.join()
    assert cache.get("group") is snapshot
    assert cache.get("other") is None
    watch.close()
    assert cache.watcher_count("group") == 0


def secret_refs() -> frozenset[Reference]:
    return frozenset({Reference(ResourceType.SECRET, "default"), Reference(ResourceType.SECRET, "ROOTCA")})


def shared(endpoint_port: int = 8080, with_backend: bool = True) -> list[EncodedResource]:
    resources = [r.route_configuration("routes", [r.VirtualHostSpec("all")])]
    if with_backend:
        resources += [
            r.cluster(r.ClusterSpec("backend", upstream_tls=TLS)),
            r.cluster_load_assignment("backend", [("127.0.0.1", endpoint_port)]),
        ]
    return resources


def own_listener() -> list[EncodedResource]:
    return [r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", 15006, "routes", TLS))]


def test_rebuild_knows_what_changed_and_checks_it() -> None:
    one = Snapshot.build(shared(8080), provided=secret_refs())
    two = Snapshot.build(shared(9090), previous=one, provided=secret_refs())
    eds = two.of_type(ResourceType.ENDPOINT)
    assert eds.changed_since(one.of_type(ResourceType.ENDPOINT)) == {"backend"}
    assert two.of_type(ResourceType.CLUSTER) is one.of_type(ResourceType.CLUSTER)  # unchanged type: same object
    # removing the CLA an unchanged cluster still references is refused, naming both
    kept = [res for res in shared(9090) if res.type is not ResourceType.ENDPOINT]
    with pytest.raises(InconsistentSnapshot, match="CDS 'backend' references EDS 'backend'"):
        Snapshot.build(kept, previous=two, provided=secret_refs())
    # without `provided` the secrets the clusters need are missing
    with pytest.raises(InconsistentSnapshot, match="references SDS 'ROOTCA'"):
        Snapshot.build(shared(9090), previous=two)


def view_of(base: Snapshot, own: list[EncodedResource], provided: frozenset[Reference] = frozenset()) -> Snapshot:
    """An identity's view as the publisher makes it: its own resources checked against the shared base, on top."""
    return Overlay.on(base, own, provided).compose(base)


def test_overlay_checks_own_resources_against_the_base_and_refuses_shadowing() -> None:
    base = Snapshot.build(shared(), provided=secret_refs())
    view = view_of(base, own_listener(), secret_refs())
    assert set(view.of_type(ResourceType.LISTENER).resources) == {"inbound"}
    assert view.of_type(ResourceType.CLUSTER).resources["backend"] is base.of_type(ResourceType.CLUSTER).resources[
        "backend"
    ]
    with pytest.raises(InconsistentSnapshot, match="LDS 'inbound' references RDS 'elsewhere'"):
        view_of(base, [r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", 1, "elsewhere"))])
    with pytest.raises(InconsistentSnapshot, match="EDS resource 'backend' is defined twice"):
        view_of(base, [r.cluster_load_assignment("backend", [])])


def test_an_unchanged_overlay_is_rechecked_only_where_the_base_changed() -> None:
    base = Snapshot.build(shared(8080), provided=secret_refs())
    own = own_listener() + [r.cluster(r.ClusterSpec("local")), r.cluster_load_assignment("local", [])]
    overlay = Overlay.on(base, own, secret_refs())
    assert overlay.holds(own, secret_refs()) and not overlay.holds(own[:1], secret_refs())
    view = overlay.compose(base)
    moved = Snapshot.build(shared(9090), previous=base, provided=secret_refs())
    assert overlay.recheck(moved, base)
    recomposed = overlay.compose(moved)
    assert recomposed.of_type(ResourceType.LISTENER).resources["inbound"] is own[0]
    assert recomposed.of_type(ResourceType.ENDPOINT).resources["backend"] is moved.of_type(
        ResourceType.ENDPOINT
    ).resources["backend"]
    assert recomposed.of_type(ResourceType.ENDPOINT).changed_since(view.of_type(ResourceType.ENDPOINT)) == {"backend"}
    check_consistency(  # the cheap checks agree with the full one
        recomposed.fill_provided(
            ResourceType.SECRET,
            TypeResources.of([r.tls_certificate_secret("default", b"c", b"k"), r.validation_context_secret("ROOTCA", b"b")]),
        )
    )
    # the base drops the route the identity's listener needs
    no_routes = Snapshot.build(
        [res for res in shared(9090) if res.type is not ResourceType.ROUTE], previous=moved, provided=secret_refs()
    )
    with pytest.raises(InconsistentSnapshot, match="LDS 'inbound' references RDS 'routes'"):
        overlay.recheck(no_routes, moved)
    # the base starts defining a name the identity has too
    clash = Snapshot.build(
        shared(9090) + [r.cluster(r.ClusterSpec("local")), r.cluster_load_assignment("local", [])],
        previous=moved,
        provided=secret_refs(),
    )
    with pytest.raises(InconsistentSnapshot, match="defined twice"):
        overlay.recheck(clash, moved)
    # a base built without knowing the checked one: what changed is unknown
    assert not overlay.recheck(Snapshot.build(shared(7070), provided=secret_refs()), moved)


def test_the_full_check_these_tests_compare_with_finds_dangling_references() -> None:
    base = Snapshot.build(shared(), provided=secret_refs())
    view = view_of(base, own_listener(), secret_refs())
    with pytest.raises(InconsistentSnapshot, match="references SDS 'ROOTCA'"):  # promised, not yet filled
        check_consistency(view)
    secrets = TypeResources.of([r.tls_certificate_secret("default", b"c", b"k"), r.validation_context_secret("ROOTCA", b"b")])
    check_consistency(view.fill_provided(ResourceType.SECRET, secrets))
    # made without the snapshot's own checks: the routes the listener needs are gone
    unchecked = Snapshot(MappingProxyType({**view.types, ResourceType.ROUTE: TypeResources.of([])}), view.layers)
    with pytest.raises(InconsistentSnapshot, match="LDS 'inbound' references RDS 'routes'"):
        check_consistency(unchecked.fill_provided(ResourceType.SECRET, secrets))


def test_fill_provided_checks_only_the_promised_names() -> None:
    base = Snapshot.build(shared(), provided=secret_refs())
    view = view_of(base, own_listener(), secret_refs())
    both = TypeResources.of([r.tls_certificate_secret("default", b"c", b"k"), r.validation_context_secret("ROOTCA", b"b")])
    filled = view.fill_provided(ResourceType.SECRET, both)
    check_consistency(filled)  # the full check agrees with the cheap one
    assert filled.of_type(ResourceType.SECRET) is both
    with pytest.raises(InconsistentSnapshot, match="SDS 'ROOTCA' was promised"):
        view.fill_provided(ResourceType.SECRET, TypeResources.of([r.tls_certificate_secret("default", b"c", b"k")]))
    with pytest.raises(ValueError, match="not empty"):
        filled.fill_provided(ResourceType.SECRET, both)


def test_incremental_checks_accept_and_refuse_exactly_what_full_checks_do() -> None:
    """Random edits (some leaving dangling references or clashing names): a rebuild from the last
    accepted state, checking only what changed, must decide like a check of everything."""
    import random

    rng = random.Random(11)
    refs = secret_refs()

    def shared_of(state: dict[str, object]) -> list[EncodedResource]:
        resources: list[EncodedResource] = []
        for name in sorted(state["clusters"]):  # type: ignore[arg-type]
            resources.append(r.cluster(r.ClusterSpec(name, upstream_tls=TLS)))
        for name, port in sorted(state["clas"].items()):  # type: ignore[attr-defined]
            resources.append(r.cluster_load_assignment(name, [("127.0.0.1", port)]))
        routes = tuple(r.RouteSpec(f"/{c}", ((c, 1),)) for c in sorted(state["routed"]))  # type: ignore[arg-type]
        if state["route_config"]:
            resources.append(r.route_configuration("routes", [r.VirtualHostSpec("all", routes=routes)]))
        return resources

    built: dict[tuple[object, ...], list[EncodedResource]] = {}

    def own_of(state: dict[str, object]) -> list[EncodedResource]:
        """The same objects for the same spec, as the mesh builder's memo gives: overlays are reused."""
        key = (state["listener_route"], state["local"])
        if key not in built:
            own = [r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", 15006, state["listener_route"], TLS))]  # type: ignore[arg-type]
            if state["local"]:
                own += [r.cluster(r.ClusterSpec(state["local"])), r.cluster_load_assignment(state["local"], [])]  # type: ignore[arg-type]
            built[key] = own
        return built[key]

    def decide(build: Callable[[], object]) -> bool:
        try:
            build()
        except InconsistentSnapshot:
            return False
        return True

    names = [f"c{i}" for i in range(6)]
    state: dict[str, object] = {
        "clusters": set(names[:3]),
        "clas": {n: 1 for n in names[:3]},
        "routed": set(names[:2]),
        "route_config": True,
        "listener_route": "routes",
        "local": "local",
    }
    accepted_shared = Snapshot.build(shared_of(state), provided=refs)
    accepted_overlay = Overlay.on(accepted_shared, own_of(state), refs)
    outcomes = {True: 0, False: 0}
    rechecked = 0
    for _ in range(300):
        edit = dict(state)
        edit["clusters"] = set(state["clusters"])  # type: ignore[arg-type]
        edit["clas"] = dict(state["clas"])  # type: ignore[arg-type]
        edit["routed"] = set(state["routed"])  # type: ignore[arg-type]
        choice, name = rng.randrange(8), rng.choice(names + ["local"])
        if choice == 0:
            edit["clusters"] ^= {name}  # type: ignore[operator]
        elif choice == 1:
            if name in edit["clas"]:  # type: ignore[operator]
                del edit["clas"][name]  # type: ignore[attr-defined]
            else:
                edit["clas"][name] = 2  # type: ignore[index]
        elif choice == 2:
            edit["clas"][name] = rng.randrange(1, 4)  # type: ignore[index]
        elif choice == 3:
            edit["routed"] ^= {name}  # type: ignore[operator]
        elif choice == 4:
            edit["route_config"] = not state["route_config"]
        elif choice == 5:
            edit["listener_route"] = rng.choice(["routes", "elsewhere"])
        elif choice == 6:
            edit["local"] = rng.choice(["", "local", "c0"])  # "c0" may clash with the shared cluster
        else:
            edit["clusters"] |= {name}  # type: ignore[operator]
            edit["clas"][name] = 3  # type: ignore[index]

        def full() -> object:
            return Overlay.on(Snapshot.build(shared_of(edit), provided=refs), own_of(edit), refs)

        def incremental() -> tuple[Snapshot, Overlay]:
            shared = Snapshot.build(shared_of(edit), previous=accepted_shared, provided=refs)
            own = own_of(edit)
            if accepted_overlay.holds(own, refs):
                nonlocal rechecked
                rechecked += 1
                if accepted_overlay.recheck(shared, accepted_shared):
                    return shared, accepted_overlay
            return shared, Overlay.on(shared, own, refs)

        expected = decide(full)
        assert decide(incremental) == expected, edit
        outcomes[expected] += 1
        if expected:
            accepted_shared, accepted_overlay = incremental()
            state = edit
            check_consistency(
                accepted_overlay.compose(accepted_shared).fill_provided(
                    ResourceType.SECRET,
                    TypeResources.of(
                        [r.tls_certificate_secret("default", b"c", b"k"), r.validation_context_secret("ROOTCA", b"b")]
                    ),
                )
            )
    assert outcomes[True] > 50 and outcomes[False] > 50  # both kinds of edit were exercised
    assert rechecked > 100  # and the unchanged overlay was re-checked, not rebuilt
