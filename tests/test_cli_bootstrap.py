"""`meshca bootstrap`: option checking, file modes, warnings, and real Envoy validating the output."""

from __future__ import annotations

import argparse
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshca.cli.bootstrap import add_bootstrap_parser
from meshca.clock import system_clock
from meshca.dev.envoy_process import find_envoy, free_port, wait_until
from meshca.dev.material import DevMaterial, create_dev_material
from meshca.dev.tokens import mint_token
from meshca.node.bootstrap import FILE_BASED_METADATA, XDS_CLUSTER_NAME

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


def envoy_validate(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c config`: loads the bootstrap (and the files it names) and exits."""
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config), "--log-level", "warn", *extra],
        check=False, capture_output=True, text=True, timeout=60,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshca")
    add_bootstrap_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["bootstrap", *argv])
    code = args.handler(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway self-signed CA certificate standing in for meshca's root.pem."""
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=test-root", "-days", "1", "-keyout", "root-key.pem", "-out", "root.pem"],
        cwd=d, check=True, capture_output=True, timeout=30,
    )
    return d / "root.pem"


def base_args(ca: Path) -> list[str]:
    return ["--node-id", "web-7d9f.shop", "--cluster", "web", "--ca", str(ca)]


# -- output that real Envoy accepts -------------------------------------------------------------


def test_token_file_bootstrap_validates_with_envoy(
    ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    out = tmp_path / "envoy.yaml"
    code, stdout, stderr = run(capsys, *base_args(ca_pem), "--token-file", str(token), "--out", str(out))
    assert (code, stdout, stderr) == (0, "", "")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # no secret inside: the token stays in its file
    result = envoy_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = yaml.safe_load(out.read_text())
    service = doc["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
    assert service["credentials_factory_name"] == FILE_BASED_METADATA
    plugin = service["call_credentials"][0]["from_plugin"]["typed_config"]
    assert plugin["secret_data"] == {"filename": str(token)}
    assert TOKEN not in out.read_text()
    assert doc["node"] == {"id": "web-7d9f.shop", "cluster": "web", "metadata": {}}
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"  # the default


def test_inline_token_bootstrap_validates_and_is_private(
    ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "envoy.yaml"
    code, stdout, stderr = run(capsys, *base_args(ca_pem), "--token", TOKEN, "--out", str(out))
    assert (code, stdout, stderr) == (0, "", "")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # the file is a credential
    result = envoy_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    service = yaml.safe_load(out.read_text())["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert service["envoy_grpc"]["cluster_name"] == XDS_CLUSTER_NAME
    assert service["envoy_grpc"]["retry_policy"]["retry_back_off"] == {"base_interval": "0.25s", "max_interval": "5s"}
    assert service["initial_metadata"] == [{"key": "authorization", "value": f"Bearer {TOKEN}"}]
    assert [p.name for p in tmp_path.iterdir()] == ["envoy.yaml"]  # no temp file left behind


def test_envoy_validation_is_meaningful(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Validate mode really loads the files: a bootstrap naming a missing CA file is refused."""
    out = tmp_path / "envoy.yaml"
    assert run(capsys, *base_args(ca_pem), "--token", TOKEN, "--out", str(out))[0] == 0
    out.write_text(out.read_text().replace(str(ca_pem), str(tmp_path / "gone.pem")))
    result = envoy_validate(out)
    assert result.returncode != 0
    assert "gone.pem" in result.stdout + result.stderr


def test_stdout_by_default_with_all_options(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run(
        capsys, *base_args(ca_pem), "--token", TOKEN, "--meshca", "[::1]:15099", "--server-name", "cp.example",
        "--admin-port", "0", "--admin-address", "::1", "--api-type", "GRPC",
        "--metadata", "NAMESPACE=shop", "--metadata", "SPIFFE_ID=spiffe://td/ns/shop/sa/web", "--metadata", "EMPTY=",
    )
    assert (code, stderr) == (0, "")
    assert stdout.startswith("# Envoy bootstrap written by `meshca bootstrap`")
    doc = yaml.safe_load(stdout)
    assert doc["node"]["metadata"] == {"NAMESPACE": "shop", "SPIFFE_ID": "spiffe://td/ns/shop/sa/web", "EMPTY": ""}
    assert doc["admin"]["address"]["socket_address"] == {"address": "::1", "port_value": 0}
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"  # SotW on request
    cluster = doc["static_resources"]["clusters"][0]
    assert cluster["type"] == "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "::1", "port_value": 15099}
    assert cluster["transport_socket"]["typed_config"]["sni"] == "cp.example"
    out = tmp_path / "b.yaml"
    out.write_text(stdout)
    result = envoy_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("how", ["repeated", "comma list"])
@pytest.mark.parametrize("auth", ["token", "token_file"])
def test_several_meshca_addresses(
    how: str, auth: str, ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = ["127.0.0.1:15010", "127.0.0.2:15011", "127.0.0.3:15010"]
    where = [a for address in addresses for a in ("--meshca", address)] if how == "repeated" else [
        "--meshca", " , ".join(addresses[:2]), "--meshca", addresses[2]
    ]
    (tmp_path / "tok").write_text(TOKEN)
    credential = ["--token", TOKEN] if auth == "token" else ["--token-file", str(tmp_path / "tok")]
    out = tmp_path / "envoy.yaml"
    code, _, stderr = run(capsys, *base_args(ca_pem), *credential, *where, "--out", str(out))
    assert (code, stderr) == (0, "")
    doc = yaml.safe_load(out.read_text())
    (cluster,) = doc["static_resources"]["clusters"]
    hosts = [e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [f"{h['address']}:{h['port_value']}" for h in hosts] == addresses
    service = doc["dynamic_resources"]["ads_config"]["grpc_services"][0]
    if auth == "token_file":
        assert service["google_grpc"]["target_uri"] == "ipv4:" + ",".join(addresses)
    else:
        assert service["envoy_grpc"]["retry_policy"]["retry_back_off"] == {"base_interval": "0.25s", "max_interval": "5s"}
    result = envoy_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_meshca_address_given_twice_is_one_line(ca_pem: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(capsys, *base_args(ca_pem), "--token", TOKEN, "--meshca", "10.0.0.1:1,10.0.0.1:1")
    assert (code, stderr) == (2, "meshca: error: --meshca: '10.0.0.1:1' is given twice\n")
    code, _, stderr = run(capsys, *base_args(ca_pem), "--token-file", "/nope", "--meshca", "a.svc:1", "--meshca", "b.svc:1")
    assert code == 2 and stderr.startswith("meshca: error: several meshca addresses with a token file must all be IP")


def test_dns_name_and_relative_paths(
    ca_pem: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Relative --ca/--token-file become absolute: Envoy resolves them against its own cwd."""
    shutil.copy(ca_pem, tmp_path / "root.pem")
    (tmp_path / "tok").write_text(TOKEN)
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run(capsys, "--node-id", "n", "--cluster", "c", "--ca", "root.pem", "--token-file", "tok",
                          "--meshca", "meshca.meshca-system.svc.cluster.local:15010")
    assert code == 0
    doc = yaml.safe_load(stdout)
    grpc = doc["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
    assert grpc["target_uri"] == "meshca.meshca-system.svc.cluster.local:15010"
    assert grpc["channel_credentials"]["ssl_credentials"]["root_certs"]["filename"] == str(tmp_path / "root.pem")
    plugin = grpc["call_credentials"][0]["from_plugin"]["typed_config"]
    assert plugin["secret_data"]["filename"] == str(tmp_path / "tok")
    assert doc["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"


def test_out_replaces_an_existing_file(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "envoy.yaml"
    out.write_text("old")
    out.chmod(0o644)
    assert run(capsys, *base_args(ca_pem), "--token", TOKEN, "--out", str(out))[0] == 0
    assert "old" != out.read_text() and stat.S_IMODE(out.stat().st_mode) == 0o600


# -- token file warnings ------------------------------------------------------------------------


def test_trailing_newline_in_token_file_warns(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    out = tmp_path / "envoy.yaml"
    code, _, stderr = run(capsys, *base_args(ca_pem), "--token-file", str(token), "--out", str(out))
    assert code == 0 and out.exists()  # a warning, not a refusal: the file may be fixed later
    assert stderr.startswith("meshca: warning: --token-file")
    assert "newline" in stderr and "code 13" in stderr
    assert len(stderr.splitlines()) == 1


def test_missing_token_file_warns(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run(capsys, *base_args(ca_pem), "--token-file", str(tmp_path / "later"))
    assert code == 0 and stdout
    assert "does not exist yet" in stderr and "newline" not in stderr


def test_bearer_prefix_in_token_file_warns(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "token").write_text("Bearer " + TOKEN)
    code, _, stderr = run(capsys, *base_args(ca_pem), "--token-file", str(tmp_path / "token"))
    assert code == 0 and "'Bearer '" in stderr


# -- bad options: one clear line, exit 2, nothing written -----------------------------------------

BAD_OPTIONS: list[tuple[list[str], str]] = [
    (["--token", TOKEN, "--token-file", "{tok}"], "exactly one of --token TOKEN or --token-file FILE"),
    ([], "exactly one of --token TOKEN or --token-file FILE"),
    (["--token", TOKEN, "--meshca", "meshca.local"], "--meshca: 'meshca.local' is not HOST:PORT"),
    (["--token", TOKEN, "--meshca", ":15010"], "--meshca: ':15010' is not HOST:PORT"),
    (["--token", TOKEN, "--meshca", "meshca.local:"], "--meshca: 'meshca.local:' is not HOST:PORT"),
    (["--token", TOKEN, "--meshca", "meshca.local:0"], "--meshca: '0' is not a port number in 1..65535"),
    (["--token", TOKEN, "--meshca", "meshca.local:70000"], "--meshca: '70000' is not a port number"),
    (["--token", TOKEN, "--meshca", "meshca.local:http"], "--meshca: 'http' is not a port number"),
    (["--token", TOKEN, "--meshca", "::1:15010"], "--meshca: '::1:15010': write an IPv6 address in brackets"),
    (["--token", TOKEN, "--meshca", "[nope]:15010"], "--meshca: '[nope]:15010': 'nope' is not an IPv6 address"),
    (["--token", TOKEN, "--meshca", "bad host:15010"], "is not a host name or IP address"),
    (["--token", TOKEN, "--metadata", "NAMESPACE"], "--metadata: 'NAMESPACE' is not KEY=VALUE"),
    (["--token", TOKEN, "--metadata", "=shop"], "--metadata: '=shop' is not KEY=VALUE"),
    (["--token", TOKEN, "--metadata", "A=1", "--metadata", "A=2"], "--metadata: key 'A' is given twice"),
    (["--token", TOKEN, "--admin-port", "99999"], "--admin-port: '99999' is not a port number in 0..65535"),
    (["--token", TOKEN, "--admin-port", "-1"], "--admin-port: '-1' is not a port number"),
    (["--token", TOKEN, "--admin-address", "localhost"], "--admin-address: 'localhost' is not an IP address"),
    (["--token", "Bearer " + TOKEN], "--token: pass the bare JWT, without the 'Bearer ' prefix"),
    (["--token", TOKEN + "\n"], "--token: must be a non-empty JWT without whitespace"),
    (["--token", "not-a-jwt"], "--token: does not look like a JWT"),
    (["--token", TOKEN, "--server-name", ""], "--server-name: must not be empty"),
    (["--token-file", "{dir}"], "--token-file:"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_option_is_one_clear_line(
    extra: list[str], message: str, ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tok").write_text(TOKEN)
    extra = [e.replace("{tok}", str(tmp_path / "tok")).replace("{dir}", str(tmp_path)) for e in extra]
    out = tmp_path / "envoy.yaml"
    code, stdout, stderr = run(capsys, *base_args(ca_pem), *extra, "--out", str(out))
    assert code == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("meshca: error: ")
    assert message in stderr
    assert not out.exists()


def test_missing_ca_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run(capsys, *base_args(tmp_path / "root.pem"), "--token", TOKEN)
    assert (code, stdout) == (2, "")
    assert stderr == f"meshca: error: --ca: file {str(tmp_path / 'root.pem')!r} does not exist " \
                     "(meshca's root bundle, e.g. root.pem)\n"


def test_ca_must_be_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(capsys, *base_args(tmp_path), "--token", TOKEN)
    assert code == 2 and stderr.startswith("meshca: error: --ca:")


def test_out_directory_must_exist(ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(capsys, *base_args(ca_pem), "--token", TOKEN, "--out", str(tmp_path / "no" / "x.yaml"))
    assert code == 2 and stderr.startswith("meshca: error: --out: directory")


@pytest.mark.parametrize("argv", [
    ["--cluster", "web", "--ca", "x", "--token", TOKEN],                                   # no --node-id
    ["--node-id", "n", "--ca", "x", "--token", TOKEN],                                     # no --cluster
    ["--node-id", "n", "--cluster", "web", "--token", TOKEN],                              # no --ca
    ["--node-id", "n", "--cluster", "web", "--ca", "x", "--token", TOKEN, "--api-type", "REST"],
])
def test_argparse_level_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bootstrap", *argv])
    assert exit_info.value.code == 2
    assert "error: " in capsys.readouterr().err


def test_handler_is_set_and_help_mentions_token_file() -> None:
    parser = build_parser()
    args: Any = parser.parse_args(["bootstrap", "--node-id", "n", "--cluster", "c", "--ca", "x", "--token", TOKEN])
    assert callable(args.handler)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "re-read by Envoy on every new stream" in " ".join(sub.choices["bootstrap"].format_help().split())


@pytest.mark.parametrize("content", ["key", "cert+key"])
def test_private_key_as_ca_is_refused(
    content: str, ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = (ca_pem.parent / "root-key.pem").read_bytes()
    bad = tmp_path / "ca.pem"
    bad.write_bytes(key if content == "key" else ca_pem.read_bytes() + key)
    code, stdout, stderr = run(capsys, *base_args(bad), "--token", TOKEN)
    assert (code, stdout) == (2, "")
    assert stderr == f"meshca: error: --ca: {str(bad)!r} holds a private key; pass meshca's root certificate " \
                     "bundle (root.pem), and keep that key out of the nodes' reach\n"
    assert "PRIVATE" not in stderr.replace("private key", "")  # nothing of the key is echoed


def test_ca_without_a_certificate_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("hello\n")
    code, _, stderr = run(capsys, *base_args(bad), "--token", TOKEN)
    assert code == 2 and "holds no PEM certificate" in stderr


def test_agent_socket_bootstrap_validates_with_envoy(
    ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "agent.yaml"
    code, _, err = run(capsys, *base_args(ca_pem), "--token", TOKEN, "--agent-socket", "run/web.sock",
                       "--out", str(out))
    assert (code, err) == (0, "")
    text = out.read_text()
    assert "# agent mode: certificate, key and trust bundle from the local agent at " in text
    loaded = yaml.safe_load(text)
    assert loaded["node"]["metadata"] == {"MESHCA_AGENT": "sds"}
    agent = loaded["static_resources"]["clusters"][1]
    path = agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"]
    assert path == str((Path.cwd() / "run/web.sock").absolute())  # Envoy's working directory may differ
    result = envoy_validate(out)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent-socket", ""], "--agent-socket: must not be empty"),
        (["--agent-socket", "/"], "--agent-socket: '/' is a directory"),
        (["--agent-socket", "/run/a.sock", "--metadata", "MESHCA_AGENT=sds"],
         "--metadata: key 'MESHCA_AGENT' is set by --agent-socket only"),
        (["--metadata", "MESHCA_AGENT=sds"], "--metadata: key 'MESHCA_AGENT' is set by --agent-socket only"),
    ],
)
def test_agent_socket_errors_are_one_line(
    argv: list[str], message: str, ca_pem: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *base_args(ca_pem), "--token", TOKEN, *argv)
    assert (code, out, err) == (2, "", f"meshca: error: {message}\n")


# -- --check against a real meshca ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevMaterial, int]]:
    """A real `meshca serve` (dev material) on a free port."""
    d = tmp_path_factory.mktemp("meshca")
    port = free_port()
    material = create_dev_material(d, "mesh.local", system_clock, listen=f"127.0.0.1:{port}")
    log = (d / "meshca.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "meshca.cli.main", "serve", "--config", str(material.serve_config)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        def listening() -> bool:
            assert process.poll() is None, (d / "meshca.log").read_text()[-2000:]
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 30, 0.05, "meshca listening")
        yield material, port
    finally:
        process.kill()
        process.wait()
        log.close()


def check_args(material: DevMaterial, port: int, token: str, node_id: str = "web-1") -> list[str]:
    return ["--node-id", node_id, "--cluster", "web", "--ca", str(material.root_bundle), "--server-name",
            "localhost", "--meshca", f"127.0.0.1:{port}", "--token", token, "--check"]


def dev_token(material: DevMaterial, node_id: str = "web-1", **kw: Any) -> str:
    return mint_token(material.signing_key.read_bytes(), namespace="shop", service_account="web", node_id=node_id,
                      now=kw.pop("now", system_clock()), **kw)


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
def test_check_ok(api_type: str, serving: tuple[DevMaterial, int], capsys: pytest.CaptureFixture[str]) -> None:
    material, port = serving
    code, stdout, stderr = run(capsys, *check_args(material, port, dev_token(material)), "--api-type", api_type)
    assert (code, stderr) == (0, "")
    assert stdout == f"meshca: check ok: meshca at 127.0.0.1:{port} verified as 'localhost' and admitted node " \
                     f"'web-1' ({api_type})\n"


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
def test_check_ok_in_agent_mode(
    api_type: str, serving: tuple[DevMaterial, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """meshca sends an agent-mode node no Secret, so the check asks for clusters: it is answered all the same."""
    material, port = serving
    args = check_args(material, port, dev_token(material))
    code, stdout, stderr = run(capsys, *args, "--api-type", api_type, "--agent-socket", str(tmp_path / "a.sock"))
    assert (code, stderr) == (0, ""), stdout
    assert stdout.startswith(f"meshca: check ok: meshca at 127.0.0.1:{port} verified as 'localhost'")


def test_check_says_one_line_per_replica(serving: tuple[DevMaterial, int], capsys: pytest.CaptureFixture[str]) -> None:
    material, port = serving
    dead = free_port()
    code, stdout, _ = run(capsys, *check_args(material, port, dev_token(material)), "--meshca", f"127.0.0.1:{dead}")
    assert code == 1
    first, second = stdout.splitlines()
    assert first.startswith(f"meshca: check ok: meshca at 127.0.0.1:{port} ")
    assert second.startswith(f"meshca: check failed: cannot reach meshca at 127.0.0.1:{dead}")


def test_check_writes_out_then_checks(
    serving: tuple[DevMaterial, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    material, port = serving
    out = tmp_path / "b.yaml"
    code, stdout, _ = run(capsys, *check_args(material, port, dev_token(material)), "--out", str(out))
    assert code == 0 and stdout.startswith("meshca: check ok") and out.exists()


def test_check_names_each_failure(
    serving: tuple[DevMaterial, int], ca_pem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    material, port = serving
    token = dev_token(material)

    def check(*argv: str) -> str:
        code, stdout, stderr = run(capsys, *argv)
        assert code == 1 and stderr == "", (code, stdout, stderr)
        assert len(stdout.splitlines()) == 1 and stdout.startswith("meshca: check failed: ")
        assert token not in stdout
        return stdout

    args = check_args(material, port, token)
    wrong_ca = list(args)
    wrong_ca[wrong_ca.index("--ca") + 1] = str(ca_pem)
    assert "does not verify against --ca" in check(*wrong_ca)
    wrong_name = list(args)
    wrong_name[wrong_name.index("--server-name") + 1] = "meshca.example.com"
    assert "is not valid for server name 'meshca.example.com'" in check(*wrong_name)
    expired = dev_token(material, now=system_clock() - timedelta(hours=3))
    assert "token refused by meshca (UNAUTHENTICATED): token expired" in check(*check_args(material, port, expired))
    other_node = check(*check_args(material, port, token, node_id="web-2"))
    assert "node binding refused by meshca (PERMISSION_DENIED)" in other_node and "web-2" in other_node
    unreachable = check(*check_args(material, (closed := free_port()), token))
    assert f"cannot reach meshca at 127.0.0.1:{closed}" in unreachable
    newline = tmp_path / "token"
    newline.write_text(token + "\n")
    file_args = [a for a in args if a not in ("--token", token)] + ["--token-file", str(newline)]
    code, stdout, stderr = run(capsys, *file_args)
    assert code == 1 and "ends with a newline" in stdout and "every xDS stream fails with code 13" in stdout
