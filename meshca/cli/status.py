"""`meshca status`: each connected proxy's sync state, read from a running meshca's admin /status."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshca.admin.metrics import STATUS_TYPES
from meshca.admin.server import DEFAULT_ADMIN_HOST
from meshca.listen import format_address

DEFAULT_ADMIN_URL = "http://127.0.0.1:15011"
_SHORT_VERSION = 8


def short_version(version: str) -> str:
    """Each part of a layered version shortened ("<shared>+<identity's own>"): the first part alone is
    the same for every proxy, the rest is what tells them apart."""
    return "+".join(part[:_SHORT_VERSION] for part in version.split("+"))


def _cell(entry: Mapping[str, Any], short_name: str, last_nack: Mapping[str, Any] | None) -> str:
    sent, acked = entry.get("sent"), entry.get("acked")
    if sent is None and acked is None:
        return "-"
    shown = short_version(acked) if acked else "-"
    if acked == sent:
        state = "SYNCED"
    elif last_nack is not None and last_nack.get("type") == short_name:
        state = "NACK"
    else:
        state = "STALE"
    return f"{state} ({shown})"


def format_status(proxies_json: list[dict[str, Any]]) -> str:
    """A table like `istioctl proxy-status`: per type the ACKed version and SYNCED / STALE / NACK."""
    if not proxies_json:
        return "no proxies connected"
    fleet = any("replica" in proxy for proxy in proxies_json)  # replicas on a store: say which holds each proxy
    header = ["NODE", "IDENTITY", *(["REPLICA"] if fleet else []), *(t.short_name for t in STATUS_TYPES)]
    rows: list[tuple[list[str], str | None]] = []
    for proxy in proxies_json:
        types = proxy.get("types", {})
        nack = proxy.get("last_nack")
        cells = [
            str(proxy.get("node_id", "")),
            str(proxy.get("identity", "")),
            *([str(proxy.get("replica", ""))] if fleet else []),
            *(_cell(types.get(t.short_name, {}), t.short_name, nack) for t in STATUS_TYPES),
        ]
        note = None
        if nack is not None:
            message = " ".join(str(nack.get("message", "")).split())
            version = nack.get("rejected_version") or "-"
            note = f"  -> last NACK {nack.get('type')} (version {version}, {proxy.get('nacks', 0)} total): {message}"
        rows.append((cells, note))
    widths = [max(len(header[i]), *(len(cells[i]) for cells, _ in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    out = [line(header)]
    for cells, note in rows:
        out.append(line(cells))
        if note is not None:
            out.append(note)
    return "\n".join(out)


def fetch_status(admin_url: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """GET <admin>/status; raises urllib.error.URLError when unreachable."""
    with urllib.request.urlopen(admin_url.rstrip("/") + "/status", timeout=timeout) as response:
        return json.loads(response.read())


def admin_url(text: str) -> str:
    """`--admin`: a URL, or host:port meaning http://host:port."""
    text = text.strip()
    return text if "://" in text else f"http://{text}"


def admin_url_from_config(path: Path) -> str:
    """The admin endpoint a `meshca serve` config file sets up (metrics_port on admin_address)."""
    from meshca.fields import ConfigError, FieldReader, read_yaml_mapping

    reader = FieldReader(path, read_yaml_mapping(path))
    port = reader.get("metrics_port", int, None)
    if port is None:
        raise ConfigError(path, "metrics_port", "is not set, so `meshca serve` with this file has no admin endpoint")
    host = reader.get("admin_address", str, DEFAULT_ADMIN_HOST)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"  # listening on every address: ask on loopback
    elif host == "::":
        host = "::1"
    return f"http://{format_address(host, port)}"


def cmd_status(args: argparse.Namespace) -> int:
    admin = admin_url_from_config(Path(args.config)) if args.config else admin_url(args.admin)
    try:
        proxies = fetch_status(admin)
    except urllib.error.HTTPError as error:
        print(f"meshca: error: {admin}/status answered HTTP {error.code}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ConnectionRefusedError):
            reason = "connection refused"
        print(
            f"meshca: error: cannot reach the meshca admin endpoint at {admin}: {reason} "
            "(is `meshca serve` running with its metrics port there?)",
            file=sys.stderr,
        )
        return 2
    except ValueError as error:
        print(f"meshca: error: {admin}/status did not return JSON: {error}", file=sys.stderr)
        return 2
    print(json.dumps(proxies, indent=2) if args.json else format_status(proxies))
    return 0


def add_status_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `meshca status [--admin URL | --config FILE] [--json]` to the CLI's subparsers."""
    status = subparsers.add_parser("status", help="show each connected proxy's sync state (like proxy-status)")
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "--admin",
        default=DEFAULT_ADMIN_URL,
        metavar="URL|HOST:PORT",
        help=f"meshca admin endpoint (default {DEFAULT_ADMIN_URL})",
    )
    where.add_argument(
        "--config", metavar="FILE", help="a `meshca serve` config file: use its metrics_port and admin_address"
    )
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    status.set_defaults(handler=cmd_status)
    return status
