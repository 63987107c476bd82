"""`meshca demo`: meshca, two services with real Envoy sidecars, and an intruder."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshca.cli.errors import CliError
from meshca.clock import system_clock
from meshca.fields import parse_duration


def cmd_demo(args: argparse.Namespace) -> int:
    from meshca.dev.demo import DemoSettings, run_demo

    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    if args.requests < 1:
        raise CliError("--requests must be at least 1")
    def duration(value: str | None, option: str) -> timedelta | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as error:
            raise CliError(f"{option}: {error}") from None

    try:
        settings = DemoSettings(
            check=args.check,
            requests=args.requests,
            workdir=workdir,
            # the HA run watches leaves rotate across the failovers: 20 s unless told
            cert_ttl=duration(args.cert_ttl, "--cert-ttl") or (timedelta(seconds=20) if args.ha else None),
            duration=duration(args.duration, "--duration"),
            rotate_intermediate_at=duration(args.rotate_intermediate_at, "--rotate-intermediate-at"),
            ca=args.ca,
            ha=args.ha,
            agent=args.agent,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    if settings.ha and not settings.check:
        raise CliError("--ha needs --check (it kills a replica and the etcd leader, then reports)")
    if settings.duration is not None and not settings.check:
        raise CliError("--duration needs --check")
    try:
        return run_demo(settings, sys.stdout, system_clock)
    except (RuntimeError, TimeoutError, OSError) as error:
        raise CliError(f"demo failed: {error}") from None


def add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="start meshca, two services with real Envoy sidecars, and show them talking mTLS"
    )
    demo.add_argument("--check", action="store_true", help="headless: fixed requests, JSON summary, exit status")
    demo.add_argument("--requests", type=int, default=20, help="requests sent with --check")
    demo.add_argument("--workdir", help="keep everything in this directory (default: a temporary one)")
    demo.add_argument("--cert-ttl", help="workload certificate lifetime, e.g. 20s, to watch rotation")
    demo.add_argument("--duration", help="with --check: send traffic for this long (e.g. 60s) instead of --requests")
    demo.add_argument(
        "--ca",
        choices=["internal", "vault", "vault-leaf"],
        default="internal",
        help="vault: the root lives in OpenBao/Vault (VAULT_ADDR+VAULT_TOKEN, or a dev server the demo starts)",
    )
    demo.add_argument(
        "--ha",
        action="store_true",
        help="with --check: three etcd members and three meshca replicas; kill -9 a replica and the etcd leader "
        "under traffic (20 s certificates, 40 s unless --duration)",
    )
    demo.add_argument(
        "--agent",
        action="store_true",
        help="agent mode: one `meshca agent` makes every sidecar's key and serves it over a Unix socket, and "
        "registers the backend's endpoint; meshca sends no private key (docs/demo.md)",
    )
    demo.add_argument(
        "--rotate-intermediate-at", help="with --duration: force an intermediate CA rotation this far in (e.g. 25s)"
    )
    demo.set_defaults(handler=cmd_demo)
