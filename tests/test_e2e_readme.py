"""README.md's "Running meshca yourself", run as written: ends in HTTP 200 through two Envoys over mTLS and
a working `meshca status`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshca.clock import system_clock
from meshca.config import load_serve_settings
from meshca.dev.envoy_process import free_port, wait_until
from meshca.dev.material import DEV_METRICS_PORT, create_dev_material
from meshca.mesh.model import load_mesh_config

README = Path(__file__).resolve().parent.parent / "README.md"
VENV_BIN = Path(sys.executable).parent
# The fixed ports of the walkthrough (meshca gRPC and admin, the two sidecars' listeners, the app,
# the two Envoy admin ports): the test gives each a free port instead, in commands and written files.
FIXED_PORTS = (15010, 15011, 15001, 15006, 8080, 15000, 15100)


def walkthrough() -> list[str]:
    """The commands of the README's "Running meshca yourself" block: continuations joined, comments dropped."""
    text = README.read_text()
    section = text[text.index("Running meshca yourself"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    block = block[:block.index("\n```")]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
        if command:
            commands.append(command)
    return commands


def test_walkthrough_shape() -> None:
    """What the walkthrough must contain for a new user to get to traffic (and what the e2e test relies on)."""
    commands = walkthrough()
    assert commands[0] == "make dev"
    assert any(c.startswith(".venv/bin/meshca serve") and c.endswith("&") for c in commands)
    assert sum(c.startswith(".venv/bin/envoy -c") for c in commands) == 2
    assert any(c.startswith("curl ") for c in commands) and ".venv/bin/meshca status" in commands


def test_dev_init_writes_a_mesh_and_an_admin_port(tmp_path: Path) -> None:
    material = create_dev_material(tmp_path, "mesh.local", system_clock, sample_mesh=True, metrics_port=DEV_METRICS_PORT)
    settings = load_serve_settings(material.serve_config, "mesh.local")
    assert settings.metrics_port == 15011 and settings.mesh_file == (tmp_path / "mesh.yaml").resolve()
    mesh = load_mesh_config(settings.mesh_file)
    assert [s.name for s in mesh.services] == ["backend", "frontend"]


class Shell:
    """Runs the walkthrough's commands with bash in one directory, the fixed ports swapped for free ones."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.ports = {fixed: free_port() for fixed in FIXED_PORTS}
        self.background: list[subprocess.Popen[bytes]] = []

    def swap_ports(self, text: str) -> str:
        return re.sub(r"(?<![\d.])(\d{4,5})(?!\d)", lambda m: str(self.ports.get(int(m[1]), m[1])), text)

    def script(self, command: str) -> str:
        command = self.swap_ports(command)
        if command.startswith(".venv/bin/meshca bootstrap"):
            command += f" --meshca 127.0.0.1:{self.ports[15010]}"  # the default is the fixed 15010
        if command == ".venv/bin/meshca status":
            command += f" --admin http://127.0.0.1:{self.ports[15011]}"  # the default is the fixed 15011
        command = re.sub(r"^\.venv/bin/", f"{VENV_BIN}/", command)
        command = re.sub(r"^python3 ", f"{sys.executable} ", command)
        return "exec " + command  # exec: the process started is the command itself (terminate reaches it)

    def start(self, command: str) -> None:
        self.background.append(subprocess.Popen(["bash", "-c", self.script(command)], cwd=self.cwd))

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", self.script(command)], cwd=self.cwd, capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        return "\n".join(f"{p.name}:\n" + p.read_text(errors="replace")[-1500:] for p in sorted(self.cwd.glob("*.log")))

    def stop(self) -> None:
        for process in reversed(self.background):
            process.terminate()
        for process in self.background:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path)
    try:
        yield shell
    finally:
        shell.stop()


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("curl") is None, reason="the walkthrough uses curl")
def test_readme_walkthrough_ends_in_mtls_traffic_and_status(shell: Shell) -> None:
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    for command in walkthrough():
        if command == "make dev" or command.startswith("kill "):
            continue  # the venv is this one; the fixture stops what was started
        if command.endswith("&"):
            shell.start(command.removesuffix("&").strip())
            if " serve " in command:
                wait_until(lambda: (shell.cwd / "certs-dev").exists(), 5, what="dev material")
            continue
        result = shell.run(command)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}\n{shell.logs()}"
        results[command.split()[0] + " " + command.split()[1]] = result
        if command.endswith("meshca dev init"):
            # the written files use the walkthrough's fixed ports too
            for name in ("meshca.yaml", "mesh.yaml"):
                path = shell.cwd / "certs-dev" / name
                path.write_text(shell.swap_ports(path.read_text()))
    curl = next(v for k, v in results.items() if k.startswith("curl"))
    assert curl.stdout.strip() == "200", curl.stdout + curl.stderr + shell.logs()
    status = results[".venv/bin/meshca status"]
    assert "frontend-1" in status.stdout and "backend-1" in status.stdout, status.stdout
    assert "SYNCED" in status.stdout, status.stdout
    # the request crossed the two sidecars over mTLS: backend's inbound listener did a TLS handshake
    # with a client certificate (the listener requires one)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{shell.ports[15100]}/stats?filter=ssl", timeout=5) as response:
        stats = response.read().decode()
    handshakes = sum(int(v) for v in re.findall(r"^listener\.127\.0\.0\.1_\d+\.ssl\.handshake: (\d+)$", stats, re.M))
    assert handshakes >= 1, stats
    assert "frontend" in urllib.request.urlopen(
        f"http://127.0.0.1:{shell.ports[15000]}/certs", timeout=5
    ).read().decode()
