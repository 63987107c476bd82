"""`meshca ca init|import|status|rotate`: create a CA, upload it to the store, show its slots, rotate them (a state
dir, or a serve config's CA: with `store:` and the internal CA, the one in etcd)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from meshca.ca import crypto
from meshca.ca.api import CaError, CaEvent, CaSettings, CaStatus, MeshCa
from meshca.ca.internal import CertificateAuthority
from meshca.clock import Clock, system_clock

if TYPE_CHECKING:
    from meshca.store.ca import ReplicatedCa
    from meshca.store.etcd import EtcdSettings, EtcdStore

T = TypeVar("T")


def cmd_ca_init(args: argparse.Namespace) -> int:
    settings = CaSettings(trust_domain=args.trust_domain, key_algorithm=crypto.KeyAlgorithm(args.key_algorithm))
    ca = CertificateAuthority.init(Path(args.state_dir), settings, system_clock)
    print(f"initialized CA for trust domain {ca.trust_domain} in {args.state_dir}")
    return 0


def add_ca_parsers(ca: Any) -> None:
    """Add `init`, `status` and `rotate` to the `meshca ca` subparsers (each sets `handler`)."""
    ca_init = ca.add_parser("init", help="create a new root and intermediate in a state directory")
    ca_init.add_argument("--state-dir", required=True, help="directory for the CA's keys and state (created 0700)")
    ca_init.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. mesh.example.com")
    ca_init.add_argument(
        "--key-algorithm",
        default=crypto.KeyAlgorithm.EC_P256.value,
        choices=[k.value for k in crypto.KeyAlgorithm],
        help=f"CA key type (default {crypto.KeyAlgorithm.EC_P256.value})",
    )
    ca_init.set_defaults(handler=cmd_ca_init)
    ca_import = ca.add_parser(
        "import",
        help="upload an internal CA's state directory to the store of a serve config (keys sealed with its KEK)",
        description="One transaction; refused when the store already holds a CA. The replicas then serve it "
        "(`state_dir` is no longer needed in their config).",
    )
    ca_import.add_argument("--config", required=True, help="a `meshca serve` config file with a `store:` section")
    ca_import.add_argument("--state-dir", required=True, help="the CA state directory to upload")
    ca_import.set_defaults(handler=cmd_ca_import)
    status = ca.add_parser("status", help="the CA's slots, expiries and trust bundle")
    _add_location(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_ca_status)

    rotate = ca.add_parser(
        "rotate",
        help="prepare the next intermediate or root (published, not signing); with --now activate it too",
        description="A running `meshca serve` on the same state directory picks the change up by itself. With "
        "--config naming a `store:`, the change is committed to etcd in one transaction conditioned only on the CA "
        "state it started from (this command is not the replicas' leader); every replica follows it.",
    )
    _add_location(rotate)
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--intermediate", action="store_true", help="rotate the intermediate CA")
    which.add_argument("--root", action="store_true", help="rotate the root CA (and its intermediate)")
    rotate.add_argument("--now", action="store_true", help="activate at once instead of at the scheduled point")
    rotate.set_defaults(handler=cmd_ca_rotate)


def _add_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the CA state directory")
    where.add_argument("--config", help="a `meshca serve` config file: use its state_dir")


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    from meshca.config import read_state_dir

    return read_state_dir(Path(args.config))


def _store_of(args: argparse.Namespace) -> EtcdSettings | None:
    """The serve config's `store:` when its CA is the internal one kept in etcd."""
    if not getattr(args, "config", None):
        return None
    from meshca.ca.backends import read_ca_mode
    from meshca.config import read_store_settings

    settings = read_store_settings(Path(args.config))
    if settings is None or read_ca_mode(Path(args.config)) != "internal":
        return None
    return settings


def _with_store(settings: EtcdSettings, action: Callable[[EtcdStore], Any]) -> Any:
    """Run `action(store)` (a coroutine function) on a connected store; etcd not answering is one CaError."""
    from meshca.store.etcd import StoreUnavailable
    from meshca.store.serving import run_with_store

    try:
        return run_with_store(settings, action, logging.getLogger("meshca.cli.store"))
    except StoreUnavailable as error:
        raise CaError(str(error)) from None


def _with_store_ca(settings: EtcdSettings, clock: Clock, action: Callable[[ReplicatedCa], T]) -> T:
    """`action(ca)` on the CA in etcd, run on a worker thread (its transitions reach etcd from there)."""
    from meshca.store.ca import ReplicatedCa

    async def run(store: EtcdStore) -> T:
        ca = await ReplicatedCa.open(store, settings.kek, clock, logging.getLogger("meshca.cli.ca"), watch=False)
        try:
            return await asyncio.to_thread(action, ca)
        finally:
            await ca.close()

    result: T = _with_store(settings, run)
    return result


def cmd_ca_import(args: argparse.Namespace, out: TextIO | None = None, clock: Clock = system_clock) -> int:
    out = out or sys.stdout
    from meshca.config import read_store_settings
    from meshca.store.ca import import_state_dir

    settings = read_store_settings(Path(args.config))
    if settings is None:
        print(f"meshca: error: {args.config}: no `store:` section: there is no store to import into", file=sys.stderr)
        return 2
    try:
        status = _with_store(settings, lambda store: import_state_dir(store, settings.kek, Path(args.state_dir), clock))
    except CaError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    out.write(f"imported the CA of trust domain {status.trust_domain} (generation {status.generation}, "
              f"intermediate {status.active_intermediate_id}) into {settings.prefix}/ca/ at "
              f"{', '.join(settings.endpoints)}\n")
    return 0


def _load_ca(args: argparse.Namespace, clock: Clock, *, needs_vault: bool = False) -> MeshCa:
    """The CA of a state dir, or (with --config) the backend the serve settings name, Vault included."""
    if args.config:
        import logging

        from meshca.ca.backends import build_ca_backend

        return build_ca_backend(Path(args.config), clock, logging.getLogger("meshca.cli.main")).ca
    state_dir = _state_dir(args)
    from meshca.ca.vault.intermediate import VaultIntermediateCa, is_vault_state_dir

    if is_vault_state_dir(state_dir):
        if needs_vault:
            raise CaError(
                f"{state_dir} is a vault-intermediate CA: a new intermediate must be signed by Vault, "
                "so pass --config <meshca.yaml> (its ca.vault section says how to reach Vault)"
            )
        return VaultIntermediateCa.load(state_dir, None, None, clock)
    return CertificateAuthority.load(state_dir, clock)


def cmd_ca_status(args: argparse.Namespace, out: TextIO | None = None, clock: Clock = system_clock) -> int:
    out = out or sys.stdout
    try:
        store = _store_of(args)
        status = _with_store_ca(store, clock, lambda ca: ca.status()) if store else _load_ca(args, clock).status()
    except CaError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status.to_json(), indent=2), file=out)
    else:
        out.write(format_status(status, clock()))
    return 0


def cmd_ca_rotate(args: argparse.Namespace, out: TextIO | None = None, clock: Clock = system_clock) -> int:
    out = out or sys.stdout
    kind = "root" if args.root else "intermediate"

    def rotate(ca: MeshCa) -> tuple[list[CaEvent], CaStatus]:
        if args.root and not ca.can_rotate_root:
            raise CaError("the root of this CA lives in Vault: rotate it there; meshca follows the new root")
        if not ca.can_rotate_intermediate:
            raise CaError("in vault-leaf mode Vault signs every leaf: there is no meshca intermediate to rotate")
        events = ca.rotate_root(now=args.now) if args.root else ca.rotate_intermediate(now=args.now)
        return events, ca.status()

    try:
        store = _store_of(args)
        events, status = _with_store_ca(store, clock, rotate) if store else rotate(_load_ca(args, clock, needs_vault=True))
    except CaError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    out.write(format_events(events))
    if not events:
        prepared = [s.id for s in status.slots if s.kind == kind and s.state == "prepared"]
        out.write(f"nothing to do: {kind} {', '.join(prepared)} is already prepared (add --now to activate it)\n")
    elif store:
        out.write(f"generation {status.generation} committed to etcd; every replica follows it\n")
    else:
        out.write(f"generation {status.generation}; a running `meshca serve` on this state directory picks it up\n")
    return 0


def format_events(events: Sequence[CaEvent]) -> str:
    lines = []
    for e in events:
        line = f"{e.event} {e.kind} {e.id} (generation {e.generation})"
        if e.retire_after is not None:
            line += f": its last leaf expires by {_when(e.retire_after)}, then it is pruned"
        lines.append(line + "\n")
    return "".join(lines)


def format_status(status: CaStatus, now: datetime) -> str:
    """The human-readable `meshca ca status`."""
    lines = [
        f"trust domain {status.trust_domain}, generation {status.generation}, "
        f"signing with intermediate {status.active_intermediate_id}",
        "",
        f"{'KIND':<13} {'ID':<17} {'STATE':<9} {'NOT AFTER':<21} {'LEFT':<9} {'RETIRE AFTER':<21} SUBJECT",
    ]
    for s in status.slots:
        retire = _when(s.retire_after) if s.retire_after else "-"
        lines.append(
            f"{s.kind:<13} {s.id:<17} {s.state:<9} {_when(s.not_after):<21} {_left(s.not_after, now):<9} "
            f"{retire:<21} {s.subject}"
        )
    lines += ["", f"trust bundle (ROOTCA, ALL, spiffe://{status.trust_domain}): {len(status.bundle)} root(s)"]
    for b in status.bundle:
        lines.append(f"  {b.state:<9} SHA-256 {b.fingerprint_sha256}  {b.subject}")
    return "\n".join(lines) + "\n"


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(not_after: datetime, now: datetime) -> str:
    seconds = int((not_after - now).total_seconds())
    if seconds <= 0:
        return "expired"
    days, rest = divmod(seconds, 86400)
    return f"{days}d{rest // 3600}h" if days else f"{rest // 3600}h{rest % 3600 // 60}m"
