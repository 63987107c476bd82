"""Chooses and builds the CA backend named in the serve settings: internal, vault-intermediate, vault-leaf."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshca.ca.api import LEAF_TTL_FLOOR, CaSettings, MeshCa
from meshca.ca.internal import CertificateAuthority
from meshca.ca.vault.intermediate import VaultIntermediateCa, is_vault_state_dir
from meshca.ca.vault.leaf import VaultLeafCa, VaultLeafOptions
from meshca.ca.vault.session import VaultSession, parse_vault_settings
from meshca.clock import Clock, format_duration
from meshca.fields import FieldReader, read_yaml_mapping

MODES = ("internal", "vault-intermediate", "vault-leaf")
_VAULT_CA_KEYS = ("mount", "role", "max_rate", "burst", "crl_mounts")


@dataclass(frozen=True)
class CaBackend:
    """The CA the server issues with, and the Vault session to keep alive (None for `internal`)."""

    mode: str
    ca: MeshCa  # CertificateAuthority, VaultIntermediateCa or VaultLeafCa
    vault: VaultSession | None
    crl_mounts: tuple[str, ...] = ()  # the Vault modes: the PKI mounts whose issuers' CRLs meshca serves


def read_ca_mode(config_path: Path) -> str:
    """Only `ca.mode` of a serve settings file (checked): which CA `build_ca_backend` would build."""
    reader = FieldReader(config_path, read_yaml_mapping(config_path))
    ca_reader = reader.child("ca", reader.get("ca", Mapping, {}))
    mode: str = ca_reader.get("mode", str, "internal")
    if mode not in MODES:
        raise ca_reader.error("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    return mode


def build_ca_backend(config_path: Path, clock: Clock, logger: logging.Logger) -> CaBackend:
    """Read `state_dir` and the `ca:` section of a serve settings file and build that CA.

    `internal` (default): the CA in `state_dir` (`meshca ca init` / `meshca dev init`).
    `vault-intermediate`: Vault holds the root; meshca's intermediate lives in `state_dir` and is
    created (signed by Vault) on first start, so restarts need no Vault.
    `vault-leaf`: every leaf is signed by Vault; needs Vault at start.
    """
    data = read_yaml_mapping(config_path)
    reader = FieldReader(config_path, data)
    state_dir = (config_path.parent / reader.get("state_dir", str)).resolve()
    section: Mapping[str, Any] = reader.get("ca", Mapping, {})
    ca_reader = reader.child("ca", section)
    ca_reader.check_known({"mode", "trust_domain", "leaf_ttl_min", "vault"})
    mode = ca_reader.get("mode", str, "internal")
    if mode not in MODES:
        raise ca_reader.error("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    if mode == "internal":
        return CaBackend(mode, CertificateAuthority.load(state_dir, clock), None)

    def ca_settings() -> CaSettings:
        leaf_ttl_min = ca_reader.duration("leaf_ttl_min", required=False)
        if leaf_ttl_min is not None and leaf_ttl_min < LEAF_TTL_FLOOR:
            raise ca_reader.error(
                "leaf_ttl_min", f"{format_duration(leaf_ttl_min)} is below meshca's floor of {format_duration(LEAF_TTL_FLOOR)}"
            )
        extra = {"leaf_ttl_min": leaf_ttl_min} if leaf_ttl_min is not None else {}
        try:
            return CaSettings(trust_domain=ca_reader.get("trust_domain", str), **extra)
        except ValueError as error:
            raise ca_reader.error("", str(error)) from None

    vault_reader = ca_reader.child("vault", ca_reader.get("vault", Mapping))
    session = VaultSession(parse_vault_settings(vault_reader, extra_known=_VAULT_CA_KEYS), clock, logger.getChild("vault"))
    mount = vault_reader.get("mount", str, "pki")
    crl_mounts = tuple(vault_reader.get("crl_mounts", list, [mount]))
    if not crl_mounts or not all(isinstance(m, str) and m and not m.startswith("/") for m in crl_mounts):
        raise vault_reader.error("crl_mounts", "must be a non-empty list of PKI mount paths (e.g. [pki_int, pki])")
    if mode == "vault-intermediate":
        if is_vault_state_dir(state_dir):
            ca: MeshCa = VaultIntermediateCa.load(state_dir, None, session, clock, logger=logger.getChild("vault-ca"))
        else:
            ca = VaultIntermediateCa.init(
                state_dir, ca_settings(), session, clock, mount=mount,
                logger=logger.getChild("vault-ca"),
            )
        return CaBackend(mode, ca, session, crl_mounts)

    options = VaultLeafOptions(
        mount=mount,
        role=vault_reader.get("role", str, "meshca"),
        max_rate=float(vault_reader.get("max_rate", (int, float), 50.0)),
        burst=vault_reader.get("burst", int, 20),
    )
    leaf_ca = VaultLeafCa(ca_settings(), session, clock, logger.getChild("vault-leaf"), options)
    return CaBackend(mode, leaf_ca, session, crl_mounts)
