"""`meshca dev init` and `meshca dev token`: development material, not for production."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshca.cli.errors import CliError
from meshca.clock import system_clock
from meshca.fields import parse_duration
from meshca.files import write_atomic


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


def add_dev_parser(commands: Any) -> None:
    """Add `dev init` and `dev token` to the top-level subparsers."""
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
