"""`meshca revoke` and `meshca unrevoke`: record a revocation of the internal CA (a state dir, or a serve config's
CA: with `store:`, the list in etcd); the running servers push the CRLs and deny revoked identities."""

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
        "one is listed too. Only the internal CA: in the Vault modes revoke in Vault.",
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
            raise CaError(
                f"{config}: ca.mode is {mode}: Vault signs these certificates and keeps their revocations; revoke "
                "in Vault (pki/revoke) — meshca distributes CRLs of its internal CA only"
            )
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
        raise CaError(f"{state_dir} is a vault-intermediate CA: its root is in Vault; revoke in Vault (pki/revoke)")
    ca = CertificateAuthority.load(state_dir, clock)
    after = StateDirRevocations(state_dir).update(change(ca.trust_domain, ca.crl_signers()))
    return after, str(state_dir / "revocations.json")
