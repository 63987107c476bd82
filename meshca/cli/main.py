"""The `meshca` entry point: the parser of every command, the ca init/dev/serve/demo handlers, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from meshca.ca import crypto
from meshca.ca.api import CaError, CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import format_duration, system_clock
from meshca.config import load_serve_settings
from meshca.fields import ConfigError, parse_duration
from meshca.files import describe_os_error, write_atomic
from meshca.listen import ListenError, check_bindable


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def cmd_ca_init(args: argparse.Namespace) -> int:
    settings = CaSettings(trust_domain=args.trust_domain, key_algorithm=crypto.KeyAlgorithm(args.key_algorithm))
    ca = CertificateAuthority.init(Path(args.state_dir), settings, system_clock)
    print(f"initialized CA for trust domain {ca.trust_domain} in {args.state_dir}")
    return 0


def cmd_dev_init(args: argparse.Namespace) -> int:
    from meshca.dev.material import DEV_METRICS_PORT, SAMPLE_MESH_FILE, create_dev_material

    material = create_dev_material(
        Path(args.dir), args.trust_domain, system_clock, force=args.force, sample_mesh=True,
        metrics_port=DEV_METRICS_PORT,
    )
    print(f"dev material for trust domain {args.trust_domain} written to {material.directory}")
    print(f"  mesh:   {material.directory / SAMPLE_MESH_FILE} (frontend -> backend over mTLS)")
    print(f"  serve:  meshca serve --config {material.serve_config}   (admin/status on 127.0.0.1:{DEV_METRICS_PORT})")
    print(f"  token:  meshca dev token --dir {material.directory} --namespace shop --service-account frontend --node-id frontend-1")
    print("  next:   README.md, 'Running meshca yourself'")
    return 0


def cmd_dev_token(args: argparse.Namespace) -> int:
    from meshca.dev.tokens import SIGNING_KEY_FILE, mint_token

    key_path = Path(args.dir) / SIGNING_KEY_FILE
    if not key_path.exists():
        raise CliError(f"{key_path} does not exist; run `meshca dev init --dir {args.dir}` first")
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as error:
        raise CliError(f"--ttl: {error}") from None
    token = mint_token(
        key_path.read_bytes(),
        namespace=args.ns,
        service_account=args.sa,
        node_id=args.node_id,
        ttl=ttl,
        now=system_clock(),
    )
    if args.out:
        write_atomic(Path(args.out), token.encode(), 0o600)
    else:
        print(token)
    return 0


def _read_setting_file(config_path: Path, field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(config_path, field, f"cannot read {path}: {error.strerror or error}") from None


async def _serve(config_path: Path) -> int:
    from meshca import logs
    from meshca.app import MeshcaApp, ServerCredentials, issue_server_credentials
    from meshca.ca.backends import build_ca_backend
    from meshca.gcpolicy import tune_gc_for_serving

    tune_gc_for_serving()
    log = logs.configure("info")
    backend = build_ca_backend(config_path, system_clock, log)
    ca = backend.ca
    settings = load_serve_settings(config_path, ca.trust_domain)
    if settings.leaf_ttl is not None and not (
        ca.settings.leaf_ttl_min <= settings.leaf_ttl <= ca.settings.leaf_ttl_max
    ):
        raise ConfigError(
            config_path,
            "leaf_ttl",
            f"{format_duration(settings.leaf_ttl)} is outside the CA's leaf TTL bounds "
            f"[{format_duration(ca.settings.leaf_ttl_min)}, {format_duration(ca.settings.leaf_ttl_max)}] "
            "(set at `meshca ca init`)",
        )
    log = logs.configure(settings.log_level)
    # a taken port fails now, before the mesh is loaded and logged (MeshcaApp.start checks again when it binds)
    check_bindable("listen", settings.listen_host, settings.listen_port)
    if settings.metrics_port is not None:
        check_bindable("metrics_port", settings.admin_address, settings.metrics_port)
    app = MeshcaApp(
        ca,
        settings.issuers,
        system_clock,
        log,
        settings.leaf_ttl,
        settings.rotation,
        backend.vault,
        xds_send_timeout=settings.xds_send_timeout,
        identity_grace=settings.identity_grace,
        xds_max_stream_age=settings.xds_max_stream_age,
    )
    if settings.server_tls is not None:
        credentials = ServerCredentials(
            _read_setting_file(config_path, "tls.certificate_chain", settings.server_tls.certificate_chain),
            _read_setting_file(config_path, "tls.private_key", settings.server_tls.private_key),
        )
    else:
        credentials = issue_server_credentials(ca, settings.server_names, timedelta(days=30))
    source_task = None
    if settings.mesh_file is not None:
        from meshca.mesh.source import FileMeshSource

        source = FileMeshSource(settings.mesh_file, app, log.getChild("mesh-source"))
        source.load()  # an invalid mesh at start is an error: there is no last good config yet
        source_task = asyncio.create_task(source.run())
    await app.start(
        settings.listen_host, settings.listen_port, credentials, settings.metrics_port, settings.admin_address
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("signal received: stopping gracefully")
    if source_task is not None:
        source_task.cancel()
    await app.stop(grace=5)
    return 0


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

    settings = DemoSettings(
        check=args.check,
        requests=args.requests,
        workdir=workdir,
        cert_ttl=duration(args.cert_ttl, "--cert-ttl"),
        duration=duration(args.duration, "--duration"),
        rotate_intermediate_at=duration(args.rotate_intermediate_at, "--rotate-intermediate-at"),
        ca=args.ca,
    )
    if settings.duration is not None and not settings.check:
        raise CliError("--duration needs --check")
    try:
        return run_demo(settings, sys.stdout, system_clock)
    except (RuntimeError, TimeoutError, OSError) as error:
        raise CliError(f"demo failed: {error}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(Path(args.config)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshca",
        usage="meshca [-h] [--version] COMMAND ...",
        description="Secrets and certificates for Envoy meshes: CA, JWT identity gate, xDS/SDS server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meshca {_version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="meshca"
    )

    ca = commands.add_parser("ca", help="certificate authority").add_subparsers(dest="ca_command", required=True)
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
    from meshca.cli.ca import add_ca_parsers

    add_ca_parsers(ca)

    dev = commands.add_parser("dev", help="development material (not for production)").add_subparsers(
        dest="dev_command", required=True
    )
    dev_init = dev.add_parser("init", help="fill a directory with a dev CA, server TLS and a JWT issuer")
    dev_init.add_argument("--dir", default="certs-dev", help="directory to fill (default certs-dev)")
    dev_init.add_argument("--trust-domain", default="mesh.local", help="SPIFFE trust domain (default mesh.local)")
    dev_init.add_argument("--force", action="store_true", help="replace existing dev material")
    dev_init.set_defaults(handler=cmd_dev_init)
    dev_token = dev.add_parser("token", help="print a dev JWT for a Kubernetes-style identity")
    dev_token.add_argument("--dir", default="certs-dev", help="the `meshca dev init` directory (default certs-dev)")
    # --namespace/--service-account as the node metadata keys NAMESPACE/SERVICE_ACCOUNT say it; --ns/--sa still work
    dev_token.add_argument("--namespace", "--ns", dest="ns", required=True, help="Kubernetes namespace of the identity")
    dev_token.add_argument(
        "--service-account", "--sa", dest="sa", required=True, help="Kubernetes service account of the identity"
    )
    dev_token.add_argument("--node-id", help="bind the token to this Envoy node.id")
    dev_token.add_argument("--ttl", default="1h", help="token lifetime, e.g. 10m, 1h or seconds (default 1h)")
    dev_token.add_argument(
        "--out", help="write the token to this file (mode 0600, no trailing newline: Envoy sends the file verbatim)"
    )
    dev_token.set_defaults(handler=cmd_dev_token)

    serve = commands.add_parser("serve", help="run the CA, identity gate and xDS/SDS server")
    serve.add_argument("--config", required=True, metavar="FILE", help="settings file (docs/configuration.md)")
    serve.set_defaults(handler=cmd_serve)

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
        "--rotate-intermediate-at", help="with --duration: force an intermediate CA rotation this far in (e.g. 25s)"
    )
    demo.set_defaults(handler=cmd_demo)

    from meshca.ca.vault.setup import add_vault_parser
    from meshca.cli.bootstrap import add_bootstrap_parser
    from meshca.cli.status import add_status_parser

    add_bootstrap_parser(commands)
    add_status_parser(commands)
    add_vault_parser(commands)
    parser.epilog = "commands:\n" + "\n".join(
        f"  {name:<14} {help_text}" for name, help_text in command_list(parser)
    ) + "\n\n`meshca COMMAND --help` describes each one."
    return parser


def command_list(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str]]:
    """(command, one-line help) for every command that runs something, e.g. ("ca rotate", "...")."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    found += command_list(sub, f"{prefix}{name} ")
                else:
                    found.append((f"{prefix}{name}", helps[name]))
    return found


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshca")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return status
    except BrokenPipeError:  # `meshca dev token | head -c 10`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # ValueError includes InconsistentSnapshot
    except (CliError, ConfigError, CaError, FileExistsError, ValueError, ListenError) as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"meshca: error: {describe_os_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
