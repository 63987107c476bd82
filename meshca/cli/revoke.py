"""`meshca revoke` and `meshca unrevoke`: record a revocation (a state dir, or a serve config's CA: with `store:`, the
list in etcd; in the Vault modes Vault revokes what it signed); the running servers push the CRLs and deny identities."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from meshca.ca.api import CaError
from meshca.ca.revocation import (
    Revocation,
    RevocationList,
    RevocationRefused,
    StateDirRevocations,
    check_reason,
    intermediate_revocation,
    leaf_revocation,
    serial_revocation,
)
from meshca.clock import Clock, system_clock
from meshca.identity.spiffe import InvalidSpiffeId, SpiffeId

Change = Callable[[RevocationList], RevocationList]


def add_revoke_parsers(commands: Any) -> None:
    revoke = commands.add_parser(
        "revoke",
        help="revoke a leaf (serial), an identity (SPIFFE ID) or an old intermediate: CRLs reach every Envoy",
        description="Recorded next to the CA state (revocations.json in the state dir, or in etcd with a `store:` "
        "config); every running `meshca serve` of that CA re-signs its CRLs and pushes them with the trust bundle "
        "(the ROOTCA secret) within about a second. A revoked identity gets no new certificate and its current "
        "one is listed too. In the Vault modes (--config) what Vault signed is revoked in Vault (<mount>/revoke) and "
        "Vault's CRLs are served with meshca's (docs/vault.md).",
    )
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="a leaf's serial number (hex); needs --force (see --certificate)")
    which.add_argument("--certificate", help="a leaf certificate file (PEM): its serial, checked to be ours")
    which.add_argument("--spiffe-id", help="an identity: no new certificate, every current one revoked")
    which.add_argument("--intermediate", help="an old intermediate's slot id (meshca ca status)")
    revoke.add_argument("--reason", default="unspecified", help="RFC 5280 reason, e.g. keyCompromise")
    revoke.add_argument(
        "--force", action="store_true",
        help="accept a bare --serial meshca cannot check (it keeps no record of the leaves it issued): every "
        "intermediate's CRL lists it until the last of them expires",
    )
    _add_location(revoke)
    revoke.set_defaults(handler=cmd_revoke)
    unrevoke = commands.add_parser(
        "unrevoke", help="lift the revocation of an identity (its revoked certificates stay revoked)"
    )
    unrevoke.add_argument("--spiffe-id", required=True, help="the revoked identity")
    _add_location(unrevoke)
    unrevoke.set_defaults(handler=cmd_unrevoke)


def _add_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the internal CA's state directory")
    where.add_argument("--config", help="a `meshca serve` config file: its state_dir, or its store")


def cmd_revoke(args: argparse.Namespace, out: TextIO | None = None, clock: Clock = system_clock) -> int:
    out = out or sys.stdout

    def decide(signers: Any, trust_domain: str, current: RevocationList) -> Revocation:
        now = clock()
        reason = check_reason(args.reason)
        if isinstance(signers, _VaultCa):
            made_by_vault = signers.revoke_in_vault(args, reason, now)
            if made_by_vault is not None:
                return made_by_vault
            signers = signers.signers
        if args.intermediate:
            return intermediate_revocation(signers, args.intermediate, reason, now)
        if args.certificate:
            path = Path(args.certificate)
            try:
                pem = path.read_bytes()
            except OSError as error:
                raise RevocationRefused(f"--certificate {path}: cannot be read: {error.strerror or error}") from None
            return leaf_revocation(signers, pem, reason, now, f"--certificate {path}")
        if args.serial:
            if not args.force:
                raise RevocationRefused(
                    f"--serial {args.serial}: meshca keeps no record of the serials it issued, so it cannot check "
                    "this one: give the certificate (--certificate FILE), or add --force to list it on every "
                    "intermediate's CRL"
                )
            return serial_revocation(signers, args.serial, reason, now)
        return Revocation("spiffe_id", _identity(args.spiffe_id, trust_domain).uri, reason, now)

    try:
        entry, after, where = _record(args, clock, decide)
    except CaError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    if after.find(entry.kind, entry.value) != entry:
        kept = after.find(entry.kind, entry.value)
        since = kept.revoked_at.isoformat(timespec="seconds") if kept else "?"
        out.write(f"nothing to do: {_describe(entry)} is already revoked (since {since})\n")
        return 0
    out.write(f"revoked {_describe(entry)} (reason {entry.reason}); revocation list version {after.version} in "
              f"{where}: every running `meshca serve` of this CA pushes its CRLs within seconds\n")
    return 0


def cmd_unrevoke(args: argparse.Namespace, out: TextIO | None = None, clock: Clock = system_clock) -> int:
    out = out or sys.stdout
    found: list[bool] = []

    def change(trust_domain: str, signers: Any) -> Change:
        uri = _identity(args.spiffe_id, trust_domain).uri

        def drop(current: RevocationList) -> RevocationList:
            found.append(current.find("spiffe_id", uri) is not None)
            return current.without("spiffe_id", uri)

        return drop

    try:
        after, where = _update(args, clock, change)
    except CaError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    if not found or not found[-1]:
        out.write(f"nothing to do: {args.spiffe_id} is not revoked\n")
        return 0
    out.write(f"identity {args.spiffe_id} may get certificates again (revocation list version {after.version} in "
              f"{where}); its revoked certificates stay on the CRLs until they expire\n")
    return 0


def _describe(entry: Revocation) -> str:
    if entry.kind == "spiffe_id":
        return f"identity {entry.value}"
    if entry.kind == "intermediate":
        return f"intermediate {entry.value} (serial {entry.serial:x})" if entry.serial is not None else entry.value
    return f"serial {entry.value}"


def _identity(value: str, trust_domain: str) -> SpiffeId:
    try:
        spiffe_id = SpiffeId.parse(value)
    except InvalidSpiffeId as error:
        raise RevocationRefused(f"--spiffe-id {value!r}: {error}") from None
    if spiffe_id.trust_domain != trust_domain:
        raise RevocationRefused(f"--spiffe-id {value}: not in this CA's trust domain {trust_domain!r}")
    return spiffe_id


def _record(
    args: argparse.Namespace, clock: Clock, decide: Callable[[Any, str, RevocationList], Revocation]
) -> tuple[Revocation, RevocationList, str]:
    made: list[Revocation] = []

    def change(trust_domain: str, signers: Any) -> Change:
        def add(current: RevocationList) -> RevocationList:
            entry = decide(signers, trust_domain, current)
            made.append(entry)
            return current.with_entries([entry])

        return add

    after, where = _update(args, clock, change)
    return made[-1], after, where


def _update(
    args: argparse.Namespace, clock: Clock, change: Callable[[str, Any], Change]
) -> tuple[RevocationList, str]:
    """Apply the change made by `change(trust_domain, the CA's crl_signers())` where the config or state dir says; (list, where)."""
    if args.config:
        from meshca.ca.backends import read_ca_mode
        from meshca.config import read_state_dir, read_store_settings

        config = Path(args.config)
        mode = read_ca_mode(config)
        if mode != "internal":
            return _update_vault(config, mode, clock, change)
        store = read_store_settings(config)
        if store is not None:
            from meshca.store.revocation import update_in_store

            return update_in_store(store, clock, change)
        state_dir = read_state_dir(config)
    else:
        state_dir = Path(args.state_dir)
    from meshca.ca.internal import CertificateAuthority
    from meshca.ca.vault.intermediate import is_vault_state_dir

    if is_vault_state_dir(state_dir):
        from meshca.ca.vault.intermediate import VaultIntermediateCa

        vault_ca = VaultIntermediateCa.load(state_dir, None, None, clock)
        context = _VaultCa("vault-intermediate", vault_ca, None, "", vault_ca.crl_signers())
        after = StateDirRevocations(state_dir).update(change(vault_ca.trust_domain, context))
        return after, str(state_dir / "revocations.json")
    ca = CertificateAuthority.load(state_dir, clock)
    after = StateDirRevocations(state_dir).update(change(ca.trust_domain, ca.crl_signers()))
    return after, str(state_dir / "revocations.json")


class _VaultCa:
    """What `meshca revoke` needs of a Vault-mode CA: meshca's own CRL signers (vault-intermediate's intermediates)
    and, for what Vault signed, its `<mount>/revoke` (made once, before the entry is recorded)."""

    def __init__(self, mode: str, ca: Any, session: Any, mount: str, signers: Any) -> None:
        self.mode, self.ca, self.session, self.mount, self.signers = mode, ca, session, mount, signers
        self._made: Revocation | None = None

    def revoke_in_vault(self, args: argparse.Namespace, reason: str, now: Any) -> Revocation | None:
        """The entry of a revocation Vault makes (None: meshca signs its CRL, or an identity)."""
        if self._made is not None:
            return self._made
        if self.mode == "vault-intermediate":
            if not args.intermediate:
                return None
            entry = intermediate_revocation(self.signers, args.intermediate, reason, now)
            pem = next(i.certificate_pem for r, i in self.signers if r.id == entry.value)
            self._vault_revoke(f"--intermediate {args.intermediate}", certificate_pem=pem)
        elif args.intermediate:
            raise RevocationRefused(
                f"--intermediate {args.intermediate}: in vault-leaf mode the intermediates are Vault's: revoke the "
                f"issuer in Vault ({self.mount}/issuer/<ref>/revoke, or its parent mount's revoke); meshca serves "
                "the new CRLs"
            )
        elif args.certificate:
            entry = self._vault_leaf(args, reason, now)
        elif args.serial:
            entry = self._vault_serial(args.serial, reason, now)
        else:
            return None
        self._made = entry
        return entry

    def _vault_revoke(self, what: str, **which: Any) -> None:
        from meshca.ca.vault.crl import vault_revoke
        from meshca.ca.vault.session import VaultError

        if self.session is None:
            raise RevocationRefused(f"{what}: Vault must revoke it: give --config (the serve config's Vault login)")
        try:
            vault_revoke(self.session, self.mount, **which)
        except VaultError as error:
            raise RevocationRefused(f"{what}: Vault refused the revocation: {error}") from None

    def _vault_leaf(self, args: argparse.Namespace, reason: str, now: Any) -> Revocation:
        from meshca.ca import crypto

        path = Path(args.certificate)
        try:
            pem = path.read_bytes()
            info = crypto.parse_certificate_pem(pem)
        except OSError as error:
            raise RevocationRefused(f"--certificate {path}: cannot be read: {error.strerror or error}") from None
        except crypto.CryptoError as error:
            raise RevocationRefused(f"--certificate {path}: {error}") from None
        self._vault_revoke(f"--certificate {path}", certificate_pem=crypto.split_pem_certificates(pem)[0])
        return Revocation("serial", f"{info.serial_number:x}", reason, now, info.not_after,
                          self.ca.active_intermediate_id, info.serial_number)

    def _vault_serial(self, serial: str, reason: str, now: Any) -> Revocation:
        try:
            number = int(serial.lower().removeprefix("0x").replace(":", ""), 16)
        except ValueError:
            raise RevocationRefused(f"--serial {serial!r}: not a hexadecimal serial number") from None
        try:
            self._vault_revoke(f"--serial {serial}", serial=number)
        except RevocationRefused as refused:
            if "not found" in str(refused):
                raise RevocationRefused(
                    f"--serial {serial}: Vault keeps no record of it (meshca's role signs with no_store): give the "
                    "certificate (--certificate FILE)") from None
            raise
        return Revocation("serial", f"{number:x}", reason, now, None, self.ca.active_intermediate_id, number)


def _update_vault(config: Path, mode: str, clock: Clock, change: Callable[[str, Any], Change]) -> tuple[RevocationList, str]:
    """The Vault modes: the list in the config's state dir (or etcd with `store:`); Vault revokes what it signed."""
    import logging

    from meshca.ca.backends import build_ca_backend
    from meshca.ca.vault.intermediate import is_vault_state_dir
    from meshca.config import read_state_dir, read_store_settings

    state_dir = read_state_dir(config)
    if mode == "vault-intermediate" and not is_vault_state_dir(state_dir):
        raise CaError(f"{state_dir}: no vault-intermediate CA yet (`meshca serve --config {config}` creates it)")
    backend = build_ca_backend(config, clock, logging.getLogger("meshca.cli.revoke"))
    mount = str(getattr(backend.ca, "mount", None) or getattr(getattr(backend.ca, "options", None), "mount", "pki"))
    signers = backend.ca.crl_signers()  # type: ignore[attr-defined]
    context = _VaultCa(mode, backend.ca, backend.vault, mount, signers)
    trust_domain = backend.ca.trust_domain
    store = read_store_settings(config)
    if store is not None:
        from meshca.store.revocation import update_list_in_store

        return update_list_in_store(store, change(trust_domain, context))
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    after = StateDirRevocations(state_dir).update(change(trust_domain, context))
    return after, str(state_dir / "revocations.json")
