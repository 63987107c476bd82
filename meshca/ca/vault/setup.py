"""`meshca vault setup`: the PKI mount, root, role and least-privilege policy meshca needs (idempotent)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import hvac
import hvac.exceptions
import requests

from meshca.ca.vault.session import VaultError, VaultSession, vault_error_from
from meshca.fields import parse_duration

T = TypeVar("T")

Mode = Literal["vault-intermediate", "vault-leaf"]
MODES: tuple[Mode, ...] = ("vault-intermediate", "vault-leaf")
DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_MAX_LEAF_TTL = timedelta(hours=24)

Target = VaultSession | hvac.Client


@dataclass(frozen=True)
class SetupAction:
    """One thing setup looked at: `outcome` is created, updated or unchanged."""

    outcome: Literal["created", "updated", "unchanged"]
    what: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.outcome:<9} {self.what}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class SetupResult:
    """What setup_pki found and did; `root_certificate_pem` is the mount's root (Vault's trust anchor)."""

    mode: Mode
    mount: str
    role: str
    policy: str
    policy_text: str
    root_certificate_pem: str
    actions: tuple[SetupAction, ...]

    @property
    def changed(self) -> bool:
        return any(a.outcome != "unchanged" for a in self.actions)


@dataclass(frozen=True)
class AppRoleCredentials:
    """A role_id and a fresh secret_id (kept out of repr)."""

    role_id: str
    secret_id: str = field(repr=False)
    mount: str = "approle"


# -- plumbing ---------------------------------------------------------------------------------


def _runner(target: Target) -> Callable[[Callable[[hvac.Client], T], str], T]:
    """call(operation, what) for a VaultSession, or the same error mapping around a bare hvac.Client."""
    if isinstance(target, VaultSession):
        return target.call

    def run(operation: Callable[[hvac.Client], T], what: str) -> T:
        try:
            return operation(target)
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as error:
            mapped = vault_error_from(error, what, (target.token or "",))
            assert mapped is not None
            raise mapped from None

    return run


def _seconds(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    if seconds <= 0:
        raise ValueError(f"duration {duration} must be at least one second")
    return f"{seconds}s"


def _human(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_path_segment(name: str, value: str) -> None:
    if not value or value.strip("/") != value or " " in value:
        raise ValueError(f"{name} {value!r} must be a non-empty path without leading/trailing '/'")


def _as_seconds(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(parse_duration(value).total_seconds())
        except ValueError:
            return None
    return None


def _same(desired: Any, current: Any, duration: bool) -> bool:
    if duration:
        return _as_seconds(desired) == _as_seconds(current)
    if isinstance(desired, (list, tuple)):
        current_list = current if isinstance(current, list) else ([] if current in (None, "") else [current])
        return sorted(str(v) for v in desired) == sorted(str(v) for v in current_list)
    return bool(desired == current)


def _differences(desired: Mapping[str, Any], current: Mapping[str, Any], durations: Iterable[str]) -> list[str]:
    duration_keys = set(durations)
    return [k for k, v in desired.items() if not _same(v, current.get(k), k in duration_keys)]


# -- policy -----------------------------------------------------------------------------------


def policy_text(mode: Mode, *, mount: str = "pki", role: str = "meshca") -> str:
    """The least-privilege HCL policy meshca needs in `mode` (pure; `meshca vault setup` writes exactly this)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    _check_path_segment("mount", mount)
    _check_path_segment("role", role)
    if mode == "vault-leaf":
        header = f"# meshca, vault-leaf mode: Vault signs every workload leaf with role {role!r}."
        sign = [(f"{mount}/sign/{role}", "update")]
    else:
        header = "# meshca, vault-intermediate mode: Vault signs meshca's intermediate; meshca signs the leaves."
        sign = [(f"{mount}/root/sign-intermediate", "update")]
    rules = sign + [
        (f"{mount}/cert/ca_chain", "read"),
        (f"{mount}/ca/pem", "read"),
        ("auth/token/renew-self", "update"),
        ("auth/token/lookup-self", "read"),
    ]
    blocks = [f'path "{path}" {{\n  capabilities = ["{capability}"]\n}}' for path, capability in rules]
    return header + "\n" + "\n\n".join(blocks) + "\n"


def role_parameters(trust_domain: str, max_leaf_ttl: timedelta) -> dict[str, Any]:
    """The PKI role for workload leaves: URI SANs only inside the trust domain and only as requested in
    `uri_sans` (never copied from the CSR), basicConstraints CA:FALSE (the SPIFFE X509-SVID spec requires
    it), not stored. Any key type: meshca's own CSR policy (meshca.ca.policy.check_csr: EC P-256/P-384, RSA
    2048-8192) decides before Vault is asked, and Vault still refuses RSA below 2048 bits."""
    ttl = _seconds(max_leaf_ttl)
    return {
        "allowed_uri_sans": [f"spiffe://{trust_domain}/*"],
        "allowed_uri_sans_template": False,
        "allow_any_name": False,
        "allow_localhost": False,
        "allowed_domains": [],
        "allow_subdomains": False,
        "allow_ip_sans": False,
        "enforce_hostnames": False,
        "require_cn": False,
        "use_csr_common_name": False,
        "use_csr_sans": False,  # the SAN comes from meshca's verified identity (uri_sans), never from the CSR
        "no_store": True,
        "generate_lease": False,
        "key_type": "any",
        "key_bits": 0,
        "basic_constraints_valid_for_non_ca": True,
        "server_flag": True,
        "client_flag": True,
        "code_signing_flag": False,
        "email_protection_flag": False,
        "not_before_duration": "60s",
        "ttl": ttl,
        "max_ttl": ttl,
    }


_ROLE_DURATIONS = ("ttl", "max_ttl", "not_before_duration")


# -- setup ------------------------------------------------------------------------------------


def _check_trust_domain(trust_domain: str) -> None:
    if not trust_domain or "/" in trust_domain or ":" in trust_domain or trust_domain != trust_domain.lower():
        raise ValueError(f"trust domain {trust_domain!r} must be a lowercase name like 'mesh.example'")


def _ensure_pki_mount(run: Callable[..., Any], mount: str, max_lease: timedelta) -> SetupAction:
    mounts = run(lambda c: c.sys.list_mounted_secrets_engines(), "sys/mounts")
    table = mounts.get("data", mounts) if isinstance(mounts, Mapping) else {}
    entry = table.get(f"{mount}/")
    if entry is None:
        run(
            lambda c: c.sys.enable_secrets_engine(
                "pki", path=mount, config={"max_lease_ttl": _seconds(max_lease)},
                description="meshca: root of trust for the mesh",
            ),
            f"sys/mounts/{mount}",
        )
        return SetupAction("created", f"mount {mount}/", f"pki, max_lease_ttl {_human(max_lease)}")
    if entry.get("type") != "pki":
        raise VaultError("GET", "sys/mounts", f"{mount}/ is a {entry.get('type')!r} mount, not pki", None)
    current = int((entry.get("config") or {}).get("max_lease_ttl") or 0)
    if current < int(max_lease.total_seconds()):
        run(
            lambda c: c.sys.tune_mount_configuration(path=mount, max_lease_ttl=_seconds(max_lease)),
            f"sys/mounts/{mount}/tune",
        )
        return SetupAction("updated", f"mount {mount}/", f"max_lease_ttl raised to {_human(max_lease)}")
    return SetupAction("unchanged", f"mount {mount}/", f"pki, max_lease_ttl {_human(timedelta(seconds=current))}")


def _read_root_pem(run: Callable[..., Any], mount: str) -> str:
    def read(client: hvac.Client) -> str:
        response = client.adapter.get(f"/v1/{mount}/ca/pem")
        if isinstance(response, requests.Response):
            return response.text.strip() if response.status_code == 200 else ""
        return ""

    return run(read, f"{mount}/ca/pem")


def _subject(pem: str) -> str:
    from meshca.ca.crypto import CryptoError, parse_certificate_pem

    try:
        info = parse_certificate_pem(pem.encode())
    except CryptoError:
        return "unparsable certificate"
    return ", ".join([info.subject or "(empty subject)", *info.uris])


def _ensure_root(run: Callable[..., Any], mount: str, trust_domain: str, root_ttl: timedelta) -> tuple[SetupAction, str]:
    existing = _read_root_pem(run, mount)
    if existing:
        return SetupAction("unchanged", f"root CA in {mount}/", f"existing CA: {_subject(existing)}"), existing + "\n"
    common_name = f"{trust_domain} root (Vault)"
    response = run(
        lambda c: c.write_data(
            f"{mount}/root/generate/internal",
            data={
                "common_name": common_name,
                "uri_sans": f"spiffe://{trust_domain}",
                "ttl": _seconds(root_ttl),
                "key_type": "ec",
                "key_bits": 256,
                "exclude_cn_from_sans": True,
            },
        ),
        f"{mount}/root/generate/internal",
    )
    certificate = str(((response or {}).get("data") or {}).get("certificate") or "").strip()
    if not certificate:
        certificate = _read_root_pem(run, mount)
    return (
        SetupAction("created", f"root CA in {mount}/", f"{common_name!r}, spiffe://{trust_domain}, {_human(root_ttl)}"),
        certificate + "\n",
    )


def _ensure_role(run: Callable[..., Any], mount: str, role: str, desired: Mapping[str, Any]) -> SetupAction:
    path = f"{mount}/roles/{role}"
    current = run(lambda c: c.read(path), path)
    current_data = (current or {}).get("data") if isinstance(current, Mapping) else None
    max_ttl = timedelta(seconds=_as_seconds(desired["max_ttl"]) or 0)
    detail = f"allowed_uri_sans {', '.join(desired['allowed_uri_sans'])}, ttl {_human(max_ttl)}"
    if current_data is not None and not _differences(desired, current_data, _ROLE_DURATIONS):
        return SetupAction("unchanged", f"role {path}", detail)
    run(lambda c: c.write_data(path, data=dict(desired)), path)
    return SetupAction("created" if current_data is None else "updated", f"role {path}", detail)


def _ensure_policy(run: Callable[..., Any], name: str, text: str) -> SetupAction:
    path = f"sys/policies/acl/{name}"

    def read(client: hvac.Client) -> str | None:
        try:
            response = client.sys.read_acl_policy(name)
        except hvac.exceptions.InvalidPath:
            return None
        return str(((response or {}).get("data") or {}).get("policy") or "")

    current = run(read, path)
    if current is not None and current.strip() == text.strip():
        return SetupAction("unchanged", f"policy {name}")
    run(lambda c: c.sys.create_or_update_acl_policy(name, text), path)
    return SetupAction("created" if current is None else "updated", f"policy {name}")


def setup_pki(
    client_or_session: Target,
    *,
    trust_domain: str,
    mode: Mode,
    mount: str = "pki",
    role: str = "meshca",
    policy: str = "meshca",
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
    max_leaf_ttl: timedelta = DEFAULT_MAX_LEAF_TTL,
) -> SetupResult:
    """Make the PKI mount, root, leaf role and policy exist as meshca needs them; safe to run again.

    Raises ValueError for bad arguments and VaultError (with the path and Vault's reason) for refusals.
    """
    _check_trust_domain(trust_domain)
    text = policy_text(mode, mount=mount, role=role)  # validates mode, mount and role
    _check_path_segment("policy", policy)
    if max_leaf_ttl > root_ttl:
        raise ValueError(f"max_leaf_ttl {max_leaf_ttl} exceeds root_ttl {root_ttl}")
    run = _runner(client_or_session)
    actions = [_ensure_pki_mount(run, mount, root_ttl)]
    root_action, root_pem = _ensure_root(run, mount, trust_domain, root_ttl)
    actions.append(root_action)
    actions.append(_ensure_role(run, mount, role, role_parameters(trust_domain, max_leaf_ttl)))
    actions.append(_ensure_policy(run, policy, text))
    return SetupResult(
        mode=mode, mount=mount, role=role, policy=policy, policy_text=text,
        root_certificate_pem=root_pem, actions=tuple(actions),
    )


# -- auth methods (tests, demo, and people who want it scripted) ------------------------------


def _ensure_auth_mount(run: Callable[..., Any], method: str, mount: str) -> SetupAction:
    _check_path_segment("mount", mount)
    methods = run(lambda c: c.sys.list_auth_methods(), "sys/auth")
    table = methods.get("data", methods) if isinstance(methods, Mapping) else {}
    entry = table.get(f"{mount}/")
    if entry is None:
        run(lambda c: c.sys.enable_auth_method(method, path=mount), f"sys/auth/{mount}")
        return SetupAction("created", f"auth mount {mount}/", method)
    if entry.get("type") != method:
        raise VaultError("GET", "sys/auth", f"{mount}/ is a {entry.get('type')!r} auth mount, not {method}", None)
    return SetupAction("unchanged", f"auth mount {mount}/", method)


def setup_approle(
    client_or_session: Target,
    *,
    role_name: str = "meshca",
    policies: Sequence[str] = ("meshca",),
    mount: str = "approle",
    token_ttl: timedelta = timedelta(hours=1),
    token_max_ttl: timedelta = timedelta(hours=24),
    secret_id_ttl: timedelta | None = None,
) -> AppRoleCredentials:
    """Enable AppRole if needed, write the role (renewable service tokens) and return a new secret_id."""
    _check_path_segment("role_name", role_name)
    run = _runner(client_or_session)
    _ensure_auth_mount(run, "approle", mount)
    role_path = f"auth/{mount}/role/{role_name}"
    data: dict[str, Any] = {
        "token_policies": list(policies),
        "token_ttl": _seconds(token_ttl),
        "token_max_ttl": _seconds(token_max_ttl),
        "token_type": "service",
        "bind_secret_id": True,
    }
    if secret_id_ttl is not None:
        data["secret_id_ttl"] = _seconds(secret_id_ttl)
    run(lambda c: c.write_data(role_path, data=data), role_path)
    role_id = run(lambda c: c.read(f"{role_path}/role-id"), f"{role_path}/role-id")["data"]["role_id"]
    secret = run(lambda c: c.write_data(f"{role_path}/secret-id", data={}), f"{role_path}/secret-id")
    return AppRoleCredentials(role_id=str(role_id), secret_id=str(secret["data"]["secret_id"]), mount=mount)


def setup_jwt_auth(
    client_or_session: Target,
    *,
    issuer_public_key_pem: bytes | str,
    bound_issuer: str,
    bound_audiences: Sequence[str],
    role: str = "meshca",
    user_claim: str = "sub",
    policies: Sequence[str] = ("meshca",),
    mount: str = "jwt",
    bound_subject: str | None = None,
    token_ttl: timedelta = timedelta(hours=1),
    token_max_ttl: timedelta = timedelta(hours=24),
) -> None:
    """Enable auth/jwt if needed, trust one issuer's public key, and write a jwt role bound to the audiences."""
    _check_path_segment("role", role)
    if not bound_audiences:
        raise ValueError("bound_audiences must not be empty")
    pem = issuer_public_key_pem.decode() if isinstance(issuer_public_key_pem, bytes) else issuer_public_key_pem
    run = _runner(client_or_session)
    _ensure_auth_mount(run, "jwt", mount)
    config = {"jwt_validation_pubkeys": [pem], "bound_issuer": bound_issuer}
    run(lambda c: c.write_data(f"auth/{mount}/config", data=config), f"auth/{mount}/config")
    data: dict[str, Any] = {
        "role_type": "jwt",
        "bound_audiences": list(bound_audiences),
        "user_claim": user_claim,
        "token_policies": list(policies),
        "token_ttl": _seconds(token_ttl),
        "token_max_ttl": _seconds(token_max_ttl),
        "token_type": "service",
    }
    if bound_subject is not None:
        data["bound_subject"] = bound_subject
    role_path = f"auth/{mount}/role/{role}"
    run(lambda c: c.write_data(role_path, data=data), role_path)


# -- CLI --------------------------------------------------------------------------------------


class _SetupUsageError(Exception):
    """A bad option of `meshca vault setup`."""


def _token_from(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.token_file:
        path = Path(args.token_file)
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise _SetupUsageError(f"--token-file: cannot read {str(path)!r}: {error.strerror}") from None
        if not token:
            raise _SetupUsageError(f"--token-file: {str(path)!r} is empty")
        return token
    for name in ("VAULT_TOKEN", "BAO_TOKEN"):
        if environ.get(name):
            return environ[name].strip()
    raise _SetupUsageError("no Vault token: give --token-file FILE or set VAULT_TOKEN")


def _address_from(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    address = args.address or environ.get("VAULT_ADDR") or environ.get("BAO_ADDR")
    if not address:
        raise _SetupUsageError("no Vault address: give --address URL or set VAULT_ADDR")
    if not address.startswith(("http://", "https://")):
        raise _SetupUsageError(f"--address {address!r} must start with http:// or https://")
    return address.rstrip("/")


def _duration_option(value: str, option: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as error:
        raise _SetupUsageError(f"{option}: {error}") from None


def _root_summary(root_pem: str) -> str:
    from meshca.ca.crypto import CryptoError, parse_certificate_pem

    try:
        info = parse_certificate_pem(root_pem.encode())
    except CryptoError:
        return "root: (could not parse the certificate Vault returned)"
    return (
        f"root: {info.subject}  uris {', '.join(info.uris) or '-'}  not after {info.not_after:%Y-%m-%d}\n"
        f"      sha256 {info.fingerprint_sha256}"
    )


def cmd_vault_setup(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Handler for `meshca vault setup`: 0 on success, 2 with one `meshca: error:` line otherwise."""
    env = os.environ if environ is None else environ
    try:
        address = _address_from(args, env)
        token = _token_from(args, env)
        root_ttl = _duration_option(args.root_ttl, "--root-ttl")
        max_leaf_ttl = _duration_option(args.max_leaf_ttl, "--max-leaf-ttl")
        verify: bool | str = args.ca_cert if args.ca_cert else True
        client = hvac.Client(url=address, token=token, namespace=args.namespace, verify=verify, timeout=args.timeout)
        result = setup_pki(
            client,
            trust_domain=args.trust_domain,
            mode=args.mode,
            mount=args.mount,
            role=args.role,
            policy=args.policy,
            root_ttl=root_ttl,
            max_leaf_ttl=max_leaf_ttl,
        )
    except (_SetupUsageError, VaultError, ValueError) as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    print(f"vault setup for {args.trust_domain} ({result.mode}) at {address}:")
    for action in result.actions:
        print(f"  {action.line()}")
    print(_root_summary(result.root_certificate_pem))
    print(f'next: give meshca a token whose policies include "{result.policy}" (see docs/vault.md)')
    if args.print_policy:
        print(f"\n# policy {result.policy}")
        sys.stdout.write(result.policy_text)
    return 0


def cmd_vault_policy(args: argparse.Namespace) -> int:
    """Handler for `meshca vault policy`: print the policy for a mode without contacting Vault."""
    try:
        sys.stdout.write(policy_text(args.mode, mount=args.mount, role=args.role))
    except ValueError as error:
        print(f"meshca: error: {error}", file=sys.stderr)
        return 2
    return 0


def add_vault_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add `vault setup` and `vault policy` to the `meshca` subcommands (each sets `handler`)."""
    vault = subparsers.add_parser("vault", help="Vault/OpenBao: create the PKI mount, role and policy meshca needs")
    commands = vault.add_subparsers(dest="vault_command", required=True)

    setup = commands.add_parser(
        "setup",
        help="create (idempotently) the PKI mount, root CA, leaf role and least-privilege policy",
        description="Create what meshca needs in Vault/OpenBao; running it again changes nothing. "
        "The token needs admin rights (e.g. root) once; meshca itself then runs with the policy printed here.",
    )
    setup.add_argument("--address", help="Vault address, e.g. https://vault:8200 (default $VAULT_ADDR)")
    setup.add_argument("--token-file", metavar="FILE", help="file with an admin token (default $VAULT_TOKEN)")
    setup.add_argument("--namespace", help="Vault Enterprise / OpenBao namespace")
    setup.add_argument("--ca-cert", metavar="FILE", help="CA bundle to verify an https Vault address")
    setup.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    setup.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. mesh.example")
    setup.add_argument("--mode", required=True, choices=MODES, help="how meshca uses Vault (see docs/vault.md)")
    setup.add_argument("--mount", default="pki", help="PKI mount path (default pki)")
    setup.add_argument("--role", default="meshca", help="PKI role for leaves (default meshca)")
    setup.add_argument("--policy", default="meshca", help="name of the ACL policy to write (default meshca)")
    setup.add_argument("--root-ttl", default="3650d", help="root CA lifetime and the mount's max lease (default 3650d)")
    setup.add_argument("--max-leaf-ttl", default="24h", help="the role's ttl and max_ttl for leaves (default 24h)")
    setup.add_argument("--print-policy", action="store_true", help="also print the policy text")
    setup.set_defaults(handler=cmd_vault_setup)

    policy = commands.add_parser("policy", help="print the least-privilege policy for a mode (no Vault needed)")
    policy.add_argument("--mode", required=True, choices=MODES, help="how meshca uses Vault (see docs/vault.md)")
    policy.add_argument("--mount", default="pki", help="PKI mount path (default pki)")
    policy.add_argument("--role", default="meshca", help="PKI role for leaves (default meshca)")
    policy.set_defaults(handler=cmd_vault_policy)
    return vault
