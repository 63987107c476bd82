"""The mesh model: a good file parses into the expected values; every bad file names file, field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshca.dev.harness import TRUST_DOMAIN as DEMO_TRUST_DOMAIN
from meshca.dev.harness import Ports, mesh_config
from meshca.fields import ConfigError
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import (
    AllowRule,
    HttpRoute,
    Inbound,
    Outbound,
    RouteTarget,
    load_mesh_config,
    parse_mesh_config,
)

GOOD = """\
trust_domain: mesh.test
services:
  backend:
    namespace: shop
    inbound:
      port: 15006
      app: 127.0.0.1:8080
      listen_address: 127.0.0.1
    allow:
      - spiffe://mesh.test/ns/shop/sa/frontend
      - namespace:ops
      - "*"
  backend-v2:
    namespace: shop
    service_account: backend-canary
    inbound:
      port: 15007
      app: "[::1]:8081"
    endpoints: [10.0.0.5:15007, "[fd00::6]:15007"]
  frontend:
    namespace: shop
    outbound:
      port: 15001
routes:
  - prefix: /v2
    split:
      backend: 1
      backend-v2: 3
  - prefix: /
    to: backend
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return path


def test_good_config_parses_into_the_model(tmp_path: Path) -> None:
    config = load_mesh_config(write(tmp_path, GOOD))
    assert config.trust_domain == "mesh.test"
    assert [s.name for s in config.services] == ["backend", "backend-v2", "frontend"]

    backend = config.service("backend")
    assert backend is not None
    assert (backend.namespace, backend.service_account) == ("shop", "backend")  # account defaults to the name
    assert backend.spiffe_id == SpiffeId("mesh.test", "/ns/shop/sa/backend")
    assert backend.inbound == Inbound(port=15006, app_host="127.0.0.1", app_port=8080, listen_address="127.0.0.1")
    assert backend.outbound is None
    assert backend.endpoints == (("127.0.0.1", 15006),)  # default: the sidecar's inbound port on loopback
    assert backend.allow == (
        AllowRule(spiffe_id=SpiffeId.parse("spiffe://mesh.test/ns/shop/sa/frontend")),
        AllowRule(namespace="ops"),
        AllowRule(any_identity=True),
    )
    assert [rule.describe() for rule in backend.allow] == [
        "spiffe://mesh.test/ns/shop/sa/frontend",
        "namespace:ops",
        "*",
    ]

    canary = config.service("backend-v2")
    assert canary is not None
    assert canary.spiffe_id.uri == "spiffe://mesh.test/ns/shop/sa/backend-canary"
    assert canary.inbound == Inbound(port=15007, app_host="::1", app_port=8081, listen_address="0.0.0.0")
    assert canary.endpoints == (("10.0.0.5", 15007), ("fd00::6", 15007))
    assert canary.allow == ()

    frontend = config.service("frontend")
    assert frontend is not None
    assert frontend.inbound is None and frontend.endpoints == () and frontend.allow == ()
    assert frontend.outbound == Outbound(port=15001, listen_address="127.0.0.1")

    assert config.routes == (
        HttpRoute("/v2", (RouteTarget("backend", 1), RouteTarget("backend-v2", 3))),
        HttpRoute("/", (RouteTarget("backend", 1),)),
    )
    assert config.service("nope") is None


def test_routes_are_optional_and_the_demo_mesh_is_valid(tmp_path: Path) -> None:
    minimal = "trust_domain: t.d\nservices:\n  a:\n    namespace: n\n    outbound: {port: 1}\n"
    config = load_mesh_config(write(tmp_path, minimal))
    assert config.routes == () and config.services[0].spiffe_id.uri == "spiffe://t.d/ns/n/sa/a"

    demo = parse_mesh_config(tmp_path / "demo.yaml", mesh_config(Ports()))
    assert demo.trust_domain == DEMO_TRUST_DOMAIN
    backend = demo.service("backend")
    assert backend is not None and [rule.describe() for rule in backend.allow] == [
        f"spiffe://{DEMO_TRUST_DOMAIN}/ns/shop/sa/frontend"
    ]


# Each case: (text replaced in GOOD, replacement), the exact field path, a substring of the reason.
BAD_EDITS = (
    pytest.param(("routes:", "tracing: on\nroutes:"), "tracing", "unknown field", id="unknown-top-level"),
    pytest.param(("trust_domain: mesh.test", "trust_domain: Mesh Test"), "trust_domain", "trust domain 'Mesh Test'",
                 id="bad-trust-domain"),
    pytest.param(("trust_domain: mesh.test", "trust_domain: 42"), "trust_domain", "must be str, got int",
                 id="trust-domain-not-str"),
    pytest.param(("  frontend:", "  Front_End:"), "services.Front_End", "must be a DNS label", id="service-name"),
    pytest.param(("  frontend:\n    namespace: shop\n", "  frontend:\n"), "services.frontend.namespace",
                 "is required", id="missing-namespace"),
    pytest.param(("    namespace: shop\n    outbound:", "    namespace: Shop\n    outbound:"),
                 "services.frontend.namespace", "'Shop' must be a DNS label", id="namespace-not-dns-label"),
    pytest.param(("service_account: backend-canary", "service_account: backend.canary"),
                 "services.backend-v2.service_account", "must be a DNS label", id="bad-service-account"),
    pytest.param(("port: 15006", "port: 70000"), "services.backend.inbound.port", "70000 is not a port (1-65535)",
                 id="inbound-port-too-big"),
    pytest.param(("port: 15006", "port: 0"), "services.backend.inbound.port", "0 is not a port", id="inbound-port-0"),
    pytest.param(("port: 15006", "port: '15006'"), "services.backend.inbound.port", "must be int, got str",
                 id="inbound-port-str"),
    pytest.param(("port: 15006", "port: true"), "services.backend.inbound.port", "must be int, got bool",
                 id="inbound-port-bool"),
    pytest.param(("port: 15001", "port: 1.5"), "services.frontend.outbound.port", "must be int, got float",
                 id="outbound-port-float"),
    pytest.param(("app: 127.0.0.1:8080", "app: localhost"), "services.backend.inbound.app", "is not host:port",
                 id="inbound-app-no-port"),
    pytest.param(("app: 127.0.0.1:8080", "app: 127.0.0.1:0"), "services.backend.inbound.app", "port 0",
                 id="inbound-app-port-0"),
    pytest.param(("app: 127.0.0.1:8080", "app: 8080"), "services.backend.inbound.app", "must be str, got int",
                 id="inbound-app-int"),
    pytest.param(("      app: 127.0.0.1:8080\n", "      app: 127.0.0.1:8080\n      protocol: http2\n"),
                 "services.backend.inbound.protocol", "unknown field", id="unknown-field-in-inbound"),
    pytest.param(("      port: 15001\n", "      port: 15001\n      app: x:1\n"),
                 "services.frontend.outbound.app", "unknown field", id="unknown-field-in-outbound"),
    pytest.param(("    outbound:\n      port: 15001\n", "    outbound:\n      port: 15001\n    replicas: 2\n"),
                 "services.frontend.replicas", "unknown field", id="unknown-field-in-service"),
    pytest.param(("      port: 15001\n", "      port: 15001\n    endpoints: [10.0.0.1:15006]\n"),
                 "services.frontend.endpoints", "without 'inbound' cannot have endpoints", id="endpoints-no-inbound"),
    pytest.param(("endpoints: [10.0.0.5:15007, \"[fd00::6]:15007\"]", "endpoints: [10.0.0.5:15007, nowhere]"),
                 "services.backend-v2.endpoints[1]", "is not host:port", id="endpoint-not-host-port"),
    pytest.param(("      - namespace:ops", "      - frontend"), "services.backend.allow[1]",
                 "must be a SPIFFE ID, 'namespace:<ns>' or '*'", id="allow-unknown-form"),
    pytest.param(("      - namespace:ops", "      - 7"), "services.backend.allow[1]",
                 "must be a SPIFFE ID, 'namespace:<ns>' or '*'", id="allow-not-a-string"),
    pytest.param(("      - namespace:ops", "      - namespace:Ops"), "services.backend.allow[1]",
                 "must be a DNS label", id="allow-bad-namespace"),
    pytest.param(("spiffe://mesh.test/ns/shop/sa/frontend", "spiffe://other.test/ns/shop/sa/frontend"),
                 "services.backend.allow[0]", "is not in trust domain 'mesh.test'", id="allow-foreign-trust-domain"),
    pytest.param(("spiffe://mesh.test/ns/shop/sa/frontend", "spiffe://mesh.test/ns//sa/frontend"),
                 "services.backend.allow[0]", "path segment", id="allow-malformed-spiffe-id"),
    pytest.param(("      port: 15001\n", "      port: 15001\n    allow: ['*']\n"),
                 "services.frontend.allow", "only a service with 'inbound' accepts callers", id="allow-no-inbound"),
    pytest.param(("    outbound:\n      port: 15001\n", "    service_account: web\n"), "services.frontend",
                 "needs 'inbound' (it serves), 'outbound' (it calls others) or both",
                 id="neither-inbound-nor-outbound"),
    pytest.param(("  frontend:\n    namespace: shop\n    outbound:\n      port: 15001\n", "  frontend: yes\n"),
                 "services.frontend", "must be a mapping", id="service-not-a-mapping"),
    pytest.param(("  - prefix: /v2", "  - prefix: v2"), "routes[0].prefix", "'v2' must start with '/'",
                 id="route-prefix-no-slash"),
    pytest.param(("  - prefix: /\n", "  - prefix: /\n    split: {backend: 1}\n"), "routes[1]",
                 "needs exactly one of 'to' (a service) or 'split'", id="route-to-and-split"),
    pytest.param(("  - prefix: /\n    to: backend\n", "  - prefix: /\n"), "routes[1]",
                 "needs exactly one of 'to' (a service) or 'split'", id="route-neither-to-nor-split"),
    pytest.param(("    to: backend", "    to: payments"), "routes[1].to",
                 "unknown service 'payments' (known: backend, backend-v2, frontend)", id="route-to-unknown-service"),
    pytest.param(("      backend-v2: 3", "      payments: 3"), "routes[0].split.payments",
                 "unknown service 'payments' (known: backend, backend-v2, frontend)", id="split-unknown-service"),
    pytest.param(("    to: backend", "    to: frontend"), "routes[1].to",
                 "service 'frontend' has no 'inbound': nothing to call", id="route-to-service-without-inbound"),
    pytest.param(("      backend-v2: 3", "      backend-v2: -3"), "routes[0].split.backend-v2",
                 "weight -3 must be an integer >= 0", id="split-weight-negative"),
    pytest.param(("      backend-v2: 3", "      backend-v2: '3'"), "routes[0].split.backend-v2",
                 "weight '3' must be an integer >= 0", id="split-weight-str"),
    pytest.param(("      backend-v2: 3", "      backend-v2: 0.5"), "routes[0].split.backend-v2",
                 "weight 0.5 must be an integer >= 0", id="split-weight-float"),
    pytest.param(("      backend-v2: 3", "      backend-v2: true"), "routes[0].split.backend-v2",
                 "weight True must be an integer >= 0", id="split-weight-bool"),
    pytest.param(("      backend: 1\n      backend-v2: 3", "      backend: 0\n      backend-v2: 0"), "routes[0].split",
                 "weights must not all be 0", id="split-all-zero"),
    pytest.param(("    split:\n      backend: 1\n      backend-v2: 3", "    split: {}"), "routes[0].split",
                 "must name at least one service", id="split-empty"),
    pytest.param(("  - prefix: /\n    to: backend\n", "  - /\n"), "routes[1]", "must be a mapping",
                 id="route-not-a-mapping"),
    pytest.param(("    to: backend", "    to: backend\n    timeout: 5s"), "routes[1].timeout", "unknown field",
                 id="unknown-field-in-route"),
    # Same identity (backend-v2's account is reused by a new service) on the same port: one sidecar, two listeners.
    pytest.param(("  frontend:\n", "  canary-client:\n    namespace: shop\n    service_account: backend-canary\n"
                  "    outbound: {port: 15007}\n  frontend:\n"), "services.canary-client.outbound.port",
                 "port 15007 is already used by backend-v2.inbound", id="duplicate-port-same-identity"),
    pytest.param(("    outbound:\n      port: 15001\n", "    outbound:\n      port: 15001\n    inbound:\n"
                  "      port: 15001\n      app: 127.0.0.1:9000\n"), "services.frontend.outbound.port",
                 "port 15001 is already used by frontend.inbound", id="duplicate-port-same-service"),
)


@pytest.mark.parametrize("edit, field, reason", BAD_EDITS)
def test_bad_config_names_file_field_and_reason(tmp_path: Path, edit: tuple[str, str], field: str, reason: str) -> None:
    old, new = edit
    assert GOOD.count(old) == 1, f"test edit {old!r} must match GOOD exactly once"
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_mesh_config(path)
    error = caught.value
    assert error.field == field
    assert reason in error.reason
    assert error.path == str(path)
    assert str(error).startswith(f"{path}: {field}: ")


def test_empty_endpoints_means_only_registered_ones(tmp_path: Path) -> None:
    """`endpoints: []`: a service whose endpoints all register themselves (meshca.mesh.endpoints)."""
    text = GOOD.replace("endpoints: [10.0.0.5:15007, \"[fd00::6]:15007\"]", "endpoints: []")
    config = load_mesh_config(write(tmp_path, text))
    canary = config.service("backend-v2")
    assert canary is not None and canary.inbound is not None and canary.endpoints == ()


def test_same_port_on_different_identities_is_fine(tmp_path: Path) -> None:
    """Two sidecars (two identities) may both listen on 15001: the port check is per identity."""
    text = GOOD.replace("  frontend:\n", "  admin:\n    namespace: ops\n    outbound: {port: 15001}\n  frontend:\n")
    config = load_mesh_config(write(tmp_path, text))
    ports = [s.outbound.port for s in config.services if s.outbound is not None]
    assert ports == [15001, 15001]


@pytest.mark.parametrize(
    "text, reason",
    [
        pytest.param("trust_domain: [unclosed\n", "invalid YAML", id="invalid-yaml"),
        pytest.param("- trust_domain: mesh.test\n- services: {}\n", "must be a YAML mapping", id="yaml-list"),
        pytest.param("", "must be a YAML mapping", id="empty-file"),
    ],
)
def test_unparsable_files_name_the_file(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_mesh_config(path)
    assert caught.value.field == ""
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: {reason}")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_mesh_config(path)
    assert caught.value.field == ""
    assert "cannot read" in caught.value.reason and "No such file" in caught.value.reason
    assert str(caught.value).startswith(f"{path}: cannot read")


@pytest.mark.parametrize(
    "text, field, reason",
    [
        ("services: {}\n", "trust_domain", "is required"),
        ("trust_domain: mesh.test\n", "services", "is required"),
        ("trust_domain: mesh.test\nservices: [backend]\n", "services", "must be Mapping, got list"),
        ("trust_domain: mesh.test\nservices: {}\nroutes: {prefix: /}\n", "routes", "must be list, got dict"),
    ],
)
def test_top_level_fields(tmp_path: Path, text: str, field: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_mesh_config(path)
    assert (caught.value.field, caught.value.reason) == (field, reason)
    assert str(caught.value) == f"{path}: {field}: {reason}"


def test_parse_mesh_config_accepts_an_already_loaded_mapping(tmp_path: Path) -> None:
    data = yaml.safe_load(GOOD)
    path = tmp_path / "from-etcd"
    assert parse_mesh_config(path, data) == load_mesh_config(write(tmp_path, GOOD))
    data["services"]["backend"]["inbound"]["port"] = 99999
    with pytest.raises(ConfigError, match=r"from-etcd: services\.backend\.inbound\.port: 99999 is not a port"):
        parse_mesh_config(path, data)


def doc_example(heading: str) -> str:
    """The ```yaml block of docs/configuration.md whose first line starts with `heading`."""
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    blocks = [block.split("```", 1)[0] for block in doc.split("```yaml\n")[1:]]
    [block] = [block for block in blocks if block.startswith(heading)]
    return block


def test_the_documented_examples_are_valid(tmp_path: Path) -> None:
    """docs/configuration.md's complete examples load as they are, against `meshca dev init` material."""
    from meshca.ca.internal import CertificateAuthority
    from meshca.clock import system_clock
    from meshca.config import load_serve_settings, read_state_dir
    from meshca.dev.material import create_dev_material

    material = create_dev_material(tmp_path, "mesh.local", system_clock)
    material.serve_config.write_text(doc_example("# meshca.yaml"))
    (tmp_path / "mesh.yaml").write_text(doc_example("# mesh.yaml"))
    ca = CertificateAuthority.load(read_state_dir(material.serve_config), system_clock)
    settings = load_serve_settings(material.serve_config, ca.trust_domain)
    assert settings.mesh_file == (tmp_path / "mesh.yaml").resolve() and settings.metrics_port == 15014
    mesh = load_mesh_config(settings.mesh_file)
    assert mesh.trust_domain == ca.trust_domain
    assert [s.name for s in mesh.services] == ["backend", "backend-v2", "frontend", "intruder"]
    assert [r.prefix for r in mesh.routes] == ["/v2", "/"]


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "trust_domain: mesh.test\nservices:\n"
        "  backend: {namespace: shop, inbound: {port: 15001, app: '127.0.0.1:9001'}}\n"
        "  backend: {namespace: shop, inbound: {port: 15002, app: '127.0.0.1:9002'}}\n"
    )
    with pytest.raises(ConfigError, match="'backend' is given twice"):
        load_mesh_config(path)


def test_listen_address_must_be_an_ip(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "trust_domain: mesh.test\nservices:\n"
        "  backend: {namespace: shop, inbound: {port: 15001, app: '127.0.0.1:9001', listen_address: nowhere}}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_mesh_config(path)
    assert error.value.field == "services.backend.inbound.listen_address"
    assert "not an IP address" in error.value.reason
