"""`meshca audit verify` (check the audit logs' hash chains) and `meshca certs list` (the issued certificates)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshca.audit import CertificateEntry, chain_files, format_time, inventory, read_records, verify_file
from meshca.cli.errors import CliError
from meshca.clock import Clock, system_clock


def audit_files(files: Sequence[str], config: str | None) -> list[Path]:
    """The files given, or those of a serve config's `audit.path` (with its --workers files)."""
    if files:
        return [Path(name) for name in files]
    if config is None:
        raise CliError("give audit log FILE(s) or --config (a `meshca serve` settings file)")
    from meshca.config import read_audit_settings

    settings = read_audit_settings(Path(config))
    if settings.path is None:
        raise CliError(f"{config}: the audit log is off (audit: false, or store: without audit.path)")
    found = chain_files(settings.path)
    if not found:
        raise CliError(f"{config}: no audit log at {settings.path} yet (nothing issued, or serve never ran)")
    return found


def cmd_verify(args: argparse.Namespace) -> int:
    failed = False
    for path in audit_files(args.files, args.config):
        result = verify_file(path)
        if result.ok:
            print(result.summary())
        else:
            failed = True
            print(f"meshca: audit: {result.summary()}", file=sys.stderr)
    return 1 if failed else 0


def format_entries(entries: Sequence[CertificateEntry]) -> str:
    if not entries:
        return "no certificates"
    header = ["SPIFFE ID", "SERIAL", "ISSUER", "NOT BEFORE", "NOT AFTER", "NODE", "REPLICA", "STATE"]
    rows = [[e.spiffe_id, e.serial, e.issuer or "-", format_time(e.not_before) if e.not_before else "-",
             format_time(e.not_after), e.node_id or "-", e.replica, e.state] for e in entries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def list_certificates(args: argparse.Namespace, clock: Clock = system_clock) -> list[CertificateEntry]:
    records: list[dict[str, Any]] = []
    for path in audit_files(args.audit or [], args.config):
        result = verify_file(path)
        if not result.ok:
            print(f"meshca: warning: {result.summary()} (listed anyway)", file=sys.stderr)
        records += read_records(path)
    entries = inventory(records, clock())
    if args.spiffe_id is not None:
        entries = [e for e in entries if e.spiffe_id == args.spiffe_id]
    if args.valid:
        entries = [e for e in entries if e.state == "valid"]
    return entries


def cmd_certs_list(args: argparse.Namespace) -> int:
    entries = list_certificates(args)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    else:
        print(format_entries(entries))
    return 0


def add_audit_parsers(commands: Any) -> None:
    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser(
        "verify", help="check audit logs' hash chains: exit 0 and a summary, or 1 naming the first bad line"
    )
    verify.add_argument("files", nargs="*", metavar="FILE", help="audit log files (default: those of --config)")
    verify.add_argument("--config", metavar="FILE", help="a `meshca serve` settings file: check its audit log(s)")
    verify.set_defaults(handler=cmd_verify)

    certs = commands.add_parser("certs", help="issued certificates").add_subparsers(dest="certs_command", required=True)
    listing = certs.add_parser("list", help="the certificates issued, from the audit log(s), with their state")
    listing.add_argument("--audit", nargs="+", metavar="FILE", help="audit log files")
    listing.add_argument("--config", metavar="FILE", help="a `meshca serve` settings file: read its audit log(s)")
    listing.add_argument("--spiffe-id", metavar="ID", help="only this identity's certificates")
    listing.add_argument("--valid", action="store_true", help="only certificates valid now (not expired or revoked)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(handler=cmd_certs_list)
