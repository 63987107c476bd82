"""`meshca ca taint --intermediate ID`: a new intermediate signs at once; the tainted one is revoked after the herd
window (a state dir, or a serve config's internal CA: with `store:`, the one in etcd)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from meshca.ca.api import CaError
from meshca.ca.revocation import StateDirRevocations
from meshca.ca.taint import (
    REVOKE_MARGIN,
    TaintOutcome,
    TaintRefused,
    default_revoke_after,
    taint_intermediate,
)
from meshca.clock import Clock, format_duration, system_clock
from meshca.fields import parse_duration
from meshca.sds.rotation import RotationSettings

if TYPE_CHECKING:
    from meshca.store.etcd import EtcdSettings, EtcdStore


def add_taint_parser(ca: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    taint = ca.add_parser(
        "taint",
        help="replace an intermediate at once, re-issue its leaves, then revoke it (a leaked intermediate)",
        description="The active intermediate is replaced at once (`ca rotate --intermediate --now`), and its "
        "revocation is recorded to take effect after the herd window: until then every running `meshca serve` "
        "re-issues the leaves it signed; from then on every Envoy's CRLs list it, so a handshake with a leftover "
        "leaf fails. An old intermediate that still has leaves is only revoked so. No process has to stay up: "
        "the delayed entry is in the revocation list (revocations.json, or etcd with `store:`). Only the "
        "internal CA: in the Vault modes rotate and revoke in Vault.",
    )
    taint.add_argument("--intermediate", required=True, help="the intermediate's slot id (meshca ca status)")
    taint.add_argument("--reason", default="keyCompromise", help="RFC 5280 reason (default keyCompromise)")
    taint.add_argument(
        "--revoke-after",
        help="how long after now the revocation takes effect (e.g. 90s, 10m); default: the serve config's "
        f"rotation.reissue_window (5m without --config) plus {format_duration(REVOKE_MARGIN)}. 0 revokes at once: "
        "leaves not yet re-issued then fail",
    )
    where = taint.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the internal CA's state directory")
    where.add_argument("--config", help="a `meshca serve` config file: its state_dir, or its store")
    taint.set_defaults(handler=cmd_ca_taint)


def cmd_ca_taint(args: argparse.Namespace, out: TextIO | None = None, clock: Clock = system_clock) -> int:
    out = out or sys.stdout
    try:
        outcome, where = _taint(args, clock)
    except CaError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    effective = outcome.effective_at
    if outcome.already:
        out.write(f"nothing to do: intermediate {outcome.slot} is already tainted or revoked (recorded "
                  f"{outcome.entry.revoked_at.isoformat(timespec='seconds')}, in force from "
                  f"{effective.isoformat(timespec='seconds')}); the active intermediate is "
                  f"{outcome.active_intermediate_id}\n")
        return 0
    from meshca.cli.ca import format_events

    out.write(format_events(outcome.events))
    left = timedelta(seconds=max(round((effective - clock()).total_seconds()), 0))
    out.write(
        f"tainted intermediate {outcome.slot} (reason {outcome.entry.reason}); the active intermediate is "
        f"{outcome.active_intermediate_id}. Its revocation takes effect at {effective.isoformat(timespec='seconds')} "
        f"(in {format_duration(left)}): until then every running `meshca serve` re-issues the leaves it signed; "
        f"from then on every Envoy's CRLs list it (revocation list version {outcome.list_version} in {where})\n"
    )
    return 0


def _revoke_after(args: argparse.Namespace, rotation: RotationSettings) -> timedelta:
    if args.revoke_after is None:
        return default_revoke_after(rotation.reissue_window)
    try:
        return parse_duration(args.revoke_after)
    except ValueError as error:
        raise TaintRefused(f"--revoke-after: {error}") from None


def _taint(args: argparse.Namespace, clock: Clock) -> tuple[TaintOutcome, str]:
    """Taint where the config or state dir says; (what was done, where the revocation list is)."""
    rotation = RotationSettings()
    state_dir = Path(args.state_dir) if args.state_dir else None
    if args.config:
        from meshca.ca.backends import read_ca_mode
        from meshca.config import read_rotation_settings, read_state_dir, read_store_settings

        config = Path(args.config)
        mode = read_ca_mode(config)
        if mode != "internal":
            raise TaintRefused(
                f"{config}: ca.mode is {mode}: Vault signs these certificates; rotate the intermediate "
                "(`meshca ca rotate --intermediate --now`) and revoke the old one in Vault (pki/revoke)"
            )
        rotation = read_rotation_settings(config)
        store = read_store_settings(config)
        if store is not None:
            return _taint_in_store(args, store, clock, _revoke_after(args, rotation))
        state_dir = read_state_dir(config)
    assert state_dir is not None
    revoke_after = _revoke_after(args, rotation)
    from meshca.ca.internal import CertificateAuthority
    from meshca.ca.vault.intermediate import is_vault_state_dir

    if is_vault_state_dir(state_dir):
        raise TaintRefused(
            f"{state_dir} is a vault-intermediate CA: its root is in Vault, which must revoke the intermediate; "
            "rotate it (`meshca ca rotate --intermediate --now --config ...`) and revoke the old one in Vault"
        )
    ca = CertificateAuthority.load(state_dir, clock)
    source = StateDirRevocations(state_dir)
    outcome = taint_intermediate(ca, source.update, args.intermediate, args.reason, revoke_after, clock)
    return outcome, str(source.path)


def _taint_in_store(
    args: argparse.Namespace, settings: EtcdSettings, clock: Clock, revoke_after: timedelta
) -> tuple[TaintOutcome, str]:
    """The CA and the revocation list in etcd: the rotation and the entry are each one compare-and-swap."""
    from meshca.cli.ca import _with_store
    from meshca.store.ca import ReplicatedCa
    from meshca.store.revocation import REVOCATIONS_KEY, EtcdRevocations

    log = logging.getLogger("meshca.cli.taint")

    async def run(store: EtcdStore) -> TaintOutcome:
        ca = await ReplicatedCa.open(store, settings.kek, clock, log, watch=False)
        try:  # on a worker thread: the rotation and EtcdRevocations.update call the store's loop from there
            source = EtcdRevocations(store, log)
            return await asyncio.to_thread(
                taint_intermediate, ca, source.update, args.intermediate, args.reason, revoke_after, clock
            )
        finally:
            await ca.close()

    outcome: TaintOutcome = _with_store(settings, run)
    return outcome, f"etcd {settings.prefix}/{REVOCATIONS_KEY}"
