"""`meshca trust sync`: keep a node's copy of meshca's trust bundle current, for the Envoy that reads it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

from meshca.cli.bootstrap import DEFAULT_MESHCA, DEFAULT_SERVER_NAME, BootstrapOptionError, _parse_meshca_addresses
from meshca.cli.errors import CliError
from meshca.fields import parse_duration
from meshca.node.bootstrap import TOKEN_SDS_FILE
from meshca.node.trust import TRUST_PEM_FILE, TRUST_SDS_FILE, TrustSyncError, TrustSyncSettings, sync_loop, sync_once

DEFAULT_INTERVAL = timedelta(seconds=60)

_DESCRIPTION = f"""\
Fetch meshca's current trust bundle (every root in its bundle, as a SPIFFE bundle) and write it into
DIR as {TRUST_PEM_FILE} and {TRUST_SDS_FILE} (a file-based SDS secret that Envoy reloads when it is
replaced). meshca's certificate is verified with the bundle DIR already holds (the first time with
--ca), so the chain of trust carries on across root rotations; a meshca that cannot be verified is
an error and nothing is written. With --watch, sync every --interval; a failed sync keeps the last
bundle, says so in one line and is retried. See docs/trust.md (root rotation).
"""


def _settings(args: argparse.Namespace) -> TrustSyncSettings:
    try:
        endpoints = _parse_meshca_addresses(args.meshca)
    except BootstrapOptionError as error:
        raise CliError(str(error)) from None
    directory = Path(args.dir).expanduser().absolute()
    if not directory.is_dir():
        raise CliError(f"--dir: directory {directory} does not exist")
    initial_ca = Path(args.ca).expanduser().absolute() if args.ca else None
    if initial_ca is not None and not initial_ca.is_file():
        raise CliError(f"--ca: file {initial_ca} does not exist (meshca's root bundle, e.g. root.pem)")
    if not args.server_name or any(c.isspace() for c in args.server_name):
        raise CliError(f"--server-name: {args.server_name!r} is not a DNS name")
    token_file = Path(args.token_file).expanduser().absolute() if args.token_file else None
    if token_file is not None and token_file.is_dir():
        raise CliError(f"--token-file: {token_file} is a directory")
    return TrustSyncSettings(endpoints, args.server_name, directory, initial_ca, timeout=args.timeout,
                             token_file=token_file)


def _duration(option: str, text: str) -> timedelta:
    try:
        value = parse_duration(text)
    except ValueError as error:
        raise CliError(f"{option}: {error}") from None
    if value <= timedelta(0):
        raise CliError(f"{option}: must be positive")
    return value


def cmd_trust_sync(args: argparse.Namespace) -> int:
    settings = _settings(args)
    interval = _duration("--interval", args.interval)
    if not args.watch:
        try:
            result = sync_once(settings)
        except TrustSyncError as error:
            print(f"meshca: trust sync failed: {error}", file=sys.stderr)
            return 1
        print(f"meshca: {result.line}")
        return 0
    logger = logging.getLogger("meshca.trust")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("meshca: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logger.info("trust sync: every %gs into %s", interval.total_seconds(), settings.directory)
    sync_loop(settings, interval, logger, stop)
    return 0


def add_trust_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `trust sync` to the `meshca` subcommands."""
    trust = subparsers.add_parser("trust", help="the node's copy of meshca's trust bundle").add_subparsers(
        dest="trust_command", required=True
    )
    parser = trust.add_parser(
        "sync",
        help="fetch meshca's trust bundle into a directory Envoy reloads (once, or --watch)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--meshca", action="append", metavar="HOST:PORT",
                        help=f"meshca's gRPC address (default {DEFAULT_MESHCA}); repeat it for several replicas")
    parser.add_argument("--server-name", default=DEFAULT_SERVER_NAME,
                        help=f"DNS name meshca's certificate must carry (default {DEFAULT_SERVER_NAME})")
    parser.add_argument("--dir", required=True, metavar="DIR",
                        help=f"where {TRUST_PEM_FILE} and {TRUST_SDS_FILE} are kept (e.g. /etc/envoy/meshca-trust)")
    parser.add_argument("--ca", metavar="FILE",
                        help="day-one root bundle, used only while DIR holds no bundle yet")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"also keep {TOKEN_SDS_FILE} in DIR, which makes Envoy read this token file (with "
                        "`meshca bootstrap --trust-dir DIR --token-file FILE`)")
    parser.add_argument("--watch", action="store_true", help="keep syncing every --interval until stopped")
    parser.add_argument("--interval", default="60s",
                        help="time between syncs with --watch (default 60s); keep it well inside meshca's "
                        "root rotation overlap")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for one fetch (default 10)")
    parser.set_defaults(handler=cmd_trust_sync)
