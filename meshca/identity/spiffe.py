"""SPIFFE identities: the one value type every module uses to name a workload."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class InvalidSpiffeId(ValueError):
    """A string is not a valid SPIFFE ID; the message says which part is wrong."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    """`spiffe://<trust_domain><path>`; path is empty or starts with '/'."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        if not self.trust_domain or not _TRUST_DOMAIN.match(self.trust_domain):
            raise InvalidSpiffeId(
                f"trust domain {self.trust_domain!r} must be non-empty lowercase letters, digits, '.', '_' or '-'"
            )
        if self.path:
            if not self.path.startswith("/"):
                raise InvalidSpiffeId(f"path {self.path!r} must start with '/'")
            for segment in self.path[1:].split("/"):
                if segment in ("", ".", "..") or not _PATH_SEGMENT.match(segment):
                    raise InvalidSpiffeId(f"path segment {segment!r} in {self.path!r} is not allowed")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        prefix = "spiffe://"
        if not text.lower().startswith(prefix):
            raise InvalidSpiffeId(f"{text!r} does not start with {prefix!r}")
        rest = text[len(prefix):]
        if any(c in rest for c in "?#"):
            raise InvalidSpiffeId(f"{text!r} must not carry a query or fragment")
        domain, slash, path = rest.partition("/")
        return cls(domain.lower(), slash + path if slash else "")

    @classmethod
    def for_service_account(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    def namespace_and_service_account(self) -> tuple[str, str] | None:
        """(ns, sa) when the path has the Kubernetes shape `/ns/<ns>/sa/<sa>`."""
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    def __str__(self) -> str:
        return self.uri
