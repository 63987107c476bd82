"""Vault-backed CA backends against a real OpenBao dev server: vault-intermediate and vault-leaf, outages, rate limit."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import VerificationError
from fakes import FakeClock, FakeMonotonic, FakeTokenAuthenticator, RecordingPublisher, RecordingRotator
from test_ca import ED25519_CSR, tamper_signature, verify_client_chain

from meshca.ca import crypto
from meshca.ca.api import (
    CaError,
    CaSettings,
    CaStateError,
    CsrRejected,
    IdentityRejected,
    InvalidTtl,
    IssuerExpired,
    RateLimited,
    RotationRefused,
    ScheduledStep,
    ServerCertificateUnsupported,
    VaultNotConfigured,
    VaultRefused,
)
from meshca.ca.crypto import KeyAlgorithm
from meshca.ca.csr_service import CertificateServicer, add_to_server
from meshca.ca.state import JOURNAL_FILE, SlotRecord, read_journal, slot_files
from meshca.ca.vault.intermediate import (
    VAULT_METADATA_FILE,
    VaultIntermediateCa,
    is_vault_state_dir,
    vault_scheduled_step,
)
from meshca.ca.vault.leaf import TokenBucket, VaultLeafCa, VaultLeafOptions
from meshca.ca.vault.session import TokenAuth, VaultDenied, VaultError, VaultSession, VaultSettings, VaultUnavailable
from meshca.ca.vault.setup import policy_text, role_parameters, setup_pki
from meshca.clock import system_clock
from meshca.dev.openbao_process import OpenBaoProcess, free_port_pair
from meshca.identity.spiffe import SpiffeId
from meshca.sds.rotation import CaWatcher, RotationSettings
from meshca.v1 import certificate_pb2, certificate_pb2_grpc

TD = "vault.example"
WORKLOAD = SpiffeId.for_service_account(TD, "shop", "frontend")
OTHER = SpiffeId.for_service_account(TD, "shop", "payments")
MAX_LEAF = timedelta(hours=24)
LOG = logging.getLogger("test.vault_ca")

# Intermediates live 1 h so that the schedule's points are minutes of fake time away; Vault stamps its
# certificates with real time, so fake clocks start at the real now.
SETTINGS = CaSettings(TD, intermediate_ttl=timedelta(hours=1), leaf_ttl_default=timedelta(minutes=10),
                      leaf_ttl_min=timedelta(seconds=30), leaf_ttl_max=timedelta(minutes=20))


class ScriptedVaultDouble:
    """Test double for meshca.ca.vault.session.VaultSession: `call` raises the scripted errors in turn, then answers."""

    def __init__(self, errors: list[Exception], answer: Any, time: FakeMonotonic | None = None,
                 call_cost: float = 0.0) -> None:
        self.errors = list(errors)
        self.answer = answer
        self.calls: list[str] = []
        self.time = time
        self.call_cost = call_cost

    def call(self, operation: Callable[[Any], Any], what: str) -> Any:
        self.calls.append(what)
        if self.time is not None:
            self.time.now += self.call_cost
        if self.errors:
            raise self.errors.pop(0)
        return self.answer


# --- a real OpenBao -------------------------------------------------------------------------------


class Vault:
    """The module's OpenBao dev server, set up with meshca's mount, root, role and the two modes' policies."""

    def __init__(self, bao: OpenBaoProcess) -> None:
        self.bao = bao
        self.root = bao.root_client()
        self.tokens: dict[str, str] = {}
        for mount in ("pki", "pki2", "pki3"):
            for mode in ("vault-intermediate", "vault-leaf"):
                policy = f"meshca-{mount}-{mode}"
                setup_pki(self.root, trust_domain=TD, mode=mode, mount=mount, policy=policy,  # type: ignore[arg-type]
                          root_ttl=timedelta(days=30), max_leaf_ttl=MAX_LEAF)
                token = self.root.auth.token.create(policies=[policy], ttl="2h")["auth"]["client_token"]
                self.tokens[f"{mount}/{mode}"] = token
            # use_csr_sans=false: Vault takes the SAN from `uri_sans` (meshca's verified identity), never the CSR.
            assert self.root.read(f"{mount}/roles/meshca")["data"]["use_csr_sans"] is False

    def session(self, mount: str, mode: str, timeout: float = 1.0, address: str | None = None,
                token: str | None = None) -> VaultSession:
        settings = VaultSettings(address=address or self.bao.address,
                                 auth=TokenAuth(token=token or self.tokens[f"{mount}/{mode}"]), timeout=timeout)
        return VaultSession(settings, system_clock, LOG.getChild("session"))

    def leaf_token(self, mount: str, role: str) -> str:
        """A token holding meshca's vault-leaf policy for another role of `mount`."""
        policy = f"meshca-{mount}-{role}"
        self.root.sys.create_or_update_acl_policy(policy, policy_text("vault-leaf", mount=mount, role=role))
        return str(self.root.auth.token.create(policies=[policy], ttl="2h")["auth"]["client_token"])

    def root_pem(self, mount: str) -> bytes:
        chain = self.root.secrets.pki.read_ca_certificate_chain(mount_point=mount).encode()
        return b"".join(crypto.split_pem_certificates(chain))

    def rotate_root(self, mount: str, name: str) -> None:
        """A new root in Vault's mount, made the default issuer (a Vault-side root rotation)."""
        self.root.write_data(f"{mount}/root/rotate/internal", data={
            "common_name": name, "uri_sans": f"spiffe://{TD}", "ttl": "720h", "key_type": "ec"})
        self.root.write_data(f"{mount}/root/replace", data={"default": "next"})


@pytest.fixture(scope="module")
def vault() -> Iterator[Vault]:
    with OpenBaoProcess() as bao:
        yield Vault(bao)


@pytest.fixture
def resumed(vault: Vault) -> Iterator[Vault]:
    """The server, resumed afterwards whatever the test did."""
    yield vault
    if vault.bao.paused:
        vault.bao.resume()


def dead_session(vault: Vault) -> VaultSession:
    """A session to a loopback port where nothing listens: Vault is gone."""
    return vault.session("pki", "vault-intermediate", address=f"http://127.0.0.1:{free_port_pair()}")


def certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def verify(bundle: bytes, chain: bytes, at: datetime, spiffe_id: SpiffeId = WORKLOAD) -> None:
    verified = verify_client_chain(bundle, chain, at)
    assert verified.subjects == [x509.UniformResourceIdentifier(spiffe_id.uri)]


# --- vault-intermediate -----------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def inter_ca(vault: Vault, tmp_path: Path, clock: FakeClock) -> VaultIntermediateCa:
    return VaultIntermediateCa.init(tmp_path / "ca", SETTINGS, vault.session("pki", "vault-intermediate"), clock,
                                    logger=LOG)


def test_intermediate_is_signed_by_vault_and_leaves_verify_to_vaults_root(
    vault: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock, tmp_path: Path
) -> None:
    root_pem = vault.root_pem("pki")
    assert inter_ca.trust_bundle_pem() == root_pem
    inter = crypto.parse_certificate_pem(inter_ca.intermediate_certificate_pem)
    assert inter.is_ca and inter.path_length == 0 and inter.uris == (f"spiffe://{TD}",)
    assert crypto.certificate_issued_by(inter_ca.intermediate_certificate_pem, root_pem)

    leaf = inter_ca.issue_workload(WORKLOAD)
    assert len(certs(leaf.chain_pem)) == 2 and leaf.private_key_pem is not None
    verify(inter_ca.trust_bundle_pem(), leaf.chain_pem, clock.now)
    assert leaf.not_after - leaf.not_before <= SETTINGS.leaf_ttl_default + SETTINGS.backdate

    key = crypto.generate_private_key_pem()
    signed = inter_ca.sign_csr(crypto.build_csr_pem(key), OTHER)
    verify(inter_ca.trust_bundle_pem(), signed.chain_pem, clock.now, OTHER)
    server = inter_ca.issue_server_certificate(["meshca.local"], ["127.0.0.1"])
    assert crypto.parse_certificate_pem(server.certificate_pem).dns_names == ("meshca.local",)

    # State on disk: vault-ca.json names the mode and mount; the key is 0600 in a 0700 directory.
    state = tmp_path / "ca"
    assert is_vault_state_dir(state)
    data = json.loads((state / VAULT_METADATA_FILE).read_text())
    assert data["mode"] == "vault-intermediate" and data["vault"] == {"mount": "pki"} and data["generation"] == 1
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    _, key_file = slot_files("intermediate", inter_ca.active_intermediate_id)
    assert stat.S_IMODE(os.stat(state / key_file).st_mode) == 0o600
    status = inter_ca.status()
    assert [(s.kind, s.state) for s in status.slots] == [("root", "active"), ("intermediate", "active")]
    assert status.active_intermediate_id == inter_ca.active_intermediate_id
    assert [e.event for e in read_journal(state)] == ["activated", "activated"]
    with pytest.raises(CaStateError, match="already holds CA state"):
        VaultIntermediateCa.init(state, SETTINGS, vault.session("pki", "vault-intermediate"), clock)


def test_intermediate_local_policy(inter_ca: VaultIntermediateCa, clock: FakeClock) -> None:
    with pytest.raises(IdentityRejected):
        inter_ca.issue_workload(SpiffeId.for_service_account("other.example", "a", "b"))
    with pytest.raises(InvalidTtl):
        inter_ca.issue_workload(WORKLOAD, timedelta(seconds=5))
    with pytest.raises(CsrRejected):
        inter_ca.sign_csr(ED25519_CSR, WORKLOAD)
    with pytest.raises(CsrRejected) as refused:
        inter_ca.sign_csr(crypto.build_csr_pem(crypto.generate_private_key_pem(), uris=[OTHER.uri]), WORKLOAD)
    assert refused.value.kind == "permission_denied"
    # Never signs with an expired issuer, even with Vault up.
    clock.now = inter_ca.intermediate_not_after
    with pytest.raises(IssuerExpired):
        inter_ca.issue_workload(WORKLOAD)


def test_intermediate_rotation_through_slots_old_leaves_keep_verifying(
    vault: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock
) -> None:
    start, first = clock.now, inter_ca.active_intermediate_id
    assert inter_ca.tick() == []

    clock.now = start + timedelta(minutes=31)  # past intermediate_prepare_at (0.5 of 1 h)
    events = inter_ca.tick()
    assert [(e.event, e.kind) for e in events] == [("prepared", "intermediate")]
    prepared = events[0].id
    assert inter_ca.active_intermediate_id == first  # prepared does not sign
    assert inter_ca.trust_bundle_pem() == vault.root_pem("pki")

    clock.now = start + timedelta(minutes=38)
    old_leaf = inter_ca.issue_workload(WORKLOAD)  # by the first intermediate, still active
    clock.now = start + timedelta(minutes=40)  # past intermediate_activate_at (0.66)
    events = inter_ca.tick()
    assert [(e.event, e.id) for e in events] == [("activated", prepared), ("retired", first)]
    assert inter_ca.active_intermediate_id == prepared and inter_ca.generation == 3
    retired = events[1].retire_after
    assert retired is not None
    new_leaf = inter_ca.issue_workload(WORKLOAD)
    assert crypto.certificate_issued_by(inter_ca.intermediate_certificate_pem, vault.root_pem("pki"))
    for leaf in (old_leaf, new_leaf):  # one bundle (Vault's root) verifies both generations
        verify(inter_ca.trust_bundle_pem(), leaf.chain_pem, clock.now)
    assert [s.state for s in inter_ca.status().slots if s.kind == "intermediate"] == ["active", "old"]

    clock.now = retired  # the old intermediate's last leaf has expired: pruned, its files removed
    events = inter_ca.tick()
    assert ("pruned", "intermediate", first) in [(e.event, e.kind, e.id) for e in events]
    assert [s.id for s in inter_ca.status().slots if s.kind == "intermediate"] == [prepared]
    assert not (inter_ca.state_dir / slot_files("intermediate", first)[1]).exists()
    with pytest.raises(RotationRefused):
        inter_ca.activate_intermediate()


def test_intermediate_keeps_issuing_while_vault_is_paused_and_tick_recovers(
    resumed: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock
) -> None:
    start, active = clock.now, inter_ca.active_intermediate_id
    clock.now = start + timedelta(minutes=31)
    resumed.bao.pause()
    began = time.monotonic()
    leaves = [inter_ca.issue_workload(WORKLOAD) for _ in range(50)]  # local signing: no Vault involved
    assert time.monotonic() - began < 1.0
    with pytest.raises(VaultUnavailable) as down:
        inter_ca.tick()
    assert isinstance(down.value, CaError) and "sign-intermediate" in down.value.path
    assert "timed out" in down.value.reason
    assert inter_ca.active_intermediate_id == active and inter_ca.generation == 1  # nothing lost, nothing half-done
    assert [e.event for e in read_journal(inter_ca.state_dir)] == ["activated", "activated"]
    verify(inter_ca.trust_bundle_pem(), inter_ca.issue_workload(WORKLOAD).chain_pem, clock.now)
    # Backing off (1 s, doubling, capped): the next ticks do not wait on Vault again.
    assert inter_ca.vault_failures == 1 and "timed out" in (inter_ca.last_vault_error or "")
    assert inter_ca.next_vault_attempt == clock.now + timedelta(seconds=1)
    began = time.monotonic()
    assert inter_ca.tick() == []
    assert time.monotonic() - began < 0.5

    resumed.bao.resume()
    clock.now += timedelta(seconds=1)
    events = inter_ca.tick()
    assert inter_ca.vault_failures == 0 and inter_ca.next_vault_attempt is None
    assert [(e.event, e.kind) for e in events] == [("prepared", "intermediate")]
    verify(inter_ca.trust_bundle_pem(), leaves[0].chain_pem, clock.now)


def test_intermediate_restart_needs_no_vault(
    vault: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock
) -> None:
    before = inter_ca.issue_workload(WORKLOAD)
    gone = dead_session(vault)
    loaded = VaultIntermediateCa.load(inter_ca.state_dir, None, gone, clock, logger=LOG)
    assert loaded.active_intermediate_id == inter_ca.active_intermediate_id
    assert loaded.trust_bundle_pem() == inter_ca.trust_bundle_pem() and loaded.settings == SETTINGS
    verify(loaded.trust_bundle_pem(), loaded.issue_workload(WORKLOAD).chain_pem, clock.now)
    verify(loaded.trust_bundle_pem(), before.chain_pem, clock.now)
    clock.now += timedelta(minutes=31)
    began = time.monotonic()
    with pytest.raises(VaultUnavailable, match="connection refused"):
        loaded.tick()
    assert time.monotonic() - began < 2
    assert repr(loaded).startswith("VaultIntermediateCa(")
    # Without any session (e.g. `meshca ca status`), reading works and transitions say why they cannot.
    offline = VaultIntermediateCa.load(inter_ca.state_dir, None, None, clock)
    assert offline.status().generation == 1
    with pytest.raises(VaultNotConfigured):
        offline.rotate_intermediate()


def test_intermediate_reload_sees_another_process_rotation(
    vault: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock
) -> None:
    other = VaultIntermediateCa.load(inter_ca.state_dir, SETTINGS, vault.session("pki", "vault-intermediate"), clock)
    assert inter_ca.reload_if_changed() is False
    events = other.rotate_intermediate(now=True)
    assert [e.event for e in events] == ["prepared", "activated", "retired"]
    assert inter_ca.reload_if_changed() is True
    assert inter_ca.active_intermediate_id == other.active_intermediate_id and inter_ca.generation == 3
    assert inter_ca.reload_if_changed() is False


def test_intermediate_follows_a_vault_root_rotation_bundle_first(vault: Vault, tmp_path: Path, clock: FakeClock) -> None:
    ca = VaultIntermediateCa.init(tmp_path / "ca", SETTINGS, vault.session("pki2", "vault-intermediate"), clock,
                                  mount="pki2", logger=LOG)
    old_root = ca.trust_bundle_pem()
    vault.rotate_root("pki2", "second root")
    new_root = vault.root_pem("pki2")
    start = clock.now
    clock.now = start + timedelta(minutes=44)
    old_leaf = ca.issue_workload(WORKLOAD)

    clock.now = start + timedelta(minutes=45)  # prepare and activate are both due, but the root is new
    events = ca.tick()
    assert [(e.event, e.kind) for e in events] == [("prepared", "root"), ("prepared", "intermediate")]
    assert ca.trust_bundle_pem() == old_root + new_root  # published before anything it signs is served

    clock.now += timedelta(seconds=1)  # the next tick activates
    events = ca.tick()
    assert [(e.event, e.kind) for e in events] == [
        ("activated", "root"), ("retired", "root"), ("activated", "intermediate"), ("retired", "intermediate")]
    assert ca.trust_bundle_pem() == new_root + old_root
    new_leaf = ca.issue_workload(WORKLOAD)
    verify(ca.trust_bundle_pem(), new_leaf.chain_pem, clock.now)
    verify(ca.trust_bundle_pem(), old_leaf.chain_pem, clock.now)
    with pytest.raises(VerificationError):
        verify(old_root, new_leaf.chain_pem, clock.now)

    clock.now = max(s.retire_after for s in ca.status().slots if s.retire_after)
    ca.tick()
    assert ca.trust_bundle_pem() == new_root  # the old root leaves with its last intermediate
    assert [(s.kind, s.state) for s in ca.status().slots] == [("root", "active"), ("intermediate", "active")]
    reloaded = VaultIntermediateCa.load(ca.state_dir, None, None, clock)
    assert reloaded.trust_bundle_pem() == new_root and reloaded.mount == "pki2"


def test_intermediate_load_refuses_damaged_state(inter_ca: VaultIntermediateCa, clock: FakeClock) -> None:
    state = inter_ca.state_dir
    cert_file, key_file = slot_files("intermediate", inter_ca.active_intermediate_id)
    (state / key_file).chmod(0o600)
    (state / key_file).write_bytes(crypto.generate_private_key_pem())
    with pytest.raises(CaStateError, match=key_file):
        VaultIntermediateCa.load(state, None, None, clock)
    with pytest.raises(CaStateError, match="no vault-ca.json"):
        VaultIntermediateCa.load(state.parent, None, None, clock)


def test_vault_scheduled_step_is_a_pure_function() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    hour = timedelta(hours=1)
    active = SlotRecord("intermediate", "a" * 16, "active", "r" * 16, t0, t0 + hour, t0)
    root = SlotRecord("root", "r" * 16, "active", None, t0, t0 + 100 * hour, t0)
    assert vault_scheduled_step([root, active], SETTINGS, t0 + hour * 0.4) is None
    assert vault_scheduled_step([root, active], SETTINGS, t0 + hour * 0.5) == ScheduledStep("prepare", "intermediate")
    at = t0 + hour * 0.7
    same_root = SlotRecord("intermediate", "b" * 16, "prepared", "r" * 16, t0, t0 + 2 * hour, at)
    new_root = SlotRecord("intermediate", "b" * 16, "prepared", "n" * 16, t0, t0 + 2 * hour, at)
    assert vault_scheduled_step([root, active, same_root], SETTINGS, at) == ScheduledStep("activate", "intermediate")
    assert vault_scheduled_step([root, active, new_root], SETTINGS, at) is None  # bundle first
    assert vault_scheduled_step([root, active, new_root], SETTINGS, at + timedelta(seconds=1)) == ScheduledStep(
        "activate", "intermediate")
    old = SlotRecord("intermediate", "c" * 16, "old", "r" * 16, t0, t0 + hour, t0, retire_after=t0 + hour * 0.2)
    assert vault_scheduled_step([root, active, old], SETTINGS, t0 + hour * 0.3) == ScheduledStep("prune", None)


# --- vault-leaf ---------------------------------------------------------------------------------


@pytest.fixture
def leaf_ca(vault: Vault, clock: FakeClock) -> VaultLeafCa:
    return VaultLeafCa(SETTINGS, vault.session("pki", "vault-leaf"), clock, LOG)


def test_leaf_every_leaf_is_signed_by_vault_and_verifies_to_its_root(
    vault: Vault, leaf_ca: VaultLeafCa, clock: FakeClock
) -> None:
    root_pem = vault.root_pem("pki")
    assert leaf_ca.trust_bundle_pem() == root_pem
    issued = leaf_ca.issue_workload(WORKLOAD)
    assert issued.chain_pem == issued.certificate_pem  # a root mount: the chain carries no CA
    verify(leaf_ca.trust_bundle_pem(), issued.chain_pem, clock.now)
    info = crypto.parse_certificate_pem(issued.certificate_pem)
    assert info.uris == (WORKLOAD.uri,) and info.dns_names == () and info.subject == ""
    assert info.public_key.curve == "secp256r1"
    assert info.public_key.spki_der == crypto.private_key_info(issued.private_key_pem or b"").spki_der
    assert crypto.certificate_issued_by(issued.certificate_pem, root_pem)
    assert issued.not_after - clock.now <= SETTINGS.leaf_ttl_default + timedelta(seconds=5)
    assert leaf_ca.active_intermediate_id == crypto.parse_certificate_pem(root_pem).fingerprint_sha256[:16]
    status = leaf_ca.status()
    assert [(s.kind, s.state, s.id) for s in status.slots] == [("root", "active", leaf_ca.active_intermediate_id)]
    assert leaf_ca.tick() == [] and leaf_ca.stats().signed == 1
    with pytest.raises(ServerCertificateUnsupported, match="tls.certificate_chain"):
        leaf_ca.issue_server_certificate(["meshca.local"], [])
    with pytest.raises(InvalidTtl):
        leaf_ca.issue_workload(WORKLOAD, timedelta(seconds=1))


def test_leaf_sign_csr_sends_the_callers_key_and_refuses_like_the_internal_ca(
    leaf_ca: VaultLeafCa, clock: FakeClock
) -> None:
    key = crypto.generate_private_key_pem()
    for csr in (crypto.build_csr_pem(key), crypto.build_csr_pem(key, uris=[WORKLOAD.uri], common_name="ignored")):
        signed = leaf_ca.sign_csr(csr, WORKLOAD, timedelta(minutes=2))
        verify(leaf_ca.trust_bundle_pem(), signed.chain_pem, clock.now)
        assert crypto.parse_certificate_pem(signed.certificate_pem).public_key.spki_der == \
            crypto.private_key_info(key).spki_der
        assert signed.private_key_pem is None
    signed_before = leaf_ca.stats().signed
    refusals = {
        "CA:true": crypto.build_csr_pem(key, is_ca=True),
        "other identity": crypto.build_csr_pem(key, uris=[OTHER.uri]),
        "ed25519": ED25519_CSR,
        "garbage": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    }
    for name, csr in refusals.items():
        with pytest.raises(CsrRejected):
            leaf_ca.sign_csr(csr, WORKLOAD)
    forged = tamper_signature(crypto.build_csr_pem(key))
    with pytest.raises(CsrRejected, match="signature"):
        leaf_ca.sign_csr(forged, WORKLOAD)
    with pytest.raises(IdentityRejected):
        leaf_ca.sign_csr(crypto.build_csr_pem(key), SpiffeId.for_service_account("evil.example", "a", "b"))
    assert leaf_ca.stats().signed == signed_before  # refused locally: Vault never asked


def test_vault_role_itself_refuses_an_identity_outside_the_trust_domain(leaf_ca: VaultLeafCa) -> None:
    foreign = "spiffe://evil.example/ns/a/sa/b"
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem())
    with pytest.raises(VaultError) as refused:
        leaf_ca.vault_sign(csr, foreign, timedelta(minutes=5))  # the Vault path, without the local check
    error = refused.value
    assert isinstance(error, CaError) and not isinstance(error, (VaultUnavailable, VaultDenied))
    assert error.status == 400 and error.path == "pki/sign/meshca"
    assert "not valid for this role" in error.reason
    assert str(error).startswith("POST pki/sign/meshca: ") and "Traceback" not in str(error)
    assert error.__cause__ is None and error.__suppress_context__
    assert leaf_ca.stats().retries == 0  # a refusal is not retried
    with pytest.raises(IdentityRejected):  # and meshca checks first, without asking Vault
        leaf_ca.issue_workload(SpiffeId.for_service_account("evil.example", "a", "b"))


def basic_constraints(pem: bytes) -> x509.Extension[x509.BasicConstraints]:
    return x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.BasicConstraints)


def test_leaf_certificates_carry_basic_constraints_ca_false(leaf_ca: VaultLeafCa) -> None:
    # The SPIFFE X509-SVID spec: a leaf SVID has basicConstraints cA=false (the role's
    # basic_constraints_valid_for_non_ca, written by `meshca vault setup`), as the internal CA's leaves have.
    key = crypto.generate_private_key_pem()
    for issued in (leaf_ca.issue_workload(WORKLOAD), leaf_ca.sign_csr(crypto.build_csr_pem(key), WORKLOAD)):
        extension = basic_constraints(issued.certificate_pem)
        assert extension.critical and extension.value.ca is False and extension.value.path_length is None


def test_leaf_signs_the_rsa_and_p384_csrs_meshcas_policy_accepts(vault: Vault, leaf_ca: VaultLeafCa,
                                                                 clock: FakeClock) -> None:
    for algorithm in (KeyAlgorithm.RSA_2048, KeyAlgorithm.EC_P384):
        key = crypto.generate_private_key_pem(algorithm)
        signed = leaf_ca.sign_csr(crypto.build_csr_pem(key), WORKLOAD, timedelta(minutes=2))
        verify(leaf_ca.trust_bundle_pem(), signed.chain_pem, clock.now)
        assert crypto.parse_certificate_pem(signed.certificate_pem).public_key.spki_der == \
            crypto.private_key_info(key).spki_der
    rsa_leaves = VaultLeafCa(replace(SETTINGS, leaf_key_algorithm=KeyAlgorithm.RSA_2048),
                             vault.session("pki", "vault-leaf"), clock, LOG)
    key_info = crypto.parse_certificate_pem(rsa_leaves.issue_workload(WORKLOAD).certificate_pem).public_key
    assert (key_info.kind, key_info.bits) == ("rsa", 2048)


def test_leaf_vault_refusal_is_told_in_meshcas_words_without_vaults_path_or_address(
    vault: Vault, clock: FakeClock
) -> None:
    chain = vault.root_pem("pki").decode()
    double = ScriptedVaultDouble([], chain)
    ca = VaultLeafCa(SETTINGS, double, clock, LOG)
    answers = [  # (what Vault, or the way to it, said; what the caller may read)
        (VaultError("POST", "pki/sign/meshca", 'no handler for route "pki/sign/meshca". route entry not found.', 404),
         "no handler for route its signing path. route entry not found."),
        (VaultError("POST", "pki/sign/meshca", "unknown role: meshca", 400), "unknown role: meshca"),
        (VaultError("POST", "pki/sign/meshca", "Vault at http://10.0.0.9:8200 unreachable: InvalidURL", None),
         "the request to Vault could not be made"),
    ]
    for error, cause in answers:
        double.errors = [error]
        with pytest.raises(VaultRefused) as refused:
            ca.issue_workload(WORKLOAD)
        assert refused.value.kind == "failed_precondition" and cause in str(refused.value)
        assert "pki/" not in str(refused.value) and "http" not in str(refused.value)
        assert (refused.value.path, refused.value.status) == ("pki/sign/meshca", error.status)


@asynccontextmanager
async def csr_api(ca: VaultLeafCa) -> AsyncIterator[certificate_pb2_grpc.CertificateServiceStub]:
    """meshca's CSR gRPC API on loopback with `ca`; the bearer token "workload" proves WORKLOAD."""
    server = grpc.aio.server()
    add_to_server(server, CertificateServicer(FakeTokenAuthenticator({"workload": WORKLOAD}), ca, LOG))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield certificate_pb2_grpc.CertificateServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def sign_via_api(stub: certificate_pb2_grpc.CertificateServiceStub, csr_pem: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr_pem.decode()),
                        metadata=(("authorization", "Bearer workload"),))
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_csr_api_vault_refusal_is_failed_precondition_not_unavailable(
    vault: Vault, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A role as an earlier `meshca vault setup` wrote it (EC keys only) refuses the RSA CSR that meshca's policy allows.
    vault.root.write_data("pki/roles/ec-only", data={**role_parameters(TD, MAX_LEAF), "key_type": "ec", "key_bits": 256})
    token = vault.leaf_token("pki", "ec-only")
    ca = VaultLeafCa(SETTINGS, vault.session("pki", "vault-leaf", token=token), clock, LOG,
                     VaultLeafOptions(role="ec-only"))
    caplog.set_level(logging.WARNING)
    async with csr_api(ca) as stub:
        code, details = await sign_via_api(stub, crypto.build_csr_pem(crypto.generate_private_key_pem(KeyAlgorithm.RSA_2048)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
        assert "Vault refused to sign" in details and "role requires keys of type ec" in details
        for leak in ("pki/", vault.bao.address, "127.0.0.1", token):
            assert leak not in details
        assert await sign_via_api(stub, crypto.build_csr_pem(crypto.generate_private_key_pem())) == (grpc.StatusCode.OK, "")
    assert ca.stats().retries == 0  # a refusal is not retried
    assert "pki/sign/ec-only" in caplog.text and token not in caplog.text  # the operator's log names the path


async def test_csr_api_vault_down_or_sealed_is_unavailable(resumed: Vault, clock: FakeClock) -> None:
    ca = VaultLeafCa(SETTINGS, resumed.session("pki", "vault-leaf", timeout=0.5), clock, LOG,
                     VaultLeafOptions(retry_deadline=timedelta(milliseconds=600)))
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem())
    async with csr_api(ca) as stub:
        resumed.bao.pause()
        try:
            assert (await sign_via_api(stub, csr))[0] == grpc.StatusCode.UNAVAILABLE
        finally:
            resumed.bao.resume()
        resumed.bao.seal()
        try:
            assert (await sign_via_api(stub, csr))[0] == grpc.StatusCode.UNAVAILABLE
        finally:
            resumed.bao.unseal()
        assert await sign_via_api(stub, csr) == (grpc.StatusCode.OK, "")


async def test_csr_api_vault_stopped_is_unavailable(clock: FakeClock) -> None:
    with OpenBaoProcess() as bao:  # a server of this test's own: stopping it ends it
        setup_pki(bao.root_client(), trust_domain=TD, mode="vault-leaf", max_leaf_ttl=MAX_LEAF)
        session = VaultSession(VaultSettings(address=bao.address, auth=TokenAuth(token=bao.root_token), timeout=0.5),
                               system_clock, LOG.getChild("session"))
        ca = VaultLeafCa(SETTINGS, session, clock, LOG, VaultLeafOptions(retry_deadline=timedelta(milliseconds=300)))
        csr = crypto.build_csr_pem(crypto.generate_private_key_pem())
        async with csr_api(ca) as stub:
            assert await sign_via_api(stub, csr) == (grpc.StatusCode.OK, "")
            bao.stop()
            assert (await sign_via_api(stub, csr))[0] == grpc.StatusCode.UNAVAILABLE


def test_leaf_paused_vault_fails_fast_then_recovers(resumed: Vault, clock: FakeClock) -> None:
    options = VaultLeafOptions(retry_initial=timedelta(milliseconds=100), retry_cap=timedelta(milliseconds=400),
                               retry_deadline=timedelta(seconds=1))
    ca = VaultLeafCa(SETTINGS, resumed.session("pki", "vault-leaf", timeout=0.5), clock, LOG, options)
    bundle = ca.trust_bundle_pem()
    resumed.bao.pause()
    # Wall-clock bound on purpose: it is set by the HTTP timeout against the really paused server (the
    # retry schedule alone, on injected time: test_leaf_retries_unavailable_with_capped_backoff_but_not_refusals).
    began = time.monotonic()
    with pytest.raises(VaultUnavailable) as down:
        ca.issue_workload(WORKLOAD)
    elapsed = time.monotonic() - began
    assert elapsed < 3.0, elapsed  # retry_deadline + one request timeout
    assert isinstance(down.value, CaError) and down.value.path == "pki/sign/meshca"
    assert ca.stats().retries >= 1 and ca.stats().failures == 1
    assert ca.trust_bundle_pem() == bundle  # the cached root is still served
    resumed.bao.resume()
    verify(ca.trust_bundle_pem(), ca.issue_workload(WORKLOAD).chain_pem, clock.now)


def test_leaf_rate_limit_holds_with_injected_time(vault: Vault, clock: FakeClock) -> None:
    fake = FakeMonotonic()
    options = VaultLeafOptions(max_rate=5.0, burst=3, max_wait=timedelta(seconds=1))
    ca = VaultLeafCa(SETTINGS, vault.session("pki", "vault-leaf"), clock, LOG, options, monotonic=fake,
                     sleep=fake.sleep)
    start = fake.now
    for _ in range(13):
        ca.issue_workload(WORKLOAD)
    # 3 from the burst, then one every 1/5 s: 10 × 0.2 s of (fake) waiting at least.
    assert fake.now - start == pytest.approx(2.0)
    assert len(fake.slept) == 10
    impatient = VaultLeafCa(SETTINGS, vault.session("pki", "vault-leaf"), clock, LOG,
                            VaultLeafOptions(max_rate=5.0, burst=2, max_wait=timedelta(milliseconds=50)),
                            monotonic=fake, sleep=fake.sleep)
    impatient.issue_workload(WORKLOAD)
    impatient.issue_workload(WORKLOAD)
    with pytest.raises(RateLimited, match="try again"):
        impatient.issue_workload(WORKLOAD)
    assert isinstance(RateLimited("x"), CaError) and impatient.stats().rate_limited == 1
    fake.now += 0.2
    impatient.issue_workload(WORKLOAD)


def test_token_bucket_refills_at_the_rate() -> None:
    fake = FakeMonotonic()
    bucket = TokenBucket(rate=10.0, burst=2, max_wait=0.5, monotonic=fake, sleep=fake.sleep)
    assert [bucket.acquire() for _ in range(4)] == [0.0, 0.0, pytest.approx(0.1), pytest.approx(0.1)]
    fake.now += 10  # idle: back to a full burst, not more
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_leaf_retries_unavailable_with_capped_backoff_but_not_refusals(vault: Vault, clock: FakeClock) -> None:
    fake = FakeMonotonic()
    chain = vault.root_pem("pki").decode()
    unavailable = [VaultUnavailable("POST", "pki/sign/meshca", "Vault at x timed out", None) for _ in range(20)]
    double = ScriptedVaultDouble([], chain, fake, call_cost=0.05)
    options = VaultLeafOptions(retry_initial=timedelta(milliseconds=100), retry_cap=timedelta(milliseconds=400),
                               retry_deadline=timedelta(seconds=2))
    ca = VaultLeafCa(SETTINGS, double, clock, LOG, options, monotonic=fake, sleep=fake.sleep)
    double.errors = list(unavailable)
    with pytest.raises(VaultUnavailable):
        ca.issue_workload(WORKLOAD)
    assert fake.slept == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4])  # doubled, capped, stopped at the deadline
    assert fake.now - 1000.0 <= 2.0 + 0.05
    for error, raised_as in ((VaultDenied("POST", "pki/sign/meshca", "permission denied", 403), VaultDenied),
                             (VaultError("POST", "pki/sign/meshca", "bad request", 400), VaultRefused)):
        double.errors, fake.slept = [error], []
        with pytest.raises(raised_as) as raised:
            ca.issue_workload(WORKLOAD)
        assert fake.slept == [] and isinstance(raised.value, CaError)


def test_leaf_notices_a_vault_side_issuer_rotation(vault: Vault, clock: FakeClock) -> None:
    fake = FakeMonotonic()
    options = VaultLeafOptions(mount="pki3", chain_refresh=timedelta(seconds=30))
    ca = VaultLeafCa(SETTINGS, vault.session("pki3", "vault-leaf"), clock, LOG, options, monotonic=fake,
                     sleep=fake.sleep)
    old_root, old_id = ca.trust_bundle_pem(), ca.active_intermediate_id
    old_leaf = ca.issue_workload(WORKLOAD)
    vault.rotate_root("pki3", "pki3 second root")
    new_root = vault.root_pem("pki3")
    assert ca.reload_if_changed() is False  # read at most every chain_refresh
    fake.now += 31
    assert ca.reload_if_changed() is True
    assert ca.active_intermediate_id != old_id and ca.generation == 2
    assert ca.trust_bundle_pem() == new_root + old_root  # the old root stays while its leaves live
    new_leaf = ca.issue_workload(WORKLOAD)
    verify(ca.trust_bundle_pem(), new_leaf.chain_pem, clock.now)
    verify(ca.trust_bundle_pem(), old_leaf.chain_pem, clock.now)
    assert [(s.kind, s.state) for s in ca.status().slots] == [("root", "active"), ("root", "old")]
    clock.now += SETTINGS.leaf_ttl_max + SETTINGS.reload_grace
    fake.now += 31
    ca.reload_if_changed()
    assert ca.trust_bundle_pem() == new_root


def test_leaf_chain_refresh_failure_is_reported_and_the_cache_kept(resumed: Vault, clock: FakeClock) -> None:
    fake = FakeMonotonic()
    ca = VaultLeafCa(SETTINGS, resumed.session("pki", "vault-leaf", timeout=0.5), clock, LOG, monotonic=fake,
                     sleep=fake.sleep)
    bundle = ca.trust_bundle_pem()
    resumed.bao.pause()
    fake.now += 31
    with pytest.raises(VaultUnavailable):
        ca.reload_if_changed()
    assert ca.reload_if_changed() is False  # not hammered: next attempt after chain_refresh
    assert ca.trust_bundle_pem() == bundle
    resumed.bao.resume()


def test_private_keys_never_appear_in_reprs_errors_or_logs(
    vault: Vault, inter_ca: VaultIntermediateCa, leaf_ca: VaultLeafCa, clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for ca in (inter_ca, leaf_ca):
        issued = ca.issue_workload(WORKLOAD)
        texts += [repr(ca), repr(issued), str(issued), repr(ca.status())]
    texts.append(repr(inter_ca.rotate_intermediate(now=True)))
    try:
        leaf_ca.vault_sign(crypto.build_csr_pem(crypto.generate_private_key_pem()), "spiffe://evil.example/x",
                           timedelta(minutes=5))
    except VaultError as error:
        texts += [str(error), repr(error)]
    texts.append(caplog.text)
    assert caplog.text  # the flows above did log
    for text in texts:
        assert "PRIVATE KEY" not in text


def test_init_needs_vault_and_says_why(vault: Vault, tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(VaultUnavailable, match="connection refused"):
        VaultIntermediateCa.init(tmp_path / "ca", SETTINGS, dead_session(vault), clock)
    assert not (tmp_path / "ca" / VAULT_METADATA_FILE).exists()
    # A token whose policy only allows vault-leaf's path is refused sign-intermediate, with Vault's reason.
    with pytest.raises(VaultDenied) as denied:
        VaultIntermediateCa.init(tmp_path / "ca", SETTINGS, vault.session("pki", "vault-leaf"), clock)
    assert denied.value.path == "pki/root/sign-intermediate" and "permission denied" in denied.value.reason
    assert not (tmp_path / "ca" / JOURNAL_FILE).exists()
    with pytest.raises(VaultError, match="sign-intermediate"):
        VaultIntermediateCa.init(tmp_path / "ca2", SETTINGS, vault.session("pki", "vault-intermediate"), clock,
                                 mount="nope")



def test_vault_modes_say_what_they_cannot_rotate(inter_ca: VaultIntermediateCa, leaf_ca: VaultLeafCa) -> None:
    assert (inter_ca.signs_remotely, inter_ca.can_rotate_intermediate, inter_ca.can_rotate_root) == (False, True, False)
    assert (leaf_ca.signs_remotely, leaf_ca.can_rotate_intermediate, leaf_ca.can_rotate_root) == (True, False, False)
    with pytest.raises(RotationRefused, match="lives in Vault"):
        inter_ca.rotate_root(now=True)
    with pytest.raises(RotationRefused, match="no meshca intermediate"):
        leaf_ca.rotate_intermediate(now=True)
    with pytest.raises(RotationRefused, match="lives in Vault"):
        leaf_ca.rotate_root()

def test_sealed_vault_is_unavailable_for_both_modes_and_both_recover(
    vault: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock
) -> None:
    leaf_ca = VaultLeafCa(SETTINGS, vault.session("pki", "vault-leaf"), clock, LOG,
                          VaultLeafOptions(retry_deadline=timedelta(milliseconds=300)))
    start = clock.now
    vault.bao.seal()
    try:
        with pytest.raises(VaultUnavailable) as sealed:
            leaf_ca.issue_workload(WORKLOAD)
        assert sealed.value.status == 503 and "sealed" in sealed.value.reason
        clock.now = start + timedelta(minutes=31)
        with pytest.raises(VaultUnavailable, match="sealed"):
            inter_ca.tick()
        verify(inter_ca.trust_bundle_pem(), inter_ca.issue_workload(WORKLOAD).chain_pem, clock.now)
    finally:
        vault.bao.unseal()
    verify(leaf_ca.trust_bundle_pem(), leaf_ca.issue_workload(WORKLOAD).chain_pem, start)
    clock.now += timedelta(seconds=1)
    assert [e.event for e in inter_ca.tick()] == ["prepared"]


def test_ca_watcher_drives_vault_intermediate_through_an_outage(
    resumed: Vault, inter_ca: VaultIntermediateCa, clock: FakeClock
) -> None:
    publisher, rotator = RecordingPublisher(), RecordingRotator()
    watcher = CaWatcher(inter_ca, publisher, rotator, RotationSettings(), clock, LOG)  # type: ignore[arg-type]
    start, first = clock.now, inter_ca.active_intermediate_id
    clock.now = start + timedelta(minutes=31)
    resumed.bao.pause()
    watcher.check()
    assert watcher.failures() == 1 and inter_ca.active_intermediate_id == first
    inter_ca.issue_workload(WORKLOAD)
    resumed.bao.resume()
    clock.now += timedelta(seconds=2)
    watcher.check()  # catches up: the next intermediate is prepared
    assert watcher.failures() == 1 and len([s for s in inter_ca.status().slots if s.state == "prepared"]) == 1
    clock.now = start + timedelta(minutes=40)
    watcher.check()
    assert inter_ca.active_intermediate_id != first and watcher.ca_rotations() == 1 and rotator.reissues == 1
    assert publisher.pushes == 0  # same Vault root: the bundle did not change
