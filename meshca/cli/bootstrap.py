"""`meshca bootstrap`: write the Envoy bootstrap for one node that gets everything else from meshca."""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from dataclasses import replace
from pathlib import Path

from meshca.files import write_atomic
from meshca.mesh.resources import AGENT_METADATA_KEY
from meshca.node.bootstrap import API_TYPES, BootstrapSettings, render_yaml

DEFAULT_MESHCA = "127.0.0.1:15010"
DEFAULT_SERVER_NAME = "meshca.local"
DEFAULT_ADMIN_PORT = 15000
DEFAULT_ADMIN_ADDRESS = "127.0.0.1"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")

_DESCRIPTION = """\
Write an Envoy bootstrap for one node: a static TLS cluster to meshca and ADS for everything
else (listeners, clusters, routes, endpoints and secrets). The node authenticates with a JWT,
either inline (--token) or re-read from a file on every new xDS stream (--token-file, the right
choice for rotating Kubernetes projected service-account tokens). Delta ADS by default. With
--check, connect to meshca as the node would and say in one line what fails. See docs/bootstrap.md.
"""


class BootstrapOptionError(ValueError):
    """A bad `meshca bootstrap` option; the message names the option."""


def _parse_host_port(option: str, text: str) -> tuple[str, int]:
    """'host:port', 'a.b.c.d:port' or '[v6]:port' -> (host, port), else a message naming `option`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise BootstrapOptionError(f"{option}: {text!r} is not HOST:PORT (e.g. meshca.example.com:15010)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BootstrapOptionError(f"{option}: {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise BootstrapOptionError(f"{option}: {text!r}: write an IPv6 address in brackets, e.g. [::1]:15010")
    elif not _is_ip(host) and not _HOSTNAME.match(host):
        raise BootstrapOptionError(f"{option}: {text!r}: {host!r} is not a host name or IP address")
    return host, _port(option, port, 1)


def _parse_meshca_addresses(values: list[str] | str | None) -> tuple[tuple[str, int], ...]:
    """Every `--meshca` (repeated, or comma-separated) as (host, port), in order; the default when none."""
    texts = [values] if isinstance(values, str) else list(values or [DEFAULT_MESHCA])
    endpoints: list[tuple[str, int]] = []
    for text in texts:
        for item in text.split(","):
            endpoint = _parse_host_port("--meshca", item.strip())
            if endpoint in endpoints:
                raise BootstrapOptionError(f"--meshca: {item.strip()!r} is given twice")
            endpoints.append(endpoint)
    return tuple(endpoints)


def _port(option: str, text: str, lowest: int) -> int:
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise BootstrapOptionError(f"{option}: {text!r} is not a port number in {lowest}..65535")
    return int(text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_metadata(items: list[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BootstrapOptionError(f"--metadata: {item!r} is not KEY=VALUE (e.g. --metadata NAMESPACE=shop)")
        if key in metadata:
            raise BootstrapOptionError(f"--metadata: key {key!r} is given twice")
        metadata[key] = value
    return metadata


def _non_empty(option: str, value: str) -> str:
    if not value or not value.strip():
        raise BootstrapOptionError(f"{option}: must not be empty")
    if any(c.isspace() for c in value):
        raise BootstrapOptionError(f"{option}: {value!r} must not contain whitespace")
    return value


def _check_token(token: str) -> str:
    if token.lower().startswith("bearer "):
        raise BootstrapOptionError("--token: pass the bare JWT, without the 'Bearer ' prefix")
    if not token or any(c.isspace() or c == "\0" for c in token):
        raise BootstrapOptionError("--token: must be a non-empty JWT without whitespace or newlines")
    if token.count(".") != 2:
        raise BootstrapOptionError("--token: does not look like a JWT (expected header.payload.signature)")
    return token


def _check_ca_file(path: Path) -> None:
    """--ca must be certificates only: a private key there is a mistake that would leak it to every node."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BootstrapOptionError(f"--ca: cannot read {str(path)!r} ({error.strerror})") from None
    if b"PRIVATE KEY-----" in data:
        raise BootstrapOptionError(
            f"--ca: {str(path)!r} holds a private key; pass meshca's root certificate bundle (root.pem), "
            "and keep that key out of the nodes' reach"
        )
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise BootstrapOptionError(f"--ca: {str(path)!r} holds no PEM certificate (expected meshca's root.pem)")


def _trust_dir_files(directory: Path) -> tuple[Path, Path]:
    """(the PEM bundle, the SDS document) that `meshca trust sync` keeps in --trust-dir; both must exist."""
    from meshca.node.trust import TRUST_PEM_FILE, TRUST_SDS_FILE

    directory = directory.absolute()
    if not directory.is_dir():
        raise BootstrapOptionError(f"--trust-dir: directory {str(directory)!r} does not exist")
    pem, sds = directory / TRUST_PEM_FILE, directory / TRUST_SDS_FILE
    for path in (pem, sds):
        if not path.is_file():
            raise BootstrapOptionError(
                f"--trust-dir: {str(path)!r} does not exist; run `meshca trust sync --dir {directory} --ca ROOT.pem` "
                "first (Envoy needs it at start)"
            )
    try:
        _check_ca_file(pem)
    except BootstrapOptionError as error:
        raise BootstrapOptionError(str(error).replace("--ca:", "--trust-dir:", 1)) from None
    return pem, sds


def _check_token_sds(directory: Path, token_path: Path) -> None:
    """With --trust-dir, Envoy reads the token file through the SDS document `meshca trust sync --token-file`
    keeps in the directory: it must be there and name this --token-file."""
    from meshca.node.bootstrap import TOKEN_SDS_FILE
    from meshca.node.trust import token_sds_document

    path = directory / TOKEN_SDS_FILE
    fix = f"run `meshca trust sync --dir {directory} --token-file {token_path} ...` first"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BootstrapOptionError(f"--trust-dir: {str(path)!r} does not exist; {fix}") from None
    except OSError as error:
        raise BootstrapOptionError(f"--trust-dir: cannot read {str(path)!r} ({error.strerror})") from None
    if data != token_sds_document(token_path):
        raise BootstrapOptionError(f"--trust-dir: {str(path)!r} does not name --token-file {token_path}; {fix}")


def token_file_warnings(path: Path) -> list[str]:
    """Problems with a token file that Envoy would only reveal as failing streams."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [f"--token-file {path} does not exist yet; Envoy's xDS streams fail until it does"]
    except OSError as error:
        return [f"--token-file {path} is not readable here ({error.strerror}); make sure Envoy can read it"]
    warnings = []
    if data.endswith(b"\n"):
        warnings.append(
            f"--token-file {path} ends with a newline: Envoy sends the file verbatim, so every xDS "
            "stream fails with code 13 (INTERNAL); write it without one, e.g. printf '%s' \"$TOKEN\" > FILE"
        )
    if data.lower().startswith(b"bearer "):
        warnings.append(f"--token-file {path} starts with 'Bearer ': the file must hold the bare JWT only")
    return warnings


def settings_from_args(args: argparse.Namespace) -> tuple[BootstrapSettings, list[str]]:
    """Validated BootstrapSettings and warnings for stderr; BootstrapOptionError names a bad option."""
    if (args.token is None) == (args.token_file is None):
        raise BootstrapOptionError("exactly one of --token TOKEN or --token-file FILE is required")
    node_id = _non_empty("--node-id", args.node_id)
    cluster = _non_empty("--cluster", args.cluster)
    server_name = _non_empty("--server-name", args.server_name)
    endpoints = _parse_meshca_addresses(args.meshca)
    trust_sds_path: Path | None = None
    if getattr(args, "trust_dir", None):
        ca_path, trust_sds_path = _trust_dir_files(Path(args.trust_dir).expanduser())
    else:
        ca_path = Path(args.ca).expanduser()
        if not ca_path.is_file():
            raise BootstrapOptionError(
                f"--ca: file {str(ca_path)!r} does not exist (meshca's root bundle, e.g. root.pem)"
            )
        _check_ca_file(ca_path)
        # Envoy resolves relative file names against its own working directory: make them absolute.
        ca_path = ca_path.resolve()
    admin_port = _port("--admin-port", str(args.admin_port), 0)
    if not _is_ip(args.admin_address):
        raise BootstrapOptionError(
            f"--admin-address: {args.admin_address!r} is not an IP address (Envoy's admin listener needs one)"
        )
    metadata = _parse_metadata(list(args.metadata or []))
    agent_socket: Path | None = None
    if getattr(args, "agent_socket", None) is not None:
        if not args.agent_socket.strip():
            raise BootstrapOptionError("--agent-socket: must not be empty")
        agent_socket = Path(args.agent_socket).expanduser().absolute()
        if agent_socket.is_dir():
            raise BootstrapOptionError(f"--agent-socket: {str(agent_socket)!r} is a directory")
    if AGENT_METADATA_KEY in metadata:
        raise BootstrapOptionError(f"--metadata: key {AGENT_METADATA_KEY!r} is set by --agent-socket only")
    warnings: list[str] = []
    token: str | None = None
    token_path: Path | None = None
    if args.token is not None:
        token = _check_token(args.token)
    else:
        if not args.token_file:
            raise BootstrapOptionError("--token-file: must not be empty")
        token_path = Path(args.token_file).expanduser().absolute()
        if token_path.is_dir():
            raise BootstrapOptionError(f"--token-file: {str(token_path)!r} is a directory")
        warnings += token_file_warnings(token_path)
        if trust_sds_path is not None:
            _check_token_sds(trust_sds_path.parent, token_path)
    try:
        settings = BootstrapSettings(
            node_id=node_id,
            cluster=cluster,
            meshca_address=endpoints[0][0],
            meshca_port=endpoints[0][1],
            more_meshca=endpoints[1:],
            meshca_ca_path=ca_path,
            meshca_server_name=server_name,
            token=token,
            token_path=token_path,
            admin_port=admin_port,
            admin_address=args.admin_address,
            node_metadata=metadata,
            api_type=args.api_type,
            meshca_trust_sds_path=trust_sds_path,
            agent_socket=agent_socket,
        )
    except ValueError as error:  # the checks above should catch everything; keep it one line
        raise BootstrapOptionError(str(error)) from None
    return settings, warnings


def _header(settings: BootstrapSettings) -> str:
    if settings.token_path is None:
        source = "inline token: this file is a credential, keep it private (mode 0600)"
    elif settings.uses_google_grpc:
        source = f"token re-read from {settings.token_path} on every new stream"
    else:
        source = f"token read from {settings.token_path} again whenever it is replaced, sent on every new stream"
    agent = (
        ""
        if settings.agent_socket is None
        else f"# agent mode: certificate, key and trust bundle from the local agent at {settings.agent_socket}\n"
    )
    return (
        "# Envoy bootstrap written by `meshca bootstrap`; everything else comes from meshca over ADS.\n"
        f"# node.id {settings.node_id!r}: must satisfy meshca's node binding (docs/identity.md).\n"
        f"# {source}\n{agent}"
    )


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Handler for `meshca bootstrap`: 0 on success, 2 (one line on stderr) on a bad option."""
    try:
        settings, warnings = settings_from_args(args)
    except BootstrapOptionError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"meshca: warning: {warning}", file=sys.stderr)
    text = _header(settings) + render_yaml(settings)
    if args.out in (None, "-"):
        if getattr(args, "check", False):
            return _run_check(settings)
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"meshca: error: --out: directory {str(out.parent)!r} does not exist", file=sys.stderr)
        return 2
    mode = 0o600 if settings.token is not None else 0o644
    try:
        write_atomic(out, text.encode(), mode)
    except OSError as error:
        print(f"meshca: error: --out: cannot write {str(out)!r}: {error.strerror}", file=sys.stderr)
        return 2
    return _run_check(settings) if getattr(args, "check", False) else 0


def _run_check(settings: BootstrapSettings) -> int:
    """One line per meshca address on stdout; 0 when every one admitted the node, 1 otherwise."""
    from meshca.node.check import check_bootstrap

    ok = True
    for address, port in settings.meshca_endpoints:  # each replica on its own line
        result = check_bootstrap(replace(settings, meshca_address=address, meshca_port=port, more_meshca=()))
        print(f"meshca: {result.line}", flush=True)
        ok = ok and result.ok
    return 0 if ok else 1


def add_bootstrap_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add `bootstrap` to the `meshca` subcommands (the object returned by add_subparsers)."""
    parser = subparsers.add_parser(
        "bootstrap",
        help="write an Envoy bootstrap for one node (ADS over TLS to meshca, JWT auth)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--node-id", required=True, help="Envoy node.id; must match the token's binding")
    parser.add_argument("--cluster", required=True, help="Envoy node.cluster: the service name")
    parser.add_argument(
        "--meshca",
        action="append",
        metavar="HOST:PORT",
        help=f"meshca's gRPC address (default {DEFAULT_MESHCA}); repeat it or give a comma list for several "
        "replicas: one control-plane cluster with all of them, a proxy whose replica dies reconnects to another",
    )
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--ca", metavar="FILE", help="meshca's root bundle (root.pem), read once at Envoy's start")
    trust.add_argument(
        "--trust-dir",
        metavar="DIR",
        help="the directory `meshca trust sync` keeps current: Envoy takes meshca's trust from its SDS file and "
        "reloads it on every change, so the node follows root rotations (docs/trust.md, root rotation)",
    )
    parser.add_argument(
        "--server-name",
        default=DEFAULT_SERVER_NAME,
        help=f"DNS name in meshca's server certificate, checked by Envoy (default {DEFAULT_SERVER_NAME})",
    )
    parser.add_argument("--token", help="JWT embedded in the bootstrap (the output becomes a secret, mode 0600)")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the JWT, re-read by Envoy on every new stream (recommended for rotating tokens)",
    )
    parser.add_argument("--admin-port", default=str(DEFAULT_ADMIN_PORT), help="Envoy admin port (0: any free port)")
    parser.add_argument("--admin-address", default=DEFAULT_ADMIN_ADDRESS, help="Envoy admin IP address")
    parser.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node metadata (repeatable), e.g. NAMESPACE=shop SERVICE_ACCOUNT=web",
    )
    parser.add_argument(
        "--api-type",
        default="DELTA_GRPC",
        choices=API_TYPES,
        help="ADS flavour: DELTA_GRPC (incremental, the default) or GRPC (state of the world)",
    )
    parser.add_argument(
        "--agent-socket",
        metavar="PATH",
        help="agent mode: take the certificate, its key and the trust bundle over SDS from the local `meshca agent` "
        "on this Unix socket; meshca then sends this node no secret at all (docs/agent.md)",
    )
    parser.add_argument("--out", metavar="FILE", help="write here (atomically) instead of stdout")
    parser.add_argument(
        "--check",
        action="store_true",
        help="connect to meshca with this bootstrap's CA, server name, token and node and say in one line "
        "what fails (exit 1) or that meshca admits the node (exit 0); without --out nothing is written",
    )
    parser.set_defaults(handler=cmd_bootstrap)
    return parser
