"""etcd endpoints given by DNS name (Kubernetes: `meshca-etcd:2379`), against a real etcd member."""

from __future__ import annotations

import logging
import socket

import pytest

from meshca.dev.etcd_process import EtcdProcess
from meshca.store.etcd import EtcdSettings, EtcdStore, StoreUnavailable, resolve_endpoints

pytestmark = pytest.mark.e2e


def loopback_name() -> str:
    """A name other than `localhost` (etcd3aio rewrites that one itself) that resolves to 127.0.0.1 only."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 2379, socket.AF_INET, socket.SOCK_STREAM)}
    except OSError:
        addresses = set()
    if addresses != {"127.0.0.1"}:
        pytest.skip(f"the host name {name!r} does not resolve to 127.0.0.1 alone")
    return name



async def round_trip(endpoints: tuple[str, ...], key: str) -> bytes:
    store = EtcdStore(EtcdSettings(endpoints, prefix="/dns"), logging.getLogger("t"))
    await store.connect()
    try:
        await store.put(key, b"by name")
        value = await store.get(key)
        assert value is not None
        return value.value
    finally:
        await store.close()


async def test_one_name_is_a_dns_target(etcd: EtcdProcess) -> None:
    """One name, as a headless Service: gRPC resolves it (and again after failures)."""
    assert await round_trip((f"{loopback_name()}:{etcd.client_port}",), "one") == b"by name"


async def test_several_names_are_resolved_at_connect(etcd: EtcdProcess) -> None:
    endpoints = (f"{loopback_name()}:{etcd.client_port}", f"localhost:{etcd.client_port}")
    assert resolve_endpoints(endpoints) == (f"127.0.0.1:{etcd.client_port}",)
    assert await round_trip(endpoints, "several") == b"by name"


async def test_names_that_do_not_resolve_are_left_out_or_refused(
    etcd: EtcdProcess, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"localhost:{etcd.client_port}"
    assert await round_trip(("no-such-etcd.invalid:2379", good), "partly") == b"by name"
    assert "etcd endpoints left out, their names do not resolve: no-such-etcd.invalid:2379" in caplog.text
    store = EtcdStore(EtcdSettings(("no-such-etcd.invalid:2379", "nor-this.invalid:2379")), logging.getLogger("t"))
    with pytest.raises(StoreUnavailable, match="no etcd endpoint resolves to an IPv4 address .*no-such-etcd.invalid"):
        await store.connect()
