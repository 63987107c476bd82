"""The architecture's import contracts (pyproject.toml [tool.importlinter]): kept by the tree, broken by a bad import."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="needs import-linter (the dev extra)")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the meshca package under `root`, with that tree's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )


def copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "meshca", tmp_path / "meshca", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(root: Path, module: str, statement: str) -> None:
    path = root / module
    path.write_text(path.read_text() + f"\n{statement}  # broken on purpose\n")


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("meshca/xds/snapshot.py", "import meshca.ca", "The snapshot engine and the wire framing import nothing else"),
        ("meshca/xds/snapshot.py", "import meshca.clock", "The snapshot engine and the wire framing import nothing else"),
        ("meshca/xds/server.py", "import meshca.identity.jwt", "xds knows nothing of CAs, identity sources"),
        ("meshca/ca/crypto.py", "import meshca.sds.rotation", "The CA knows nothing of xDS"),
        ("meshca/sds/rotation.py", "import meshca.app", "Only the tools on top (cli, dev) import the composition root"),
        ("meshca/app.py", "import meshca.dev.demo", "Only cli imports the tools (cli, dev)"),
        ("meshca/mesh/model.py", "import cryptography.x509", "cryptography is imported only by meshca.ca.crypto"),
        ("meshca/identity/spiffe.py", "import meshca.mesh.model", "Layers: each imports only those below it"),
        ("meshca/xds/status.py", "import meshca.xds.sotw", "xds: what to send (snapshot, cache) never imports how"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, statement: str, contract: str) -> None:
    root = copy_tree(tmp_path)
    add_import(root, module, statement)
    result = lint_imports(root)
    assert result.returncode != 0
    broken = " ".join(result.stdout.split())  # lint-imports wraps long contract names
    assert f"{contract}" in broken and "BROKEN" in broken, result.stdout


def test_a_module_without_a_layer_breaks_the_layers_contract(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "meshca" / "stray.py").write_text('"""Not placed in a layer."""\n')
    result = lint_imports(root)
    assert result.returncode != 0
    assert "meshca.stray" in result.stdout


def hazmat_importers(root: Path) -> list[str]:
    """Modules under root/meshca importing cryptography.hazmat in any form (lint-imports sees only `cryptography`)."""
    found = []
    for path in sorted((root / "meshca").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if any(name == "cryptography.hazmat" or name.startswith("cryptography.hazmat.") for name in names):
                found.append(path.relative_to(root).as_posix())
                break
    return found


def test_only_the_crypto_module_imports_cryptography_hazmat(tmp_path: Path) -> None:
    assert hazmat_importers(ROOT) == ["meshca/ca/crypto.py"]
    root = copy_tree(tmp_path)
    add_import(root, "meshca/dev/demo.py", "from cryptography import hazmat")
    assert hazmat_importers(root) == ["meshca/ca/crypto.py", "meshca/dev/demo.py"]
