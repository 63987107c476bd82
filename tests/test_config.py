"""`meshca serve` settings: every error names the file, the field path and the reason."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from meshca.config import ConfigError, load_serve_settings, parse_duration

GOOD = """
state_dir: ca
listen: 127.0.0.1:15010
issuers:
  - issuer: https://issuer.test
    audiences: [meshca]
    jwks: jwks.json
leaf_ttl: 30m
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    path = tmp_path / "meshca.yaml"
    path.write_text(text)
    return path


def test_good_settings(tmp_path: Path) -> None:
    settings = load_serve_settings(write(tmp_path, GOOD), "mesh.test")
    assert settings.listen_port == 15010 and settings.leaf_ttl == timedelta(minutes=30)
    assert settings.xds_send_timeout == timedelta(seconds=30)  # the default
    tuned = load_serve_settings(write(tmp_path, GOOD + "xds_send_timeout: 2m\n"), "mesh.test")
    assert tuned.xds_send_timeout == timedelta(minutes=2)
    assert settings.xds_max_stream_age == timedelta(minutes=30)  # the default
    aged = load_serve_settings(write(tmp_path, GOOD + "xds_max_stream_age: 5m\n"), "mesh.test")
    assert aged.xds_max_stream_age == timedelta(minutes=5)
    assert settings.state_dir == (tmp_path / "ca").resolve()
    assert settings.issuers[0].trust_domain == "mesh.test"
    assert settings.issuers[0].jwks_path == (tmp_path / "jwks.json").resolve()


@pytest.mark.parametrize(
    "edit, field, reason",
    [
        (("listen: 127.0.0.1:15010", "listen: nowhere"), "listen", "not host:port"),
        (("leaf_ttl: 30m", "leaf_ttl: soon"), "leaf_ttl", "not a duration"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nlisten_port: 1"), "listen_port", "unknown field"),
        (("jwks: jwks.json", "jwks: missing.json"), "issuers[0].jwks", "does not exist"),
        (("audiences: [meshca]", "audiences: meshca"), "issuers[0].audiences", "must be list"),
        (("    jwks: jwks.json", "    jwks: jwks.json\n    algorithms: [HS256]"), "issuers[0]", "HS256"),
        (("state_dir: ca", "state_dir: [1]"), "state_dir", "must be str"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nxds_send_timeout: 0s"), "xds_send_timeout", "too short"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nxds_send_timeout: later"), "xds_send_timeout", "not a duration"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nxds_max_stream_age: 500ms"), "xds_max_stream_age", "too short"),
    ],
)
def test_errors_name_file_field_and_reason(tmp_path: Path, edit: tuple[str, str], field: str, reason: str) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as error:
        load_serve_settings(path, "mesh.test")
    assert error.value.field == field
    assert reason in error.value.reason
    assert str(error.value).startswith(f"{path}: {field}: ")


def test_missing_issuers_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="issuers: is required"):
        load_serve_settings(write(tmp_path, "state_dir: ca\n"), "mesh.test")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_serve_settings(write(tmp_path, "state_dir: [unclosed\n"), "mesh.test")


def test_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1h") == timedelta(hours=1)
    assert parse_duration(5) == timedelta(seconds=5)
    with pytest.raises(ValueError):
        parse_duration(True)
