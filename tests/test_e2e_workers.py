"""`meshca serve --workers N`: N processes share the port (the kernel spreads connections), a plain second
`meshca serve` still fails in one line, SIGTERM stops all, and a worker killed with -9 comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from xds_client import DeltaXdsClient

from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port, wait_until
from meshca.dev.material import DevMaterial, create_dev_material
from meshca.dev.tokens import mint_token
from meshca.xds.snapshot import ResourceType

pytestmark = pytest.mark.e2e

CLIENTS = 16  # all on one of two workers by chance: 2 * 2^-16


def meshca_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshca.cli.main", *args]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(p) for p in text.split())


def admin_json(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Workers:
    def __init__(self, material: DevMaterial, port: int, metrics: int, log: Path) -> None:
        self.material, self.port, self.metrics, self.log = material, port, metrics, log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                meshca_command("serve", "--config", str(material.serve_config), "--workers", "2"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self) -> None:
        def up() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            return healthy(self.metrics) and healthy(self.metrics + 1)

        wait_until(up, 60, 0.1, "both workers serving")

    def proxies(self, index: int) -> set[str]:
        return {p["node_id"] for p in admin_json(self.metrics + index, "/status")}  # type: ignore[union-attr]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    port, metrics = free_port(), admin_ports()
    material = create_dev_material(
        tmp_path / "dev", "mesh.local", system_clock, listen=f"127.0.0.1:{port}", sample_mesh=True, metrics_port=metrics
    )
    running = Workers(material, port, metrics, tmp_path / "meshca.log")
    try:
        running.wait_serving()
        yield running
    finally:
        if running.process.poll() is None:
            for pid in children(running.process.pid):
                os.kill(pid, signal.SIGKILL)
            running.process.kill()
            running.process.wait()


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def admin_ports() -> int:
    """A first admin port whose next one is free too (worker i serves on metrics_port + i), below the ephemeral
    range: a port from free_port() is ephemeral, so any outgoing connection of the suite may take its neighbour
    before the workers bind it."""
    import random

    low, _ = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    while True:
        port = random.randrange(20_000, min(low, 32_000) - 1)
        if _bindable(port) and _bindable(port + 1):
            return port


async def open_streams(workers: Workers, count: int) -> list[tuple[grpc.aio.Channel, DeltaXdsClient]]:
    """`count` delta ADS streams, each on its own TCP connection, each answered once (so it is registered)."""
    key = workers.material.signing_key.read_bytes()
    credentials = grpc.ssl_channel_credentials(workers.material.root_bundle.read_bytes())
    streams = []
    for i in range(count):
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{workers.port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)],
        )
        token = mint_token(key, namespace="shop", service_account="frontend", node_id=f"node-{i}", now=system_clock())
        client = DeltaXdsClient(channel, token)
        await client.send(ResourceType.SECRET.type_url, ("ROOTCA",), node_id=f"node-{i}")
        streams.append((channel, client))
    for _, client in streams:
        await client.recv(timeout=20)
    return streams


async def close_streams(streams: list[tuple[grpc.aio.Channel, DeltaXdsClient]]) -> None:
    for channel, client in streams:
        client.close()
        await channel.close()


def test_second_plain_serve_on_the_shared_port_fails_in_one_line(workers: Workers) -> None:
    # check_bindable's probe has no SO_REUSEPORT, so the workers' SO_REUSEPORT listeners still refuse it
    other = workers.material.directory / "other.yaml"  # beside the first: its relative paths resolve alike
    config = yaml.safe_load(workers.material.serve_config.read_text())
    config["metrics_port"] = free_port()
    other.write_text(yaml.safe_dump(config))
    for extra in ([], ["--workers", "2"]):
        result = subprocess.run(
            meshca_command("serve", "--config", str(other), *extra), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"meshca: error: listen: 127.0.0.1:{workers.port} is already in use"]


def test_both_workers_take_connections_and_sigterm_stops_all(workers: Workers) -> None:
    async def scenario() -> tuple[set[str], set[str]]:
        streams = await open_streams(workers, CLIENTS)
        try:
            wait_until(lambda: len(workers.proxies(0) | workers.proxies(1)) == CLIENTS, 20, 0.1, "all registered")
            return workers.proxies(0), workers.proxies(1)
        finally:
            await close_streams(streams)

    first, second = asyncio.run(scenario())
    assert first and second and not first & second, (first, second)
    pids = children(workers.process.pid)
    assert len(pids) == 2
    started = time.monotonic()
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=20) == 0
    took = time.monotonic() - started
    assert all(_gone(pid) for pid in pids)
    assert took < 10, took
    log = workers.log.read_text()
    assert "Traceback" not in log
    assert log.count("meshca stopped") == 2 and "all workers stopped" in log


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (exited, not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def worker_pids(workers: Workers) -> dict[int, int]:
    """worker index -> pid, from each child's command line."""
    found = {}
    for pid in children(workers.process.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found[int(argv[argv.index(b"--worker-index") + 1])] = pid
    return found


def test_a_killed_worker_is_restarted_and_its_clients_reconnect(workers: Workers) -> None:
    async def scenario() -> None:
        streams = await open_streams(workers, CLIENTS)
        wait_until(lambda: len(workers.proxies(0) | workers.proxies(1)) == CLIENTS, 20, 0.1, "all registered")
        on_victim = workers.proxies(1)
        assert on_victim
        victim = worker_pids(workers)[1]
        os.kill(victim, signal.SIGKILL)
        ended = []
        for i, (_, client) in enumerate(streams):
            if f"node-{i}" in on_victim:
                code, _ = await client.status(timeout=10)
                ended.append(code)
        assert set(ended) == {grpc.StatusCode.UNAVAILABLE}
        wait_until(lambda: worker_pids(workers).get(1, victim) != victim, 20, 0.1, "the killed worker replaced")
        workers.wait_serving()
        assert f"worker 1 (pid {victim}) exited unexpectedly (killed by SIGKILL)" in workers.log.read_text()
        await close_streams(streams)
        # the clients come back (new connections, spread over both workers again) and are all served
        again = await open_streams(workers, CLIENTS)
        wait_until(lambda: len(workers.proxies(0) | workers.proxies(1)) == CLIENTS, 20, 0.1, "all back")
        await close_streams(again)

    asyncio.run(scenario())


def test_workers_of_a_killed_supervisor_stop_by_themselves(workers: Workers) -> None:
    pids = children(workers.process.pid)
    workers.process.kill()
    workers.process.wait()
    wait_until(lambda: all(_gone(pid) for pid in pids), 15, 0.1, "orphaned workers stopped")
    assert workers.log.read_text().count("meshca stopped") == 2


@pytest.mark.parametrize(
    "workers_arg, setting, message",
    [
        ("0", None, "argument --workers: '0' is not a number of processes in 1..256"),
        ("2", {"listen": "127.0.0.1:0"}, "listen: port 0 cannot be shared by --workers: give a fixed port"),
    ],
)
def test_bad_worker_settings_fail_in_one_line(
    tmp_path: Path, workers_arg: str, setting: dict[str, str] | None, message: str
) -> None:
    material = create_dev_material(tmp_path / "dev", "mesh.local", system_clock, listen=f"127.0.0.1:{free_port()}")
    if setting:
        config = yaml.safe_load(material.serve_config.read_text())
        config.update(setting)
        material.serve_config.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        meshca_command("serve", "--config", str(material.serve_config), "--workers", workers_arg),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr


def test_workers_on_a_store_are_replicas_that_share_the_ca_in_etcd(tmp_path: Path) -> None:
    from meshca.dev.etcd_process import EtcdProcess

    port, metrics = free_port(), admin_ports()
    with EtcdProcess() as etcd:
        (tmp_path / "kek").write_bytes(os.urandom(32))
        store = {"etcd": {"endpoints": [etcd.endpoint], "kek_file": str(tmp_path / "kek"), "lease_ttl": "3s"}}
        material = create_dev_material(tmp_path / "dev", "mesh.local", system_clock, listen=f"127.0.0.1:{port}",
                                       metrics_port=metrics, extra_settings={"store": store})
        imported = subprocess.run(
            meshca_command("ca", "import", "--config", str(material.serve_config), "--state-dir", str(material.state_dir)),
            capture_output=True, text=True, timeout=60,
        )
        assert imported.returncode == 0, imported.stderr
        run = Workers(material, port, metrics, tmp_path / "workers.log")
        try:
            run.wait_serving()
            workers = children(run.process.pid)
            assert len(workers) == 2

            def replica_keys() -> set[str]:
                result = subprocess.run(
                    [str(Path(sys.executable).parent / "etcdctl"), f"--endpoints={etcd.endpoint}", "get",
                     "--prefix", "--keys-only", "/meshca/"], capture_output=True, text=True, timeout=10,
                )
                return {line for line in result.stdout.split() if line.startswith("/meshca/replicas/") or
                        line == "/meshca/ca/leader"}

            # each worker is a replica of its own (its registry key) and one of them leads the CA
            expected = {f"/meshca/replicas/{os.uname().nodename}-{pid}" for pid in workers} | {"/meshca/ca/leader"}
            wait_until(lambda: replica_keys() == expected, 20, 0.2, "both workers registered, one CA leader")
            run.process.send_signal(signal.SIGTERM)
            assert run.process.wait(30) == 0
            # stopped cleanly: their leases are revoked, not left to expire (this caught serve starting the
            # leader campaign twice: two loops raced over one lease and the key outlived the workers)
            assert replica_keys() == set()
        finally:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
