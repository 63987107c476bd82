"""The CA interface: every mode is a meshca.ca.api.MeshCa (checked by mypy), and its capabilities are properties."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshca.ca.api import CaSettings, MeshCa
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock

ROOT = Path(__file__).resolve().parent.parent
# Each declares `_conforms(ca: <its class>) -> MeshCa` after its class.
CONFORMING = (
    "meshca/ca/internal.py", "meshca/ca/vault/intermediate.py", "meshca/ca/vault/leaf.py", "meshca/store/ca.py"
)


def run_mypy(paths: list[str], cache: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
         "--cache-dir", str(cache), *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert "No module named mypy" not in result.stderr, "mypy is missing: pip install -e '.[dev]'"
    return [line for line in result.stdout.splitlines() if ": error:" in line]


def test_every_ca_mode_conforms_to_the_protocol_and_a_missing_member_is_caught(tmp_path: Path) -> None:
    # The same mypy run also checks a copy of vault-leaf without `tick`: the check must see that.
    leaf = (ROOT / "meshca/ca/vault/leaf.py").read_text()
    assert leaf.count("    def tick(") == 1
    broken = tmp_path / "leaf_without_tick.py"
    broken.write_text(leaf.replace("    def tick(", "    def _no_tick("))
    errors = run_mypy([*CONFORMING, str(broken)], tmp_path / "mypy-cache")
    assert [e for e in errors if not e.startswith(str(broken))] == []
    assert any("MeshCa" in e for e in errors), errors


def test_internal_ca_capabilities(tmp_path: Path) -> None:
    ca: MeshCa = CertificateAuthority.init(tmp_path / "ca", CaSettings("example.org"), system_clock)
    assert (ca.signs_remotely, ca.can_rotate_intermediate, ca.can_rotate_root) == (False, True, True)
    assert [e.event for e in ca.rotate_root(now=True)][:2] == ["prepared", "prepared"]

