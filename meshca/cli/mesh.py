"""`meshca mesh apply|get`: the mesh config of replicas on etcd, validated as `meshca serve` validates a mesh file."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshca.ca.state import METADATA_FILE
from meshca.cli.errors import CliError
from meshca.clock import system_clock
from meshca.fields import ConfigError, FieldReader, read_yaml_mapping
from meshca.mesh.build import build_mesh
from meshca.mesh.model import MeshConfig
from meshca.mesh.resources import DEFAULT_CERT_SECRET, ROOT_CA_SECRET
from meshca.sds.workloads import ALL_BUNDLES_SECRET
from meshca.store.ca import FILES_PREFIX
from meshca.store.etcd import EtcdSettings, EtcdStore, StoreUnavailable, parse_store_settings
from meshca.store.mesh import AppliedMesh, check_trust_domain, parse_stored_mesh, read_mesh, sha256_hex, write_mesh
from meshca.store.serving import run_with_store
from meshca.xds.snapshot import InconsistentSnapshot, Overlay, Reference, ResourceType, Snapshot

T = TypeVar("T")
STORED_CA_METADATA = FILES_PREFIX + METADATA_FILE  # the internal CA's ca.json in etcd (meshca ca import)


def store_settings(config_path: Path) -> EtcdSettings:
    """The `store:` section of a serve settings file (a ConfigError naming `store` when there is none)."""
    settings = parse_store_settings(FieldReader(config_path, read_yaml_mapping(config_path)))
    if settings is None:
        raise ConfigError(config_path, "store", "is not set: without a store, `meshca serve` reads its `mesh:` file")
    return settings


def ca_trust_domain(config_path: Path, stored_ca: bytes | None = None) -> str:
    """The trust domain a mesh config must name: `ca.trust_domain` of the serve settings (the Vault modes
    set it), else the internal CA's: `stored_ca` (its ca.json in etcd) or the one in `state_dir`."""
    reader = FieldReader(config_path, read_yaml_mapping(config_path))
    section = reader.get("ca", Mapping, {})
    if section.get("trust_domain"):
        return str(reader.child("ca", section).get("trust_domain", str))
    if stored_ca is not None:
        try:
            return str(json.loads(stored_ca)["trust_domain"])
        except (ValueError, KeyError, TypeError):
            raise CliError("the CA's ca.json in etcd names no trust domain; pass --trust-domain") from None
    from meshca.ca.api import CaError
    from meshca.ca.internal import CertificateAuthority

    try:
        return CertificateAuthority.load((config_path.parent / reader.get("state_dir", str)).resolve(),
                                         system_clock).trust_domain
    except (CaError, ConfigError, OSError) as error:
        raise CliError(f"cannot read the CA's trust domain from {config_path} ({error}); pass --trust-domain") from None


def check_mesh(config: MeshConfig, where: Path) -> None:
    """Build the resources and check every identity's snapshot for dangling references, as a replica does when
    it applies the config (with the secrets every identity has: its certificate and the CA bundle)."""
    provided = frozenset(
        Reference(ResourceType.SECRET, name)
        for name in (DEFAULT_CERT_SECRET, ROOT_CA_SECRET, ALL_BUNDLES_SECRET, f"spiffe://{config.trust_domain}")
    )
    try:
        mesh = build_mesh(config)
        shared = Snapshot.build([r for r in mesh.shared if r.type is not ResourceType.SECRET], provided=provided)
        for own in mesh.per_identity.values():
            Overlay.on(shared, [r for r in own if r.type is not ResourceType.SECRET], provided)
    except InconsistentSnapshot as error:
        raise ConfigError(where, "", "; ".join(error.problems)) from None


def _with_store(settings: EtcdSettings, work: Callable[[EtcdStore], Awaitable[T]]) -> T:
    try:
        return run_with_store(settings, work, logging.getLogger("meshca.store"))
    except StoreUnavailable as error:
        raise CliError(str(error)) from None


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def cmd_mesh_apply(args: argparse.Namespace) -> int:
    config_path, mesh_path = Path(args.config), Path(args.file)
    settings = store_settings(config_path)
    try:
        raw = mesh_path.read_bytes()
    except OSError as error:
        raise ConfigError(mesh_path, "", f"cannot read: {error.strerror}") from None
    config = parse_stored_mesh(mesh_path, raw)
    applied = AppliedMesh(sha256_hex(raw), _who(), system_clock(), str(mesh_path.resolve()))

    async def write(store: EtcdStore) -> int:
        if args.trust_domain:
            trust_domain = args.trust_domain
        else:
            stored_ca = await store.get(STORED_CA_METADATA)
            trust_domain = ca_trust_domain(config_path, None if stored_ca is None else stored_ca.value)
        check_trust_domain(config, trust_domain, mesh_path)
        check_mesh(config, mesh_path)
        return await write_mesh(store, raw, applied)

    revision = _with_store(settings, write)
    services = len(config.services)
    print(f"mesh config {mesh_path} applied: {services} service{'s' * (services != 1)}, sha256 {applied.sha256[:12]}, "
          f"etcd revision {revision}")
    return 0


def cmd_mesh_get(args: argparse.Namespace) -> int:
    settings = store_settings(Path(args.config))
    stored = _with_store(settings, read_mesh)
    if stored is None:
        raise CliError(f"no mesh config in etcd under {settings.prefix}/: write one with `meshca mesh apply -f FILE`")
    raw, revision, applied = stored
    if args.show_applied:
        who = f"applied by {applied.applied_by} at {applied.applied_at.isoformat(timespec='seconds')} from {applied.source}" \
            if applied is not None else "no record of who applied it"
        print(f"# etcd revision {revision}, sha256 {sha256_hex(raw)}, {who}", file=sys.stderr)
    sys.stdout.buffer.write(raw)
    return 0


def add_mesh_parser(commands: Any) -> None:
    mesh = commands.add_parser("mesh", help="the mesh config in the store").add_subparsers(
        dest="mesh_command", required=True
    )
    apply = mesh.add_parser(
        "apply",
        help="validate a mesh config and write it to the store: every replica applies it",
        description="Validates FILE as `meshca serve` validates a mesh file (fields, trust domain, resources) and "
        "writes it to etcd in one transaction; a refused config writes nothing (exit status 2).",
    )
    apply.add_argument("-f", "--file", required=True, metavar="FILE", help="the mesh config file (as `mesh:` in docs/configuration.md)")
    apply.add_argument("--config", required=True, metavar="FILE", help="the `meshca serve` settings (its store: section)")
    apply.add_argument(
        "--trust-domain",
        metavar="DOMAIN",
        help="the CA's trust domain (default: ca.trust_domain of the settings, else the CA in etcd or in their state_dir)",
    )
    apply.set_defaults(handler=cmd_mesh_apply)
    get = mesh.add_parser("get", help="print the mesh config in the store")
    get.add_argument("--config", required=True, metavar="FILE", help="the `meshca serve` settings (its store: section)")
    get.add_argument("--show-applied", action="store_true", help="also print who applied it and when (on stderr)")
    get.set_defaults(handler=cmd_mesh_get)
