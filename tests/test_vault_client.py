"""Vault client layer against a real OpenBao dev server: setup, policy, logins, renewal, re-login, outages."""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests
from fakes import FakeClock

from meshca.ca import crypto
from meshca.ca.vault.session import (
    AppRoleAuth,
    JwtAuth,
    KubernetesAuth,
    TokenAuth,
    VaultDenied,
    VaultError,
    VaultSession,
    VaultSettings,
    VaultUnavailable,
    parse_vault_settings,
    renewal_due,
    vault_error_from,
)
from meshca.ca.vault.setup import (
    add_vault_parser,
    policy_text,
    setup_approle,
    setup_jwt_auth,
    setup_pki,
)
from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port
from meshca.dev.openbao_process import OpenBaoProcess
from meshca.dev.tokens import DEV_AUDIENCE, DEV_ISSUER, mint_token, write_dev_issuer
from meshca.fields import ConfigError, FieldReader

TD = "mesh.test"
LOG = logging.getLogger("meshca.ca.vault.session.test")


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoProcess]:
    with OpenBaoProcess() as server:
        yield server


@pytest.fixture(scope="module")
def root(bao: OpenBaoProcess) -> hvac.Client:
    client = bao.root_client()
    setup_pki(client, trust_domain=TD, mode="vault-leaf", max_leaf_ttl=timedelta(hours=2))
    return client


def approle(root: hvac.Client, name: str, ttl: float, max_ttl: float, policies: tuple[str, ...] = ("meshca",)) -> AppRoleAuth:
    creds = setup_approle(
        root, role_name=name, policies=policies,
        token_ttl=timedelta(seconds=ttl), token_max_ttl=timedelta(seconds=max_ttl),
    )
    return AppRoleAuth(role_id=creds.role_id, secret_id=creds.secret_id)


def session(bao: OpenBaoProcess, auth: Any, clock: Any = system_clock, **settings: Any) -> VaultSession:
    return VaultSession(VaultSettings(address=bao.address, auth=auth, **settings), clock, LOG)


def leaf_csr(spiffe_id: str) -> str:
    return crypto.build_csr_pem(crypto.generate_private_key_pem(), uris=[spiffe_id]).decode()


def sign(client: hvac.Client, spiffe_id: str) -> dict[str, Any]:
    data = {"csr": leaf_csr(spiffe_id), "uri_sans": spiffe_id, "ttl": "10m"}
    return dict(client.write_data("pki/sign/meshca", data=data)["data"])


# -- pure functions --------------------------------------------------------------------------


def test_renewal_due_below_a_third_of_the_ttl() -> None:
    now = datetime(2026, 11, 1, tzinfo=timezone.utc)
    ttl = timedelta(seconds=30)
    assert not renewal_due(now, now + timedelta(seconds=11), ttl)
    assert renewal_due(now, now + timedelta(seconds=9), ttl)
    assert renewal_due(now, now - timedelta(seconds=1), ttl)


def test_error_mapping_of_hvac_and_requests_exceptions() -> None:
    url = "http://127.0.0.1:8200/v1/pki/sign/meshca"
    cases = [
        (hvac.exceptions.VaultDown("Vault is sealed", method="post", url=url), VaultUnavailable, 503),
        (hvac.exceptions.InternalServerError(errors=["boom"], method="post", url=url), VaultUnavailable, 500),
        (hvac.exceptions.BadGateway(errors=["bad"], method="post", url=url), VaultUnavailable, 502),
        (hvac.exceptions.Forbidden(errors=["permission denied"], method="post", url=url), VaultDenied, 403),
        (hvac.exceptions.Unauthorized(errors=["nope"], method="post", url=url), VaultDenied, 401),
        (hvac.exceptions.InvalidRequest(errors=["URI SANs not allowed by role"], method="post", url=url), VaultError, 400),
    ]
    for error, kind, status in cases:
        mapped = vault_error_from(error, "sign")
        assert type(mapped) is kind and mapped.status == status and mapped.path == "pki/sign/meshca"
        assert str(mapped).startswith("POST pki/sign/meshca: ")
    mapped = vault_error_from(
        hvac.exceptions.InvalidRequest(errors=["1 error occurred:\n\t* unsupported operation\n\n"], method="get", url=url),
        "x",
    )
    assert str(mapped) == "GET pki/sign/meshca: unsupported operation"
    scrubbed = vault_error_from(
        hvac.exceptions.InvalidRequest(errors=["bad token s.SECRETVALUE"], method="post", url=url), "x", ["s.SECRETVALUE"]
    )
    assert "SECRETVALUE" not in str(scrubbed) and "[redacted]" in str(scrubbed)
    request = requests.Request("GET", "http://127.0.0.1:1/v1/sys/health").prepare()
    refused = requests.exceptions.ConnectionError("... [Errno 111] Connection refused", request=request)
    mapped = vault_error_from(refused, "health")
    assert isinstance(mapped, VaultUnavailable) and mapped.status is None
    assert str(mapped) == "GET sys/health: Vault at http://127.0.0.1:1 unreachable: connection refused"
    assert vault_error_from(KeyError("x"), "x") is None


def test_auth_values_validate_and_hide_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TokenAuth()
    with pytest.raises(ValueError, match="exactly one"):
        TokenAuth(token="t", token_file=tmp_path / "t")
    with pytest.raises(ValueError, match="exactly one"):
        AppRoleAuth(role_id="r")
    with pytest.raises(ValueError, match="mount"):
        JwtAuth(role="r", token_file=tmp_path, mount="/jwt/")
    assert "hunter2" not in repr(TokenAuth(token="hunter2"))
    assert "hunter2" not in repr(AppRoleAuth(role_id="r", secret_id="hunter2"))
    assert KubernetesAuth(role="r").token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    with pytest.raises(ValueError, match="http"):
        VaultSettings(address="vault:8200", auth=TokenAuth(token="t"))


def test_parse_vault_settings_from_yaml_mapping(tmp_path: Path) -> None:
    path = tmp_path / "meshca.yaml"
    data = {
        "address": "https://vault.example:8200",
        "namespace": "team-a",
        "timeout": "2s",
        "max_backoff": "20s",
        "mode": "vault-leaf",
        "auth": {"method": "approle", "role_id": "rid", "secret_id_file": "secret-id"},
    }
    settings = parse_vault_settings(FieldReader(path, data, "vault."), extra_known={"mode"})
    assert settings.auth == AppRoleAuth(role_id="rid", secret_id_file=tmp_path / "secret-id")
    assert (settings.timeout, settings.max_backoff, settings.namespace) == (2.0, timedelta(seconds=20), "team-a")
    k8s = parse_vault_settings(FieldReader(path, {"address": "http://v:8200", "auth": {"method": "kubernetes", "role": "m"}}))
    assert k8s.auth == KubernetesAuth(role="m")
    with pytest.raises(ConfigError, match=r"vault\.auth\.method: 'ldap' is not one of"):
        parse_vault_settings(FieldReader(path, {"address": "http://v", "auth": {"method": "ldap"}}, "vault."))
    with pytest.raises(ConfigError, match=r"vault\.auth\.secret_id: unknown field"):
        parse_vault_settings(
            FieldReader(path, {"address": "http://v", "auth": {"method": "approle", "role_id": "r", "secret_id": "s"}}, "vault.")
        )


def test_policy_text_is_least_privilege_per_mode() -> None:
    leaf = policy_text("vault-leaf", mount="pki", role="meshca")
    assert 'path "pki/sign/meshca" {\n  capabilities = ["update"]\n}' in leaf
    assert "sign-intermediate" not in leaf
    intermediate = policy_text("vault-intermediate", mount="pki_int", role="meshca")
    assert 'path "pki_int/root/sign-intermediate" {\n  capabilities = ["update"]\n}' in intermediate
    assert "/sign/" not in intermediate
    for text in (leaf, intermediate):
        assert text.count("path ") == 5
        assert '"auth/token/renew-self" {\n  capabilities = ["update"]' in text
        assert '"auth/token/lookup-self" {\n  capabilities = ["read"]' in text
        assert "sudo" not in text and '"*"' not in text and "sys/" not in text
    with pytest.raises(ValueError):
        policy_text("vault-everything")  # type: ignore[arg-type]


# -- setup against the real server -----------------------------------------------------------


def test_setup_pki_is_idempotent(root: hvac.Client) -> None:
    again = setup_pki(root, trust_domain=TD, mode="vault-leaf", max_leaf_ttl=timedelta(hours=2))
    assert [a.outcome for a in again.actions] == ["unchanged"] * 4 and not again.changed
    info = crypto.parse_certificate_pem(again.root_certificate_pem.encode())
    assert info.subject == f"CN={TD} root (Vault)" and info.uris == (f"spiffe://{TD}",) and info.is_ca
    role = root.read("pki/roles/meshca")["data"]
    assert role["allowed_uri_sans"] == [f"spiffe://{TD}/*"]
    assert (role["no_store"], role["allow_any_name"], role["enforce_hostnames"], role["require_cn"]) == (True, False, False, False)
    # any key type (meshca's CSR policy decides: EC P-256/P-384, RSA 2048-8192); leaves carry CA:FALSE (SPIFFE)
    assert (role["key_type"], role["key_bits"], role["server_flag"], role["client_flag"]) == ("any", 0, True, True)
    assert role["basic_constraints_valid_for_non_ca"] is True
    assert (role["use_csr_common_name"], role["use_csr_sans"], role["allowed_uri_sans_template"]) == (False, False, False)
    assert role["max_ttl"] == 7200
    changed = setup_pki(root, trust_domain=TD, mode="vault-leaf", max_leaf_ttl=timedelta(hours=3))
    assert [a.outcome for a in changed.actions] == ["unchanged", "unchanged", "updated", "unchanged"]
    setup_pki(root, trust_domain=TD, mode="vault-leaf", max_leaf_ttl=timedelta(hours=2))
    # a role written by an earlier meshca (EC only, no basicConstraints) is brought up to date by running setup again
    root.write_data("pki/roles/meshca", data={"key_type": "ec", "key_bits": 256, "basic_constraints_valid_for_non_ca": False})
    upgraded = setup_pki(root, trust_domain=TD, mode="vault-leaf", max_leaf_ttl=timedelta(hours=2))
    assert [a.outcome for a in upgraded.actions] == ["unchanged", "unchanged", "updated", "unchanged"]
    role = root.read("pki/roles/meshca")["data"]
    assert (role["key_type"], role["basic_constraints_valid_for_non_ca"]) == ("any", True)


def test_policy_allows_signing_and_nothing_more(root: hvac.Client, bao: OpenBaoProcess) -> None:
    token = root.auth.token.create(policies=["meshca"], no_default_policy=True, ttl="10m")["auth"]["client_token"]
    limited = session(bao, TokenAuth(token=token))
    issued = limited.call(lambda c: sign(c, f"spiffe://{TD}/ns/shop/sa/web"), "sign leaf")
    assert crypto.parse_certificate_pem(issued["certificate"].encode()).uris == (f"spiffe://{TD}/ns/shop/sa/web",)
    with pytest.raises(VaultError) as outside:
        limited.call(lambda c: sign(c, "spiffe://evil.test/ns/shop/sa/web"), "sign leaf")
    assert type(outside.value) is VaultError and outside.value.status == 400
    assert str(outside.value).startswith("POST pki/sign/meshca: ") and "not valid for this role" in str(outside.value)
    # The identity comes from uri_sans (meshca's verified identity); a SAN smuggled into the CSR is ignored.
    smuggled = crypto.build_csr_pem(crypto.generate_private_key_pem(), uris=["spiffe://evil.test/x"]).decode()
    answer = limited.call(
        lambda c: c.write_data("pki/sign/meshca", data={"csr": smuggled, "uri_sans": f"spiffe://{TD}/ns/a/sa/b"}), "sign"
    )
    assert crypto.parse_certificate_pem(answer["data"]["certificate"].encode()).uris == (f"spiffe://{TD}/ns/a/sa/b",)
    for operation, path in [
        (lambda c: c.sys.list_mounted_secrets_engines(), "sys/mounts"),
        (lambda c: c.write_data("pki/root/generate/internal", data={"common_name": "x"}), "pki/root/generate/internal"),
        (lambda c: c.write_data("pki/root/sign-intermediate", data={"csr": "x"}), "pki/root/sign-intermediate"),
        (lambda c: c.read("pki/roles/meshca"), "pki/roles/meshca"),
    ]:
        with pytest.raises(VaultDenied) as denied:
            limited.call(operation, f"forbidden {path}")
        assert denied.value.path == path and denied.value.status == 403 and "permission denied" in str(denied.value)
        assert token not in str(denied.value)
    chain = limited.call(lambda c: c.read("pki/cert/ca_chain"), "ca chain")
    assert "BEGIN CERTIFICATE" in chain["data"]["certificate"]
    limited.call(lambda c: c.auth.token.renew_self(), "renew-self")

    result = setup_pki(root, trust_domain=TD, mode="vault-intermediate", policy="meshca-int")
    assert [a.outcome for a in result.actions][:2] == ["unchanged", "unchanged"]
    int_token = root.auth.token.create(policies=["meshca-int"], no_default_policy=True, ttl="10m")["auth"]["client_token"]
    intermediate = session(bao, TokenAuth(token=int_token))
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem(), uris=[f"spiffe://{TD}"], is_ca=True).decode()
    signed = intermediate.call(
        lambda c: c.write_data("pki/root/sign-intermediate", data={"csr": csr, "ttl": "1h", "common_name": "i"}),
        "sign intermediate",
    )
    assert crypto.parse_certificate_pem(signed["data"]["certificate"].encode()).is_ca
    with pytest.raises(VaultDenied, match=r"^POST pki/sign/meshca: permission denied$"):
        intermediate.call(lambda c: sign(c, f"spiffe://{TD}/ns/a/sa/b"), "sign leaf")


# -- logins ----------------------------------------------------------------------------------


def test_token_auth_from_file_root_token_is_left_alone(bao: OpenBaoProcess, root: hvac.Client, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(bao.root_token + "\n")
    s = session(bao, TokenAuth(token_file=token_file))
    assert s.client().auth.token.lookup_self()["data"]["policies"] == ["root"]
    s.maintain()
    status = s.status()
    assert (status.authenticated, status.auth_method, status.token_expires_at) == (True, "token", None)
    assert (status.logins_total, status.renewals_total, status.renewable) == (1, 0, False)
    child = root.auth.token.create(policies=["meshca"], ttl="10m")["auth"]["client_token"]
    token_file.write_text(child)  # e.g. Vault Agent wrote a new token: picked up by the next maintain()
    s.maintain()
    assert s.client().token == child and s.status().logins_total == 2 and s.status().renewable
    assert s.status().token_expires_at is not None

    bad = session(bao, TokenAuth(token="s.not-a-real-token"))
    with pytest.raises(VaultDenied) as denied:
        bad.client()
    assert str(denied.value) == "GET auth/token/lookup-self: permission denied"
    assert bad.status().consecutive_failures == 1 and bad.status().last_error == str(denied.value)


def test_approle_login_and_wrong_secret(bao: OpenBaoProcess, root: hvac.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = approle(root, "login-test", ttl=300, max_ttl=600)
    s = session(bao, auth)
    assert s.call(lambda c: c.auth.token.lookup_self()["data"]["meta"]["role_name"], "lookup") == "login-test"
    status = s.status()
    assert status.auth_method == "approle" and status.logins_total == 1 and status.renewable
    assert status.token_expires_at is not None
    assert timedelta(seconds=290) < status.token_expires_at - system_clock() <= timedelta(seconds=300)

    wrong = AppRoleAuth(role_id=auth.role_id, secret_id="00000000-wrong-secret-id")
    with pytest.raises(VaultDenied) as denied:
        session(bao, wrong).client()
    assert str(denied.value) == "POST auth/approle/login: invalid role or secret ID"
    token = s.client().token
    assert auth.secret_id and auth.secret_id not in caplog.text and token not in caplog.text
    assert "00000000-wrong-secret-id" not in caplog.text


def test_jwt_login_with_the_dev_issuer(bao: OpenBaoProcess, root: hvac.Client, tmp_path: Path) -> None:
    files = write_dev_issuer(tmp_path / "issuer")
    setup_jwt_auth(
        root,
        issuer_public_key_pem=files.public_key.read_bytes(),
        bound_issuer=DEV_ISSUER,
        bound_audiences=[DEV_AUDIENCE],
        role="meshca",
        policies=["meshca"],
        token_ttl=timedelta(seconds=120),
    )
    token_file = tmp_path / "jwt"
    key = files.signing_key.read_bytes()
    token_file.write_text(mint_token(key, namespace="meshca", service_account="meshca", now=system_clock()))
    s = session(bao, JwtAuth(role="meshca", token_file=token_file))
    lookup = s.call(lambda c: c.auth.token.lookup_self()["data"], "lookup")
    assert "meshca" in lookup["policies"] and lookup["meta"]["role"] == "meshca"
    assert s.status().auth_method == "jwt" and s.status().renewable
    issued = s.call(lambda c: sign(c, f"spiffe://{TD}/ns/a/sa/b"), "sign leaf")
    assert issued["certificate"].startswith("-----BEGIN CERTIFICATE-----")

    wrong_audience = mint_token(key, namespace="a", service_account="b", audience="someone-else", now=system_clock())
    token_file.write_text(wrong_audience)
    with pytest.raises(VaultDenied) as denied:
        session(bao, JwtAuth(role="meshca", token_file=token_file)).client()
    assert denied.value.path == "auth/jwt/login" and "audience" in denied.value.reason
    assert wrong_audience not in str(denied.value)
    with pytest.raises(VaultDenied, match=r"^POST auth/jwt/login: cannot read token file"):
        session(bao, JwtAuth(role="meshca", token_file=tmp_path / "missing")).client()


# -- token lifecycle -------------------------------------------------------------------------


def vault_expiry(s: VaultSession) -> datetime:
    """When Vault itself expires the session's token (lookup-self, on Vault's own clock)."""
    return datetime.fromisoformat(s.call(lambda c: c.auth.token.lookup_self()["data"]["expire_time"], "lookup"))


def test_maintain_renews_before_expiry(bao: OpenBaoProcess, root: hvac.Client) -> None:
    """When to renew is the session's decision on its clock (a fake one here, a maintain() every second
    of it); Vault shows that each renewal reached it by moving the token's expiry."""
    clock = FakeClock.at_real_now()
    s = session(bao, approle(root, "renew-test", ttl=5, max_ttl=60), clock)
    first_token = s.client().token
    expiries = [vault_expiry(s)]
    renewed_at = []
    for second in range(1, 11):  # ten seconds of a 5 s token
        clock.advance(1)
        renewals = s.status().renewals_total
        s.maintain()
        assert s.status().authenticated
        if s.status().renewals_total > renewals:
            renewed_at.append(second)
            expiries.append(vault_expiry(s))
    assert renewed_at == [4, 8]  # under a third of the 5 s left, not before
    assert expiries[0] < expiries[1] < expiries[2]
    status = s.status()
    assert status.renewals_total == 2 and status.logins_total == 1 and status.consecutive_failures == 0
    assert s.client().token == first_token
    assert s.call(lambda c: c.auth.token.lookup_self()["data"]["ttl"], "lookup") > 0


def test_relogin_when_the_token_was_revoked(bao: OpenBaoProcess, root: hvac.Client) -> None:
    s = session(bao, approle(root, "revoke-test", ttl=300, max_ttl=600))
    old = s.client().token
    root.auth.token.revoke(old)
    issued = s.call(lambda c: sign(c, f"spiffe://{TD}/ns/a/sa/revoked"), "sign leaf")
    assert issued["certificate"]
    assert s.status().logins_total == 2 and s.client().token != old

    # maintain() notices a revoked token when it tries to renew it, and logs in again too.
    clock = FakeClock.at_real_now()
    s2 = session(bao, approle(root, "revoke-test-2", ttl=300, max_ttl=600), clock)
    root.auth.token.revoke(s2.client().token)
    clock.advance(250)  # into the renewal window
    s2.maintain()
    assert (s2.status().logins_total, s2.status().renewals_total, s2.status().consecutive_failures) == (2, 0, 0)


@pytest.mark.e2e  # 8 s of real time
def test_relogin_when_renewal_hits_max_ttl(bao: OpenBaoProcess, root: hvac.Client) -> None:
    # Real time on purpose: Vault caps renewals by the token's age on its own clock, and the token in
    # use must stay valid at Vault all along.
    s = session(bao, approle(root, "maxttl-test", ttl=4, max_ttl=6))
    first = s.client().token
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        s.maintain()
        s.call(lambda c: c.auth.token.lookup_self(), "lookup")  # the token in use is always valid
        time.sleep(0.5)
    status = s.status()
    assert status.logins_total >= 2 and status.renewals_total >= 1 and status.consecutive_failures == 0
    assert s.client().token != first


# -- outages ---------------------------------------------------------------------------------


def test_unreachable_vault_is_unavailable(tmp_path: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    s = VaultSession(VaultSettings(address=address, auth=TokenAuth(token="t0ken-value"), timeout=1), system_clock, LOG)
    with pytest.raises(VaultUnavailable) as down:
        s.client()
    assert down.value.status is None and down.value.path == "auth/token/lookup-self"
    assert str(down.value).endswith("unreachable: connection refused") and "t0ken-value" not in str(down.value)


def test_paused_vault_times_out_and_maintain_backs_off_capped(
    bao: OpenBaoProcess, root: hvac.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock.at_real_now()
    auth = approle(root, "pause-test", ttl=60, max_ttl=600)
    s = session(bao, auth, clock, timeout=0.3, max_backoff=timedelta(seconds=4))
    s.client()
    bao.pause()
    try:
        started = time.monotonic()
        with pytest.raises(VaultUnavailable) as slow:
            s.call(lambda c: c.auth.token.lookup_self(), "lookup")
        assert time.monotonic() - started < 2.0
        assert slow.value.status is None and str(slow.value).startswith("GET auth/token/lookup-self: ")
        assert "timed out" in slow.value.reason

        clock.advance(41)  # 19 s left of 60: renewal due (under a third)
        delays = []
        for _ in range(5):
            s.maintain()
            status = s.status()
            assert status.next_attempt_at is not None
            delays.append((status.next_attempt_at - clock()).total_seconds())
            s.maintain()  # still backing off: no attempt, no extra failure
            assert s.status().consecutive_failures == status.consecutive_failures
            clock.now = status.next_attempt_at
        assert delays == [1, 2, 4, 4, 4]
        assert s.status().authenticated and s.status().consecutive_failures == 5

        clock.advance(10)  # past the token's expiry: never silent
        s.maintain()
        status = s.status()
        assert not status.authenticated and status.last_error and "timed out" in status.last_error
        assert "token expired" in caplog.text
    finally:
        bao.resume()
    clock.now = s.status().next_attempt_at or clock.now
    s.maintain()  # logs in again now that Vault answers
    status = s.status()
    assert status.authenticated and status.consecutive_failures == 0 and status.logins_total == 2
    assert status.last_error is None and status.failures_total == 6
    assert auth.secret_id and auth.secret_id not in caplog.text


def test_sealed_vault_is_unavailable_until_unsealed(bao: OpenBaoProcess, root: hvac.Client) -> None:
    s = session(bao, approle(root, "seal-test", ttl=300, max_ttl=600), timeout=2)
    s.client()
    bao.seal()
    try:
        with pytest.raises(VaultUnavailable) as sealed:
            s.call(lambda c: sign(c, f"spiffe://{TD}/ns/a/sa/sealed"), "sign leaf")
        assert sealed.value.status == 503 and str(sealed.value) == "POST pki/sign/meshca: Vault is sealed"
        assert s.status().last_error == str(sealed.value)
    finally:
        bao.unseal()
    assert s.call(lambda c: sign(c, f"spiffe://{TD}/ns/a/sa/sealed"), "sign leaf")["certificate"]
    assert s.status().logins_total == 1 and s.status().last_error is None
    log = bao.log_text()
    assert "Unseal Key: [redacted]" in log and bao.root_token not in log


# -- Kubernetes login, against a test double -------------------------------------------------


class RecordingVaultDouble:
    """Test double, not a Vault: a loopback HTTP server that records every request and answers
    a canned login (auth/<mount>/login) and lookup-self, so a login's request shape can be checked."""

    def __init__(self, issued_token: str = "s.double-issued-token") -> None:
        self.issued_token = issued_token
        self.requests: list[dict[str, Any]] = []
        double = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                double.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                if self.path.endswith("/login"):
                    reply = {"auth": {"client_token": double.issued_token, "lease_duration": 600, "renewable": True}}
                else:
                    reply = {"data": {"ttl": 600, "policies": ["meshca"]}}
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingVaultDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_kubernetes_login_request_shape(tmp_path: Path) -> None:
    sa_token = tmp_path / "sa-token"
    sa_token.write_text("eyJhbGciOiJSUzI1NiJ9.projected-sa-token.sig\n")
    with RecordingVaultDouble() as double:
        settings = VaultSettings(
            address=double.address,
            auth=KubernetesAuth(role="meshca", token_file=sa_token, mount="k8s-prod"),
            namespace="team-a",
        )
        s = VaultSession(settings, system_clock, LOG)
        s.call(lambda c: c.auth.token.lookup_self(), "lookup")
    login, lookup = double.requests
    assert (login["method"], login["path"]) == ("POST", "/v1/auth/k8s-prod/login")
    assert json.loads(login["body"]) == {"role": "meshca", "jwt": "eyJhbGciOiJSUzI1NiJ9.projected-sa-token.sig"}
    assert "X-Vault-Token" not in login["headers"] and login["headers"]["X-Vault-Namespace"] == "team-a"
    assert (lookup["path"], lookup["headers"]["X-Vault-Token"]) == ("/v1/auth/token/lookup-self", "s.double-issued-token")
    assert s.status().auth_method == "kubernetes" and s.status().logins_total == 1


# -- CLI -------------------------------------------------------------------------------------


def run_cli(argv: list[str], environ: dict[str, str]) -> int:
    from meshca.ca.vault.setup import cmd_vault_setup

    parser = argparse.ArgumentParser(prog="meshca")
    add_vault_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if args.handler is cmd_vault_setup:
        return int(cmd_vault_setup(args, environ))
    return int(args.handler(args))


def test_cli_vault_setup(bao: OpenBaoProcess, root: hvac.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(bao.root_token)
    argv = ["vault", "setup", "--address", bao.address, "--token-file", str(token_file), "--trust-domain", "cli.test",
            "--mode", "vault-leaf", "--mount", "pki-cli", "--policy", "meshca-cli", "--print-policy"]
    assert run_cli(argv, {}) == 0
    out = capsys.readouterr().out
    assert "created   mount pki-cli/" in out and "created   policy meshca-cli" in out
    assert "root: CN=cli.test root (Vault)" in out and 'path "pki-cli/sign/meshca"' in out
    assert run_cli(argv[:-1], {}) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged") == 4 and "created" not in out and "updated" not in out

    limited = root.auth.token.create(policies=["meshca"], no_default_policy=True, ttl="5m")["auth"]["client_token"]
    code = run_cli(["vault", "setup", "--trust-domain", "cli.test", "--mode", "vault-leaf"],
                   {"VAULT_ADDR": bao.address, "VAULT_TOKEN": limited})
    captured = capsys.readouterr()
    assert code == 2 and captured.err == "meshca: error: GET sys/mounts: permission denied\n"
    assert limited not in captured.err + captured.out
    assert run_cli(["vault", "setup", "--address", bao.address, "--trust-domain", "x", "--mode", "vault-leaf"], {}) == 2
    assert "no Vault token" in capsys.readouterr().err
    assert run_cli(["vault", "policy", "--mode", "vault-intermediate"], {}) == 0
    assert capsys.readouterr().out == policy_text("vault-intermediate")
