"""The CA interface: the MeshCa Protocol that every CA mode implements, its value types and every CA error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from meshca.ca.crypto import KeyAlgorithm
from meshca.clock import format_duration
from meshca.identity.spiffe import InvalidSpiffeId, SpiffeId

SlotKind = Literal["root", "intermediate"]
SlotState = Literal["prepared", "active", "old"]
JournalEvent = Literal["prepared", "activated", "retired", "pruned", "migrated"]
CsrRejectionKind = Literal["invalid_argument", "permission_denied", "failed_precondition"]
LEAF_TTL_FLOOR = timedelta(seconds=10)


# --- errors ---------------------------------------------------------------------------------------


class CaError(Exception):
    """Base class of every error the CA modules raise."""


class CaStateError(CaError):
    """The CA state directory is missing, partial, corrupt or inconsistent; the message names the file."""


class CaAlreadyExists(CaStateError):
    """`init` found an existing (possibly partial) CA in the state directory and refused to overwrite it."""


class InvalidSettings(CaError, ValueError):
    """CaSettings values that contradict each other or are out of range."""


class IdentityRejected(CaError, ValueError):
    """The SPIFFE ID cannot be issued by this CA (another trust domain, or no workload path)."""


class InvalidTtl(CaError, ValueError):
    """A requested TTL below the minimum (or not positive); the message names the TTL and the bounds."""


class IssuerExpired(CaError):
    """The intermediate CA has expired (or is not valid yet), so nothing can be issued until it rotates."""


class RotationRefused(CaError):
    """A CA transition that cannot be made in the current state (e.g. nothing prepared to activate)."""


class CsrRejected(CaError):
    """A CSR this CA refuses to sign; `kind` maps to the gRPC status (INVALID_ARGUMENT / PERMISSION_DENIED /
    FAILED_PRECONDITION: a signing backend such as Vault refuses what meshca's own checks allowed)."""

    def __init__(self, reason: str, kind: CsrRejectionKind) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: CsrRejectionKind = kind

# Vault-backed modes (Vault's own error answers are meshca.ca.vault.pki's CaVaultError and siblings).


class VaultCaError(CaError):
    """A problem of a Vault-backed CA that is not an error answer from Vault itself."""


class VaultNotConfigured(VaultCaError):
    """A transition needs Vault but the CA was loaded without a Vault session (e.g. for `ca status`)."""


class VaultAnswerInvalid(VaultCaError):
    """Vault answered, but with something meshca cannot use (wrong SAN, not a CA, no root); names the path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class RateLimited(VaultCaError):
    """vault-leaf: more signing requests than `max_rate`/`burst` allow; retryable (try again shortly)."""


class ServerCertificateUnsupported(VaultCaError):
    """vault-leaf mode does not issue meshca's own TLS server certificate."""


class VaultRefused(VaultCaError, CsrRejected):
    """vault-leaf: Vault refused, for good, a signing request that meshca's own checks allowed (e.g. its role
    forbids the key type or the identity, or the role is missing): FAILED_PRECONDITION at the CSR API, not
    retried. str() is meshca's words for the caller, without Vault's path or address; `path`, `status` and
    `vault_reason` are for the log."""

    def __init__(self, reason: str, path: str, status: int | None, vault_reason: str) -> None:
        super().__init__(reason, "failed_precondition")
        self.path = path
        self.status = status
        self.vault_reason = vault_reason


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaSettings:
    """Everything that shapes the CA; persisted in ca.json at init.

    Leaf TTL policy: a requested TTL below `leaf_ttl_min` (at least 10 s) is rejected (InvalidTtl);
    above `leaf_ttl_max` it is clamped to `leaf_ttl_max`; the result is then always capped at the
    active intermediate's notAfter (so leaves get shorter near the end of an intermediate's life
    rather than outliving it). notBefore is backdated by `backdate`, but by no more than a quarter
    of the leaf's lifetime and never before the intermediate's notBefore, to absorb clock skew.

    Rotation schedule (`tick`): fractions of the active certificate's lifetime at which the next
    one is prepared (created, published in the bundle if a root, not signing) and activated.
    `reload_grace` bounds how long another process sharing the state dir may keep signing with a
    CA after a transition committed elsewhere (its reload_if_changed period); it is added to
    `retire_after`.
    """

    trust_domain: str
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256  # root and intermediate keys
    root_ttl: timedelta = timedelta(days=365)
    intermediate_ttl: timedelta = timedelta(days=30)
    leaf_ttl_default: timedelta = timedelta(hours=1)
    leaf_ttl_min: timedelta = timedelta(minutes=5)
    leaf_ttl_max: timedelta = timedelta(days=90)
    backdate: timedelta = timedelta(seconds=60)
    leaf_key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256  # keys generated by issue_workload / servers
    intermediate_prepare_at: float = 0.5
    intermediate_activate_at: float = 0.66
    root_prepare_at: float = 0.8
    root_activate_at: float = 0.9
    reload_grace: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        try:
            SpiffeId(self.trust_domain)
        except InvalidSpiffeId as e:
            raise InvalidSettings(str(e)) from None
        for name in ("root_ttl", "intermediate_ttl", "leaf_ttl_default", "leaf_ttl_min", "leaf_ttl_max"):
            if getattr(self, name) <= timedelta(0):
                raise InvalidSettings(f"{name} must be positive, got {format_duration(getattr(self, name))}")
        if self.intermediate_ttl > self.root_ttl:
            raise InvalidSettings(
                f"intermediate_ttl {format_duration(self.intermediate_ttl)} exceeds root_ttl {format_duration(self.root_ttl)}"
            )
        if self.leaf_ttl_min < LEAF_TTL_FLOOR:
            raise InvalidSettings(
                f"leaf_ttl_min must be at least {format_duration(LEAF_TTL_FLOOR)}, "
                f"got {format_duration(self.leaf_ttl_min)}"
            )
        if not self.leaf_ttl_min <= self.leaf_ttl_default <= self.leaf_ttl_max:
            raise InvalidSettings(
                f"leaf TTLs must satisfy min <= default <= max, got min {format_duration(self.leaf_ttl_min)}, "
                f"default {format_duration(self.leaf_ttl_default)}, max {format_duration(self.leaf_ttl_max)}"
            )
        if not timedelta(0) <= self.backdate <= timedelta(hours=1):
            raise InvalidSettings(f"backdate must be between 0 and 1h, got {format_duration(self.backdate)}")
        if not timedelta(0) <= self.reload_grace <= timedelta(hours=1):
            raise InvalidSettings(f"reload_grace must be between 0 and 1h, got {format_duration(self.reload_grace)}")
        for kind in ("intermediate", "root"):
            prepare, activate = getattr(self, f"{kind}_prepare_at"), getattr(self, f"{kind}_activate_at")
            if not (isinstance(prepare, (int, float)) and isinstance(activate, (int, float))):
                raise InvalidSettings(f"{kind}_prepare_at and {kind}_activate_at must be numbers")
            if not 0 < prepare < activate < 1:
                raise InvalidSettings(
                    f"{kind} rotation fractions must satisfy 0 < prepare_at < activate_at < 1, "
                    f"got prepare_at {prepare}, activate_at {activate}"
                )

    def to_json(self) -> dict[str, Any]:
        """The ca.json `settings` object (TTLs in whole seconds)."""
        return {
            "root_ttl_seconds": int(self.root_ttl.total_seconds()),
            "intermediate_ttl_seconds": int(self.intermediate_ttl.total_seconds()),
            "leaf_ttl_default_seconds": int(self.leaf_ttl_default.total_seconds()),
            "leaf_ttl_min_seconds": int(self.leaf_ttl_min.total_seconds()),
            "leaf_ttl_max_seconds": int(self.leaf_ttl_max.total_seconds()),
            "backdate_seconds": int(self.backdate.total_seconds()),
            "leaf_key_algorithm": self.leaf_key_algorithm.value,
            "intermediate_prepare_at": self.intermediate_prepare_at,
            "intermediate_activate_at": self.intermediate_activate_at,
            "root_prepare_at": self.root_prepare_at,
            "root_activate_at": self.root_activate_at,
            "reload_grace_seconds": int(self.reload_grace.total_seconds()),
        }

    @classmethod
    def from_json(cls, trust_domain: str, key_algorithm: str, data: Mapping[str, Any]) -> CaSettings:
        """Inverse of to_json; keys added in format 2 may be absent (defaults). Raises KeyError/ValueError/TypeError."""
        defaults = cls(trust_domain)

        def seconds(key: str, default: timedelta | None = None) -> timedelta:
            if default is not None and key not in data:
                return default
            value = data[key]
            if type(value) is not int:
                raise TypeError(f"settings.{key} must be an integer, got {value!r}")
            return timedelta(seconds=value)

        def fraction(key: str) -> float:
            value = data.get(key, getattr(defaults, key))
            if type(value) not in (int, float):
                raise TypeError(f"settings.{key} must be a number, got {value!r}")
            return float(value)

        return cls(
            trust_domain=trust_domain,
            key_algorithm=KeyAlgorithm(key_algorithm),
            root_ttl=seconds("root_ttl_seconds"),
            intermediate_ttl=seconds("intermediate_ttl_seconds"),
            leaf_ttl_default=seconds("leaf_ttl_default_seconds"),
            leaf_ttl_min=seconds("leaf_ttl_min_seconds"),
            leaf_ttl_max=seconds("leaf_ttl_max_seconds"),
            backdate=seconds("backdate_seconds"),
            leaf_key_algorithm=KeyAlgorithm(data["leaf_key_algorithm"]),
            intermediate_prepare_at=fraction("intermediate_prepare_at"),
            intermediate_activate_at=fraction("intermediate_activate_at"),
            root_prepare_at=fraction("root_prepare_at"),
            root_activate_at=fraction("root_activate_at"),
            reload_grace=seconds("reload_grace_seconds", defaults.reload_grace),
        )


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate this CA issued. The private key never appears in repr/str."""

    spiffe_id: SpiffeId | None  # None for server certificates
    certificate_pem: bytes  # the leaf alone
    chain_pem: bytes  # leaf followed by the active intermediate (never the root)
    private_key_pem: bytes | None = field(repr=False)  # None when issued from a CSR
    serial_number: int
    not_before: datetime  # aware UTC, whole seconds
    not_after: datetime


@dataclass(frozen=True)
class CaEvent:
    """One slot change of a committed transition; all events of one transition share its generation."""

    kind: SlotKind
    event: JournalEvent
    id: str
    generation: int
    retire_after: datetime | None = None  # for "retired": when its last leaf expires (then it is pruned)


@dataclass(frozen=True)
class SlotStatus:
    """A CA certificate in the state directory, as `meshca ca status` shows it."""

    kind: SlotKind
    id: str
    state: SlotState
    subject: str
    issuer_id: str | None
    not_before: datetime
    not_after: datetime
    since: datetime
    retire_after: datetime | None
    fingerprint_sha256: str


@dataclass(frozen=True)
class BundleEntry:
    """A root in the trust bundle (ROOTCA)."""

    id: str
    state: SlotState
    subject: str
    fingerprint_sha256: str
    not_after: datetime


@dataclass(frozen=True)
class CaStatus:
    """The CA's committed state: slots, generation and the trust bundle, in bundle order."""

    trust_domain: str
    generation: int
    active_intermediate_id: str
    slots: tuple[SlotStatus, ...]
    bundle: tuple[BundleEntry, ...]

    @classmethod
    def from_slots(
        cls, trust_domain: str, generation: int, active_intermediate_id: str, slots: Sequence[SlotStatus]
    ) -> CaStatus:
        """The status of `slots` (in bundle order): the bundle is their roots."""
        bundle = tuple(
            BundleEntry(s.id, s.state, s.subject, s.fingerprint_sha256, s.not_after) for s in slots if s.kind == "root"
        )
        return cls(trust_domain, generation, active_intermediate_id, tuple(slots), bundle)

    def to_json(self) -> dict[str, Any]:
        def when(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "trust_domain": self.trust_domain,
            "generation": self.generation,
            "active_intermediate_id": self.active_intermediate_id,
            "slots": [
                {
                    "kind": s.kind, "id": s.id, "state": s.state, "subject": s.subject, "issuer_id": s.issuer_id,
                    "not_before": when(s.not_before), "not_after": when(s.not_after), "since": when(s.since),
                    "retire_after": when(s.retire_after), "fingerprint_sha256": s.fingerprint_sha256,
                }
                for s in self.slots
            ],
            "bundle": [
                {"id": b.id, "state": b.state, "subject": b.subject, "fingerprint_sha256": b.fingerprint_sha256,
                 "not_after": when(b.not_after)}
                for b in self.bundle
            ],
        }


ScheduledAction = Literal["prepare", "activate", "prune"]


@dataclass(frozen=True)
class ScheduledStep:
    """The next transition the schedule calls for; `kind` is None for a prune (of every due slot)."""

    action: ScheduledAction
    kind: SlotKind | None


# --- the interface --------------------------------------------------------------------------------


class MeshCa(Protocol):
    """A CA as meshca's parts use it: meshca.ca.internal.CertificateAuthority, and Vault's two modes
    (meshca.ca.vault.intermediate.VaultIntermediateCa, meshca.ca.vault.leaf.VaultLeafCa).

    Issuing is thread-safe and never returns a leaf outliving its issuer. Every error is a CaError.
    Capabilities differ by mode and are properties (`signs_remotely`, `can_rotate_*`), not probes.
    """

    @property
    def trust_domain(self) -> str: ...

    @property
    def settings(self) -> CaSettings:
        """The TTL policy and rotation schedule in effect."""
        ...

    @property
    def generation(self) -> int:
        """Increases whenever the signing CA or the trust bundle may have changed."""
        ...

    @property
    def active_intermediate_id(self) -> str:
        """The slot id of the CA that signs leaves now; a change means every leaf should be re-issued."""
        ...

    @property
    def intermediate_certificate_pem(self) -> bytes: ...

    @property
    def intermediate_not_after(self) -> datetime: ...

    @property
    def signs_remotely(self) -> bool:
        """True when issuing is a network call that may wait seconds: call it off the event loop."""
        ...

    @property
    def can_rotate_intermediate(self) -> bool:
        """False when there is no meshca intermediate (`rotate_intermediate` raises RotationRefused)."""
        ...

    @property
    def can_rotate_root(self) -> bool:
        """False when the root lives elsewhere (`rotate_root` raises RotationRefused)."""
        ...

    def trust_bundle_pem(self) -> bytes:
        """Every root peers must trust now (PEM, the active one first)."""
        ...

    def status(self) -> CaStatus: ...

    def reload_if_changed(self) -> bool:
        """Notice a change made elsewhere (another process, Vault); True when the state changed."""
        ...

    def tick(self, now: datetime | None = None) -> list[CaEvent]:
        """Run the scheduled transitions that are due; [] when nothing is (the usual case)."""
        ...

    def rotate_intermediate(self, now: bool = False) -> list[CaEvent]:
        """Prepare the next intermediate; with `now`, activate it at once too."""
        ...

    def rotate_root(self, now: bool = False) -> list[CaEvent]:
        """Prepare a new root; with `now`, activate it at once too."""
        ...

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """A new key pair and an X.509-SVID for `spiffe_id` (a verified identity); TTL policy: CaSettings."""
        ...

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """An X.509-SVID for the key of a PEM CSR; the SAN comes from `spiffe_id` alone (CsrRejected otherwise)."""
        ...

    def issue_server_certificate(
        self, dns_names: Sequence[str], ip_addresses: Sequence[str], ttl: timedelta | None = None
    ) -> IssuedCertificate:
        """A key pair and a TLS server certificate for meshca's own endpoint."""
        ...
