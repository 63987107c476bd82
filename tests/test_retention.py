"""Identities are forgotten a grace period after their last stream: renewal job, key, snapshot, metric series."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import timedelta
from pathlib import Path

from fakes import T0, FakeClock, FakeScheduler
from xds_client import ROOTCA_AND_DEFAULT, XdsClient

from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.identity.spiffe import SpiffeId
from meshca.sds.retention import IdentityRetention
from meshca.sds.rotation import LeafRotator, RenewalPolicy
from meshca.sds.workloads import MeshPublisher, WorkloadSecrets
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import ResourceType

LOG = logging.getLogger("test.retention")
GRACE = timedelta(minutes=10)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(T0)
        ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain="mesh.test"), self.clock)
        self.secrets = WorkloadSecrets(ca, self.clock, LOG)
        self.cache = SnapshotCache()
        self.publisher = MeshPublisher(self.cache, self.secrets, LOG)
        self.scheduler = FakeScheduler(self.clock)
        self.rotator = LeafRotator(
            self.secrets, self.publisher, self.scheduler, RenewalPolicy(), self.clock, LOG, random.Random(1)
        )
        self.secrets.set_issue_listener(self.rotator.on_issued)
        self.retention = IdentityRetention(
            (self.rotator, self.secrets, self.publisher), self.scheduler, GRACE, self.clock, LOG
        )

    def connect(self, spiffe_id: SpiffeId) -> None:
        self.retention.opened(spiffe_id)
        self.publisher.ensure_identity(spiffe_id)


def test_an_identity_is_forgotten_a_grace_period_after_its_last_stream(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    alice = SpiffeId.for_service_account("mesh.test", "shop", "alice")
    rig.connect(alice)
    rig.connect(alice)  # two streams of one identity
    assert set(rig.scheduler.jobs) == {"renew:" + alice.uri}
    rig.retention.closed(alice)
    rig.scheduler.advance_to(T0 + GRACE * 2)  # one stream left: nothing forgotten, renewals go on
    assert rig.secrets.certificates() and rig.cache.get(alice.uri) is not None
    rig.retention.closed(alice)
    rig.scheduler.advance_to(rig.clock.now + GRACE - timedelta(seconds=1))
    assert rig.secrets.certificates()
    rig.scheduler.advance_to(rig.clock.now + timedelta(seconds=2))
    assert rig.secrets.certificates() == []
    assert rig.scheduler.jobs == {}  # no renewal, no pending forget
    assert rig.cache.get(alice.uri) is None and rig.publisher.identities() == 0
    assert rig.retention.forgotten_total() == 1
    rig.publisher.refresh_all()  # a bundle change does not bring it back
    assert rig.cache.get(alice.uri) is None
    rig.connect(alice)  # it comes back: a new certificate, renewed again
    assert len(rig.secrets.certificates()) == 1 and "renew:" + alice.uri in rig.scheduler.jobs


def test_a_stream_back_within_the_grace_period_keeps_the_certificate(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    bob = SpiffeId.for_service_account("mesh.test", "shop", "bob")
    rig.connect(bob)
    serial = rig.secrets.certificates()[0].serial_number
    rig.retention.closed(bob)
    rig.scheduler.advance_to(T0 + GRACE / 2)
    rig.connect(bob)  # e.g. Envoy reconnecting after a meshca restart or its max stream age
    rig.scheduler.advance_to(T0 + GRACE * 2 - timedelta(minutes=1))
    assert rig.retention.forgotten_total() == 0
    assert rig.secrets.certificates()[0].serial_number == serial  # 1 h leaf: not yet due for renewal


async def test_churn_leaves_no_certificates_jobs_snapshots_or_series(tmp_path: Path) -> None:
    """2,000 identities coming and going held 1,877 certificates renewed forever; now they all go."""
    from meshca_harness import running_meshca

    async with running_meshca(tmp_path, identity_grace=timedelta(seconds=0.5)) as meshca:
        app = meshca.app
        baseline_jobs = app.jobs.job_ids()
        channel = meshca.channel()
        count = 40
        clients = []
        for i in range(count):
            client = XdsClient(channel, meshca.token("churn", f"sa{i}", node_id=f"node-{i}"))
            await client.send(ResourceType.SECRET.type_url, ROOTCA_AND_DEFAULT, node_id=f"node-{i}")
            await client.recv()
            clients.append(client)
        assert len(app.secrets.certificates()) == count
        assert len([j for j in app.jobs.job_ids() if j.startswith("renew:")]) == count
        text = app.observability.metrics_text().decode()
        assert text.count("meshca_workload_certificate_expiry_seconds{identity=") == count
        for client in clients:
            client.call.cancel()
        await channel.close()
        deadline = time.monotonic() + 10
        while app.secrets.certificates() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert app.secrets.certificates() == []
        assert app.jobs.job_ids() == baseline_jobs
        assert app.cache.keys() == [] and app.publisher.identities() == 0
        text = app.observability.metrics_text().decode()
        assert "meshca_workload_certificate_expiry_seconds{identity=" not in text
        assert app.retention.forgotten_total() == count
        issued = app.secrets.issued_total()
        await asyncio.sleep(1.0)
        assert app.secrets.issued_total() == issued  # nothing renewed any more
