"""At info, an idle `meshca serve` writes no periodic lines; durations are shown for people (issue 11, defect 15)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from meshca.clock import format_duration
from meshca.dev.envoy_process import free_port, wait_until


def meshca_command() -> list[str]:
    script = Path(sys.executable).parent / "meshca"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli.main"]


def serve_idle(tmp_path: Path, seconds: float, log_level: str) -> list[dict[str, object]]:
    directory = tmp_path / "dev"
    assert subprocess.run([*meshca_command(), "dev", "init", "--dir", str(directory)], capture_output=True).returncode == 0
    config_path = directory / "meshca.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.update(listen=f"127.0.0.1:{free_port()}", metrics_port=free_port(), log_level=log_level)
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*meshca_command(), "serve", "--config", str(config_path)], stderr=log)
    try:
        wait_until(lambda: b"serving on" in log_path.read_bytes(), 30, what="meshca serving")
        time.sleep(seconds)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


@pytest.mark.e2e  # a real `meshca serve`, idle for 5 s
def test_an_idle_serve_at_info_writes_no_periodic_lines(tmp_path: Path) -> None:
    lines = serve_idle(tmp_path, 5, "info")
    messages = [str(line["msg"]) for line in lines]
    serving = next(i for i, m in enumerate(messages) if "serving on" in m)
    stopping = next(i for i, m in enumerate(messages) if "stopping gracefully" in m)
    assert messages[serving + 1 : stopping] == []  # five idle seconds: nothing
    assert sum("admin endpoint" in m for m in messages) == 1
    assert not any(str(line["logger"]).startswith("apscheduler") for line in lines)


def test_debug_still_shows_the_scheduler(tmp_path: Path) -> None:
    lines = serve_idle(tmp_path, 1.5, "debug")
    assert any(str(line["logger"]).startswith("apscheduler") for line in lines)


@pytest.mark.parametrize(
    ("duration", "shown"),
    [
        (timedelta(minutes=3, seconds=10.022016), "3m10.022s"),
        (timedelta(minutes=3, seconds=10), "3m10s"),
        (timedelta(seconds=20), "20s"),
        (timedelta(hours=1), "1h"),
        (timedelta(days=90), "90d"),
        (timedelta(days=1, hours=2, seconds=5), "1d2h5s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(0), "0s"),
        (timedelta(seconds=-90), "-1m30s"),
    ],
)
def test_durations_are_shown_for_people(duration: timedelta, shown: str) -> None:
    assert format_duration(duration) == shown
