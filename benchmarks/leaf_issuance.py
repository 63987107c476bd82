"""Benchmark 1: in-process workload leaf issuance (key generation + sign), one core.

meshca: `CertificateAuthority.issue_workload` (new P-256 key, X.509-SVID signed by the active
intermediate, chain assembled). Baseline, same run, same process: `meshca.ca.crypto.Issuer
.issue_server_certificate`, i.e. a new P-256 key and a leaf signed through cryptography's standard
`x509.CertificateBuilder` — what a CA written the obvious way with pyca/cryptography does.
The two are measured in alternating slices so machine noise hits both alike. A third path, measured in the
same slices, records each leaf in a real audit log (meshca.audit.AuditLog on a temp file: buffered, a thread
writes and fsyncs every 100 ms) as SDS does: its rate against the first is the audit log's cost.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks.common import TRUST_DOMAIN, Profile, Row
from meshca.audit import AuditEvent, AuditLog, IssuerIds
from meshca.ca.api import CaSettings
from meshca.ca.crypto import DistinguishedName, Issuer, generate_private_key_pem, self_signed_ca_certificate_pem
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.identity.spiffe import SpiffeId

NAME = "leaf_issuance_in_process"
TARGET = ">= 10000 certs/s"


def _rate(action, seconds: float) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            action(count)
            count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


def measure(seconds: float, slices: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-leaf-") as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca", CaSettings(trust_domain=TRUST_DOMAIN), system_clock)
        identities = [SpiffeId.for_service_account(TRUST_DOMAIN, "bench", f"w{i}") for i in range(1000)]

        key = generate_private_key_pem()
        now = datetime.now(timezone.utc)
        root_pem = self_signed_ca_certificate_pem(
            key,
            subject=DistinguishedName("baseline CA"),
            uris=[f"spiffe://{TRUST_DOMAIN}"],
            not_before=now - timedelta(minutes=1),
            not_after=now + timedelta(days=1),
            serial_number=1,
        )
        baseline_issuer = Issuer(root_pem, key)
        not_after = now + timedelta(hours=1)

        def meshca_one(i: int) -> None:
            ca.issue_workload(identities[i % 1000])

        audit = AuditLog(Path(tmp) / "audit.jsonl", "bench", system_clock, logging.getLogger("bench.audit"))
        audit.open()
        issuer_ids = IssuerIds()

        def audited_one(i: int) -> None:
            leaf = ca.issue_workload(identities[i % 1000])
            audit.record(AuditEvent(
                "issue", spiffe_id=identities[i % 1000].uri, serial=leaf.serial_number, node_id="bench-node",
                issuer=issuer_ids.of_chain(leaf.chain_pem), not_before=leaf.not_before, not_after=leaf.not_after,
            ))

        def baseline_one(i: int) -> None:
            baseline_issuer.issue_server_certificate(
                dns_names=["w.bench.svc"], ip_addresses=[], not_before=now, not_after=not_after, serial_number=i + 2
            )

        _rate(meshca_one, 0.2)  # warm up every path
        _rate(baseline_one, 0.2)
        _rate(audited_one, 0.2)
        totals = {"meshca": [0, 0.0], "baseline": [0, 0.0], "audited": [0, 0.0]}
        for _ in range(slices):
            for label, action in (("meshca", meshca_one), ("baseline", baseline_one), ("audited", audited_one)):
                count, elapsed = _rate(action, seconds / slices)
                totals[label][0] += count
                totals[label][1] += elapsed
        audit.close()
        return {label: count / elapsed for label, (count, elapsed) in totals.items()}


def run(profile: Profile, workdir: Path) -> list[Row]:
    rates = measure(profile.leaf_seconds)
    value = rates["meshca"]
    return [
        Row(
            NAME,
            value,
            "certs/s",
            "cryptography x509.CertificateBuilder leaf (key generation + sign)",
            rates["baseline"],
            TARGET,
            value >= 10_000,
            {
                "key": "ECDSA P-256",
                "seconds_each": profile.leaf_seconds,
                "threads": 1,
                "path": "CertificateAuthority.issue_workload",
                "audited_certs_per_s": round(rates["audited"]),
                "audit_overhead_percent": round(100 * (1 - rates["audited"] / value), 1),
            },
        )
    ]
