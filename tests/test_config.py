"""`meshca serve` settings: every error names the file, the field path and the reason."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from jwks_server import JwksServer

from meshca.ca.backends import build_ca_backend
from meshca.ca.crypto import KeyAlgorithm, generate_private_key_pem, public_jwk, public_key_pem
from meshca.clock import format_duration, system_clock
from meshca.config import load_serve_settings
from meshca.fields import ConfigError, parse_duration

GOOD = """
state_dir: ca
listen: 127.0.0.1:15010
issuers:
  - issuer: https://issuer.test
    audiences: [meshca]
    jwks: jwks.json
leaf_ttl: 30m
"""


JWKS = json.dumps({"keys": [public_jwk(public_key_pem(generate_private_key_pem(KeyAlgorithm.EC_P256)), "k1")]})


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "meshca"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=20)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "jwks.json").write_text(JWKS)
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
    assert parse_duration("1") == parse_duration(" 1 ") == timedelta(seconds=1)  # a number of seconds, as text
    assert parse_duration("2.5") == timedelta(seconds=2.5)
    for bad in (True, "-1", "1 minute", "", "1e3"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    "value, text",
    [
        (timedelta(minutes=5), "5m"),
        (timedelta(seconds=10), "10s"),
        (timedelta(days=90), "90d"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(minutes=3, seconds=10, microseconds=22016), "3m10.022s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(0), "0s"),
        (timedelta(seconds=-90), "-1m30s"),
    ],
)
def test_format_duration_reads_like_settings(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize(
    "edit, message",
    [
        # the file and the field once, not "<file>: listen: <file>: listen: ..."
        (("listen: 127.0.0.1:15010", "listen: 5"), "listen: must be str, got int"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nrotation:\n  renew_at: 1.5"), "rotation.renew_at: 1.5 must be between 0 and 1"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nrotation:\n  jitter: 0.9"), "rotation.jitter: 0.9 must be >= 0"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nrotation:\n  renew_at: 0.8\n  hard_zone: 0.3"), "rotation.hard_zone: 0.3"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nrotation:\n  renew_at: soon"), "rotation.renew_at: must be int or float"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nxds_send_timeout: 500ms"), "xds_send_timeout: 500ms is too short"),
        (("listen: 127.0.0.1:15010", "listen: [unclosed"), "invalid YAML at line 4, column 8: did not find expected ',' or ']' (while parsing a flow sequence at line 3, column 9)"),
        (("leaf_ttl: 30m", "leaf_ttl: 30m\nleaf_ttl: 1h"), "invalid YAML at line 9, column 1: key 'leaf_ttl' is given twice"),
    ],
)
def test_messages_are_one_line_naming_file_and_field_once(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as error:
        load_serve_settings(path, "mesh.test")
    text = str(error.value)
    assert text.startswith(f"{path}: {message}"), text
    assert text.count(str(path)) == 1 and "\n" not in text and "<unicode string>" not in text


def test_serve_names_durations_as_durations(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    assert meshca("dev", "init", "--dir", str(directory)).returncode == 0
    config = directory / "meshca.yaml"
    config.write_text(config.read_text().replace("leaf_ttl: 1h", "leaf_ttl: 1m"))
    result = meshca("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"meshca: error: {config}: leaf_ttl: 1m is outside the CA's leaf TTL bounds [5m, 90d] (set at `meshca ca init`)"
    )


def test_dev_token_ttl_in_seconds(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    assert meshca("dev", "init", "--dir", str(directory)).returncode == 0
    token = meshca("dev", "token", "--dir", str(directory), "--ns", "a", "--sa", "b", "--ttl", "90")
    assert token.returncode == 0, token.stderr
    claims = jwt.decode(token.stdout.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 90
    bad = meshca("dev", "token", "--dir", str(directory), "--ns", "a", "--sa", "b", "--ttl", "soon")
    assert bad.returncode == 2 and bad.stderr.startswith("meshca: error: --ttl: 'soon' is not a duration")


def break_jwks(jwks: Path, content: str | None) -> None:
    """Make a JWKS file unusable: missing (None), unreadable ("directory"), or the given text."""
    jwks.unlink()
    if content == "directory":
        jwks.mkdir()  # unreadable even for root, unlike a mode-0 file
    elif content is not None:
        jwks.write_text(content)


BROKEN_JWKS = [
    (None, "does not exist"),
    ("directory", "Is a directory"),
    ('{"keys": 5}', "not a JWKS document"),
    ("{not json", "not JSON"),
]


@pytest.mark.parametrize("content, cause", BROKEN_JWKS)
def test_unusable_jwks_is_an_error_at_load(tmp_path: Path, content: str | None, cause: str) -> None:
    path = write(tmp_path, GOOD)
    break_jwks(tmp_path / "jwks.json", content)
    with pytest.raises(ConfigError) as error:
        load_serve_settings(path, "mesh.test")
    assert error.value.field == "issuers[0].jwks"
    assert cause in error.value.reason and str((tmp_path / "jwks.json").resolve()) in error.value.reason
    assert str(error.value).startswith(f"{path}: issuers[0].jwks: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("content, cause", BROKEN_JWKS)
def test_serve_with_unusable_jwks_exits_2_with_one_line(tmp_path: Path, content: str | None, cause: str) -> None:
    directory = tmp_path / "dev"
    assert meshca("dev", "init", "--dir", str(directory)).returncode == 0
    break_jwks(directory / "jwks.json", content)
    result = meshca("serve", "--config", str(directory / "meshca.yaml"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"meshca: error: {directory / 'meshca.yaml'}: issuers[0].jwks: ")
    assert cause in lines[0] and "jwks.json" in lines[0]


def test_ca_leaf_ttl_min_below_the_floor_is_named_with_durations(tmp_path: Path) -> None:
    (tmp_path / "vault-token").write_text("not-a-real-token")
    path = write(
        tmp_path,
        GOOD + "ca:\n  mode: vault-leaf\n  trust_domain: mesh.test\n  leaf_ttl_min: 5s\n"
        "  vault:\n    address: https://127.0.0.1:1\n    auth: {method: token, token_file: vault-token}\n",
    )
    with pytest.raises(ConfigError) as error:
        build_ca_backend(path, system_clock, logging.getLogger("test"))
    assert str(error.value) == f"{path}: ca.leaf_ttl_min: 5s is below meshca's floor of 10s"


@pytest.fixture
def jwks_server(tmp_path: Path) -> Iterator[JwksServer]:
    server = JwksServer(tmp_path / "jwks-server")
    server.document = JWKS.encode()
    yield server
    server.stop()


def remote_config(server: JwksServer, extra: str = "", ca: str | None = None) -> str:
    ca_line = f"    jwks_ca: {ca or server.ca_file}\n"
    return GOOD.replace("    jwks: jwks.json\n", f"    jwks_uri: {server.url}\n{ca_line}{extra}")


def test_jwks_uri_settings(tmp_path: Path, jwks_server: JwksServer) -> None:
    (tmp_path / "token").write_text("t")
    path = write(tmp_path, remote_config(jwks_server, "    jwks_token: token\n    jwks_refresh: 1m\n"))
    (issuer,) = load_serve_settings(path, "mesh.test").issuers
    assert issuer.jwks_uri == jwks_server.url and issuer.jwks_path is None
    assert issuer.jwks_ca_path == jwks_server.ca_file and issuer.jwks_token_path == (tmp_path / "token").resolve()
    assert issuer.jwks_refresh == timedelta(minutes=1)
    default = load_serve_settings(write(tmp_path, remote_config(jwks_server)), "mesh.test").issuers[0]
    assert default.jwks_refresh == timedelta(minutes=5)


@pytest.mark.parametrize(
    "fault, field, reason",
    [
        ("short-refresh", "jwks_refresh", "5s is too short (at least 10s)"),
        ("missing-ca", "jwks_ca", "does not exist"),
        ("both", "jwks_uri", "not both"),
        ("down", "jwks_uri", "Connection refused"),
        ("http", "jwks_uri", "is not an https:// URL"),
    ],
)
def test_jwks_uri_errors_at_load(tmp_path: Path, jwks_server: JwksServer, fault: str, field: str, reason: str) -> None:
    text = {
        "short-refresh": remote_config(jwks_server, "    jwks_refresh: 5s\n"),
        "missing-ca": remote_config(jwks_server, ca="missing.pem"),
        "both": remote_config(jwks_server, "    jwks: jwks.json\n"),
        "down": remote_config(jwks_server),
        "http": remote_config(jwks_server).replace("https://", "http://"),
    }[fault]
    if fault == "down":
        jwks_server.stop()
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_serve_settings(path, "mesh.test")
    assert str(error.value).startswith(f"{path}: issuers[0].{field}: ") and reason in error.value.reason, error.value


def test_jwks_fields_need_jwks_uri(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("    jwks: jwks.json\n", "    jwks: jwks.json\n    jwks_refresh: 1m\n"))
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.jwks_refresh: needs jwks_uri"):
        load_serve_settings(path, "mesh.test")


def test_serve_with_unreachable_jwks_uri_exits_2_with_one_line(tmp_path: Path, jwks_server: JwksServer) -> None:
    directory = tmp_path / "dev"
    assert meshca("dev", "init", "--dir", str(directory)).returncode == 0
    config = directory / "meshca.yaml"
    config.write_text(
        config.read_text().replace("  jwks: jwks.json\n", f"  jwks_uri: {jwks_server.url}\n  jwks_ca: {jwks_server.ca_file}\n")
    )
    jwks_server.stop()
    result = meshca("serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"meshca: error: {config}: issuers[0].jwks_uri: JWKS {jwks_server.url} unusable: cannot fetch: Connection refused"
    )


def test_rotation_trust_propagation(tmp_path: Path) -> None:
    assert load_serve_settings(write(tmp_path, GOOD), "mesh.test").rotation.trust_propagation == timedelta(minutes=10)
    tuned = load_serve_settings(write(tmp_path, GOOD + "rotation:\n  trust_propagation: 2m\n"), "mesh.test")
    assert tuned.rotation.trust_propagation == timedelta(minutes=2)
    off = load_serve_settings(write(tmp_path, GOOD + "rotation:\n  trust_propagation: 0s\n"), "mesh.test")
    assert off.rotation.trust_propagation == timedelta(0)
    with pytest.raises(ConfigError) as error:
        load_serve_settings(write(tmp_path, GOOD + "rotation:\n  trust_propagation: soon\n"), "mesh.test")
    assert error.value.field == "rotation.trust_propagation"


def test_registration_grace_and_warmup(tmp_path: Path) -> None:
    default = load_serve_settings(write(tmp_path, GOOD), "mesh.test").registration
    assert (default.grace, default.warmup) == (timedelta(seconds=3), timedelta(seconds=5))
    tuned = load_serve_settings(write(tmp_path, GOOD + "registration:\n  grace: 1s\n  warmup: 0s\n"), "mesh.test")
    assert (tuned.registration.grace, tuned.registration.warmup) == (timedelta(seconds=1), timedelta(0))
    for text, field, reason in [
        ("registration:\n  grace: 2m\n", "registration.grace", "between 0s and 60s"),
        ("registration:\n  warmup: soon\n", "registration.warmup", "not a duration"),
        ("registration:\n  linger: 1s\n", "registration.linger", "unknown field"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_serve_settings(write(tmp_path, GOOD + text), "mesh.test")
        assert (error.value.field, reason in error.value.reason) == (field, True), str(error.value)
