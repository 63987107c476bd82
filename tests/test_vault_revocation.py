"""Revocation in the Vault modes against a real OpenBao: Vault's CRLs fetched, refreshed and kept through an outage
(never an incomplete set), identities revoked, `meshca revoke` revoking in Vault what Vault signed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from etcd_store import connected
from fakes import FakeClock

from meshca.app import MeshcaApp, crl_publishing
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.revocation import StateDirRevocations
from meshca.ca.vault.crl import VaultCrls, VaultCrlSettings
from meshca.ca.vault.intermediate import VaultIntermediateCa
from meshca.ca.vault.leaf import VaultLeafCa, VaultLeafOptions
from meshca.ca.vault.session import TokenAuth, VaultSession, VaultSettings
from meshca.ca.vault.setup import policy_text, setup_pki
from meshca.cli.main import main
from meshca.clock import system_clock
from meshca.dev.etcd_process import EtcdProcess
from meshca.dev.openbao_process import OpenBaoProcess
from meshca.identity.spiffe import SpiffeId
from meshca.sds.workloads import IdentityRevoked
from meshca.store.revocation import EtcdRevocations

TD = "vrev.example"
FRONTEND = SpiffeId.for_service_account(TD, "shop", "frontend")
LOG = logging.getLogger("meshca.test.vault_revocation")
SETTINGS = CaSettings(TD, intermediate_ttl=timedelta(hours=1), leaf_ttl_default=timedelta(minutes=10),
                      leaf_ttl_min=timedelta(seconds=30), leaf_ttl_max=timedelta(minutes=20))
MODES = ("vault-intermediate", "vault-leaf")


class Bao:
    """The module's OpenBao: mount `pki` set up for both modes, a token per mode holding meshca's policy plus
    `pki/revoke` (what `meshca revoke --config` needs on top of serving)."""

    def __init__(self, server: OpenBaoProcess) -> None:
        self.server = server
        self.root = server.root_client()
        self.tokens: dict[str, str] = {}
        for mode in MODES:
            setup_pki(self.root, trust_domain=TD, mode=mode, policy=f"meshca-{mode}")  # type: ignore[arg-type]
            self.root.sys.create_or_update_acl_policy(
                f"revoker-{mode}", policy_text(mode) + 'path "pki/revoke" {\n  capabilities = ["update"]\n}\n'  # type: ignore[arg-type]
            )
            self.tokens[mode] = self.root.auth.token.create(policies=[f"revoker-{mode}"], ttl="2h")["auth"]["client_token"]

    def session(self, mode: str) -> VaultSession:
        return VaultSession(VaultSettings(self.server.address, TokenAuth(self.tokens[mode]), timeout=1.0),
                            system_clock, LOG.getChild("session"))

    def config(self, tmp_path: Path, mode: str) -> Path:
        """A `meshca serve` config of `mode` whose state dir is tmp_path/ca (token login from a file)."""
        (tmp_path / "token").write_text(self.tokens[mode])
        (tmp_path / "token").chmod(0o600)
        path = tmp_path / "meshca.yaml"
        path.write_text(yaml.safe_dump({
            "state_dir": "ca",
            "ca": {"mode": mode, "trust_domain": TD, "vault": {
                "address": self.server.address, "mount": "pki", "auth": {"method": "token", "token_file": "token"}}},
        }))
        return path


@pytest.fixture(scope="module")
def bao() -> Iterator[Bao]:
    with OpenBaoProcess() as server:
        yield Bao(server)


@pytest.fixture
def resumed(bao: Bao) -> Iterator[Bao]:
    yield bao
    if bao.server.paused:
        bao.server.resume()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def crls_by_issuer(pem: bytes, cas: list[bytes]) -> dict[bytes, crypto.CrlInfo]:
    """Each CA certificate of `cas` with the one CRL of `pem` it signed (a CA without one is missing)."""
    found: dict[bytes, crypto.CrlInfo] = {}
    for crl in crypto.split_pem_crls(pem):
        signers = [ca for ca in cas if crypto.crl_issued_by(crl, ca)]
        assert len(signers) == 1, "every CRL is signed by exactly one CA of the chain"
        assert signers[0] not in found, "one CRL per CA"
        found[signers[0]] = crypto.parse_crl_pem(crl)
    return found


def app_for(ca: VaultIntermediateCa | VaultLeafCa, state_dir: Path, session: VaultSession, clock: FakeClock,
            settings: VaultCrlSettings = VaultCrlSettings()) -> tuple[MeshcaApp, VaultCrls]:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    external = VaultCrls(session, ["pki"], ca.vault_crl_issuers, clock, LOG.getChild("vault-crl"), settings)
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(state_dir),  # type: ignore[arg-type]
                                                                    external=external))
    return app, external


def test_vault_intermediate_every_ca_has_a_crl_leaves_by_meshca_intermediates_by_vault(
    bao: Bao, tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bao.config(tmp_path, "vault-intermediate")
    ca = VaultIntermediateCa.init(tmp_path / "ca", SETTINGS, bao.session("vault-intermediate"), clock, logger=LOG)
    app, _ = app_for(ca, tmp_path / "ca", bao.session("vault-intermediate"), clock)
    assert app.revocations is not None
    root = ca.trust_bundle_pem()
    first = ca.intermediate_certificate_pem
    crls = crls_by_issuer(app.revocations.crls_pem, [root, first])
    assert set(crls) == {root, first}  # the root's CRL is Vault's, the intermediate's meshca's
    assert app.revocations.crls_pem in app.secrets.bundle_secrets()[0].payload

    leaf = ca.issue_workload(FRONTEND)
    (tmp_path / "leaf.pem").write_bytes(leaf.certificate_pem)
    code, out, err = run_cli(capsys, "revoke", "--certificate", str(tmp_path / "leaf.pem"), "--config", str(config))
    assert code == 0, err
    assert app.revocations.check()
    crls = crls_by_issuer(app.revocations.crls_pem, [root, first])
    assert [r.serial_number for r in crls[first].revoked] == [leaf.serial_number]

    # an old intermediate: Vault revokes it (its root's CRL is Vault's), the list tells every serve to re-read
    ca.rotate_intermediate(now=True)
    second = ca.intermediate_certificate_pem
    code, out, err = run_cli(capsys, "revoke", "--intermediate", crypto.parse_certificate_pem(first).fingerprint_sha256[:16],
                             "--reason", "keyCompromise", "--config", str(config))
    assert code == 0, err
    assert app.revocations.check()
    crls = crls_by_issuer(app.revocations.crls_pem, [root, first, second])
    assert set(crls) == {root, first, second}
    assert crypto.parse_certificate_pem(first).serial_number in {r.serial_number for r in crls[root].revoked}
    code, _, err = run_cli(capsys, "revoke", "--intermediate", ca.active_intermediate_id, "--config", str(config))
    assert code == 2 and "active intermediate" in err and err.count("\n") == 1


def test_vault_leaf_revoke_certificate_in_vault_and_its_crl_is_served(
    bao: Bao, tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bao.config(tmp_path, "vault-leaf")
    ca = VaultLeafCa(SETTINGS, bao.session("vault-leaf"), clock, LOG)
    app, _ = app_for(ca, tmp_path / "ca", bao.session("vault-leaf"), clock)
    assert app.revocations is not None
    root = ca.trust_bundle_pem()
    assert set(crls_by_issuer(app.revocations.crls_pem, [root])) == {root}
    held = app.secrets.renew(FRONTEND)
    (tmp_path / "leaf.pem").write_bytes(ca.issue_workload(FRONTEND).certificate_pem)
    revoked = crypto.parse_certificate_pem((tmp_path / "leaf.pem").read_bytes()).serial_number
    code, out, err = run_cli(capsys, "revoke", "--certificate", str(tmp_path / "leaf.pem"), "--config", str(config))
    assert code == 0 and f"revoked serial {revoked:x}" in out, err
    assert app.revocations.check()  # the list changed: Vault's CRLs are read again at once
    listed = crls_by_issuer(app.revocations.crls_pem, [root])[root]
    assert revoked in {r.serial_number for r in listed.revoked}
    assert held.serial_number not in {r.serial_number for r in listed.revoked}

    code, _, err = run_cli(capsys, "revoke", "--serial", f"{held.serial_number:x}", "--config", str(config))
    assert code == 2 and err.count("\n") == 1 and "no_store" in err and "--certificate" in err
    code, _, err = run_cli(capsys, "revoke", "--intermediate", "0123456789abcdef", "--config", str(config))
    assert code == 2 and err.count("\n") == 1 and "in Vault" in err


@pytest.mark.parametrize("mode", MODES)
def test_identity_revocation_in_the_vault_modes(
    mode: str, bao: Bao, tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bao.config(tmp_path, mode)
    ca: VaultIntermediateCa | VaultLeafCa
    if mode == "vault-leaf":
        ca = VaultLeafCa(SETTINGS, bao.session(mode), clock, LOG)
    else:
        ca = VaultIntermediateCa.init(tmp_path / "ca", SETTINGS, bao.session(mode), clock, logger=LOG)
    app, _ = app_for(ca, tmp_path / "ca", bao.session(mode), clock)
    assert app.revocations is not None
    held = app.secrets.renew(FRONTEND)
    code, out, err = run_cli(capsys, "revoke", "--spiffe-id", FRONTEND.uri, "--config", str(config))
    assert code == 0 and f"revoked identity {FRONTEND.uri}" in out, err
    assert app.revocations.check()
    assert app.revocations.denied == frozenset({FRONTEND})
    with pytest.raises(IdentityRevoked):
        app.secrets.default_secret(FRONTEND)
    if mode == "vault-intermediate":  # meshca signed it: its serial is on meshca's intermediate's CRL
        crls = crls_by_issuer(app.revocations.crls_pem, [ca.trust_bundle_pem(), ca.intermediate_certificate_pem])
        assert [r.serial_number for r in crls[ca.intermediate_certificate_pem].revoked] == [held.serial_number]
    code, out, _ = run_cli(capsys, "unrevoke", "--spiffe-id", FRONTEND.uri, "--config", str(config))
    assert code == 0 and "may get certificates again" in out
    assert app.revocations.check() and app.revocations.denied == frozenset()
    app.secrets.default_secret(FRONTEND)


def test_vault_unreachable_keeps_the_last_crls_and_sends_none_rather_than_expired_or_incomplete(
    resumed: Bao, tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    bao = resumed
    ca = VaultLeafCa(SETTINGS, bao.session("vault-leaf"), clock, LOG)
    settings = VaultCrlSettings(poll=timedelta(seconds=60))
    app, external = app_for(ca, tmp_path / "ca", bao.session("vault-leaf"), clock, settings)
    assert app.revocations is not None
    fetched = app.revocations.crls_pem
    root = ca.trust_bundle_pem()
    next_update = crls_by_issuer(fetched, [root])[root].next_update
    assert next_update is not None

    caplog.set_level(logging.INFO, logger=LOG.name)
    bao.server.pause()
    for _ in range(4):  # the poll, then the retries after 1 s, 2 s, 4 s: all fail, one log line
        clock.advance(61)
        app.revocations.check()
    assert external.failures == 4 and app.revocations.crls_pem == fetched
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "Vault's CRLs" in r.getMessage()]
    assert len(errors) == 1 and "stay in force" in errors[0].getMessage()

    # past the last CRL's nextUpdate with Vault still away: Envoy would refuse every chain under it, so none is sent
    clock.now = next_update + timedelta(seconds=1)
    assert app.revocations.check()
    assert app.revocations.crls_pem == b""
    assert b"X509 CRL" not in app.secrets.bundle_secrets()[0].payload
    assert any("sends no CRLs" in r.getMessage() for r in caplog.records)

    # a serve whose first read fails has none at all: no CRL rather than an incomplete set
    fresh_app, fresh = app_for(ca, tmp_path / "ca2", bao.session("vault-leaf"), clock, settings)
    assert fresh_app.revocations is not None and fresh_app.revocations.crls_pem == b"" and fresh.failures == 1


def test_vault_crls_are_read_again_when_due_and_changes_in_vault_are_picked_up(
    bao: Bao, tmp_path: Path, clock: FakeClock
) -> None:
    ca = VaultLeafCa(SETTINGS, bao.session("vault-leaf"), clock, LOG)
    app, external = app_for(ca, tmp_path / "ca", bao.session("vault-leaf"), clock, VaultCrlSettings(poll=timedelta(seconds=60)))
    assert app.revocations is not None
    leaf = ca.issue_workload(FRONTEND)
    bao.root.write_data("pki/revoke", data={"certificate": leaf.certificate_pem.decode()})  # made in Vault directly
    clock.advance(59)
    assert not external.due(clock())
    assert not app.revocations.check()
    clock.advance(1)
    assert app.revocations.check()
    root = ca.trust_bundle_pem()
    assert leaf.serial_number in {r.serial_number for r in crls_by_issuer(app.revocations.crls_pem, [root])[root].revoked}


def test_after_a_root_rotation_in_vault_both_roots_have_their_crl(bao: Bao, tmp_path: Path, clock: FakeClock) -> None:
    """Old leaves chain to the old root while it stays trusted: its CRL must be served too (every issuer is read)."""
    setup_pki(bao.root, trust_domain=TD, mode="vault-leaf", mount="pki-rot", policy="meshca-rot")
    session = VaultSession(VaultSettings(bao.server.address, TokenAuth(bao.root.token), timeout=1.0), system_clock, LOG)
    ca = VaultLeafCa(SETTINGS, session, clock, LOG, VaultLeafOptions(mount="pki-rot"))
    (tmp_path / "ca").mkdir(mode=0o700)
    external = VaultCrls(session, ["pki-rot"], ca.vault_crl_issuers, clock, LOG)
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(tmp_path / "ca"),  # type: ignore[arg-type]
                                                                    external=external))
    assert app.revocations is not None
    old_root = ca.trust_bundle_pem()
    bao.root.write_data("pki-rot/root/rotate/internal", data={
        "common_name": "rotated root", "uri_sans": f"spiffe://{TD}", "ttl": "720h", "key_type": "ec"})
    bao.root.write_data("pki-rot/root/replace", data={"default": "next"})
    assert ca.refresh()
    roots = crypto.split_pem_certificates(ca.trust_bundle_pem())
    assert len(roots) == 2 and old_root in roots
    assert app.revocations.check()  # the CA changed: Vault's CRLs are read again, one per root
    assert set(crls_by_issuer(app.revocations.crls_pem, roots)) == set(roots)


async def test_with_store_the_vault_leaf_list_is_in_etcd(
    bao: Bao, etcd: EtcdProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bao.config(tmp_path, "vault-leaf")
    data = yaml.safe_load(config.read_text())
    data["store"] = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/vault-rev"}}
    config.write_text(yaml.safe_dump(data))
    code, out, err = await asyncio.to_thread(run_cli, capsys, "revoke", "--spiffe-id", FRONTEND.uri, "--config",
                                             str(config))
    assert code == 0 and "etcd /vault-rev/revocations.json" in out, err
    async with connected(etcd.endpoint, "/vault-rev") as store:
        view = await EtcdRevocations.open(store, LOG, watch=False)
        assert view.read().denied_spiffe_ids == {FRONTEND.uri}
    assert not (tmp_path / "ca" / "revocations.json").exists()
