"""The trust bundle service (SPIFFE bundle format) and `meshca trust sync` against a real meshca over TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from meshca.app import MeshcaApp
from meshca.ca.bundle import BundleError, SpiffeBundle, decode_spiffe_bundle, encode_spiffe_bundle
from meshca.cli.main import main
from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port
from meshca.node.bootstrap import TOKEN_SDS_FILE, BootstrapSettings, build_bootstrap
from meshca.node.trust import (
    TRUST_PEM_FILE,
    TRUST_SDS_FILE,
    SyncResult,
    TrustSyncError,
    TrustSyncSettings,
    sync_loop,
    sync_once,
    write_bundle,
    write_token_sds,
)
from meshca.sds.rotation import RotationSettings
from meshca.sds.server_tls import IssuedServerCertificate
from tests.meshca_harness import RunningMeshca, make_ca, running_meshca


def settings_for(meshca: RunningMeshca, directory: Path, initial_ca: Path | None = None) -> TrustSyncSettings:
    return TrustSyncSettings((("127.0.0.1", meshca.port),), "localhost", directory, initial_ca, timeout=5)


def roots(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def test_bundle_document_is_a_spiffe_bundle_and_reads_back(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    ca.rotate_root()  # two roots
    pem = ca.trust_bundle_pem()
    document = json.loads(encode_spiffe_bundle(pem, 7, timedelta(minutes=5)))
    assert document["spiffe_sequence"] == 7 and document["spiffe_refresh_hint"] == 300
    assert [key["use"] for key in document["keys"]] == ["x509-svid", "x509-svid"]
    assert all(key["kty"] == "EC" and key["crv"] == "P-256" and len(key["x5c"]) == 1 for key in document["keys"])
    assert [x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0])) for key in document["keys"]] == roots(pem)
    bundle = decode_spiffe_bundle(json.dumps(document).encode())
    assert roots(bundle.pem) == roots(pem) and bundle.sequence == 7


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b"not json", "not JSON"),
        (b"{}", "no 'keys' list"),
        (b'{"keys": []}', "no X.509 authority"),
        (b'{"keys": [{"use": "x509-svid", "x5c": []}]}', "exactly one certificate"),
        (b'{"keys": [{"use": "x509-svid", "x5c": ["@@@"]}]}', "keys[0].x5c[0]"),
    ],
)
def test_bad_bundle_documents_are_refused_in_one_line(document: bytes, reason: str) -> None:
    with pytest.raises(BundleError, match=reason.replace("[", r"\[")) as error:
        decode_spiffe_bundle(document)
    assert "\n" not in str(error.value)


def test_a_leaf_is_not_an_authority(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    server = ca.issue_server_certificate(["localhost"], [], timedelta(hours=1))
    document = json.loads(encode_spiffe_bundle(server.certificate_pem, 1, timedelta(minutes=5)))
    with pytest.raises(BundleError, match="not a CA certificate"):
        decode_spiffe_bundle(json.dumps(document).encode())


async def test_sync_writes_the_bundle_and_follows_a_root_rotation(tmp_path: Path) -> None:
    async with running_meshca(tmp_path / "meshca") as meshca:
        day_one = tmp_path / "root.pem"
        day_one.write_bytes(meshca.root_pem)
        trust = tmp_path / "trust"
        trust.mkdir()
        settings = settings_for(meshca, trust, day_one)
        first = await asyncio.to_thread(sync_once, settings)
        assert first.changed and first.roots == 1 and first.sequence == meshca.app.ca.generation
        pem = (trust / TRUST_PEM_FILE).read_bytes()
        assert roots(pem) == roots(meshca.root_pem)
        for name in (TRUST_PEM_FILE, TRUST_SDS_FILE):
            assert stat.S_IMODE((trust / name).stat().st_mode) == 0o644
        sds = json.loads((trust / TRUST_SDS_FILE).read_text())
        (secret,) = sds["resources"]
        assert secret["name"] == "meshca_trust"
        assert secret["validation_context"]["trusted_ca"]["inline_string"].encode() == pem
        assert not (await asyncio.to_thread(sync_once, settings)).changed  # nothing rewritten: no reload

        meshca.app.ca.rotate_root()  # a new root is published in the bundle before it signs anything
        day_one.unlink()  # from now on the held bundle is the anchor
        second = await asyncio.to_thread(sync_once, settings)
        assert second.changed and second.roots == 2
        assert roots((trust / TRUST_PEM_FILE).read_bytes()) == roots(meshca.app.ca.trust_bundle_pem())


async def test_a_meshca_the_held_bundle_cannot_verify_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    async with running_meshca(tmp_path / "meshca") as meshca:
        foreign = tmp_path / "foreign.pem"
        foreign.write_bytes(make_ca(tmp_path / "other").trust_bundle_pem())
        trust = tmp_path / "trust"
        trust.mkdir()
        with pytest.raises(TrustSyncError) as error:
            await asyncio.to_thread(sync_once, settings_for(meshca, trust, foreign))
        message = str(error.value)
        assert "cannot be verified with --ca" in message and "unverified channel" in message and "\n" not in message
        assert list(trust.iterdir()) == []


async def test_the_first_sync_needs_an_anchor(tmp_path: Path) -> None:
    async with running_meshca(tmp_path / "meshca") as meshca:
        with pytest.raises(TrustSyncError, match="pass --ca FILE"):
            await asyncio.to_thread(sync_once, settings_for(meshca, tmp_path))


async def test_unreachable_meshca_keeps_the_last_bundle_says_so_and_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_meshca(tmp_path / "meshca") as meshca:
        day_one = tmp_path / "root.pem"
        day_one.write_bytes(meshca.root_pem)
        await asyncio.to_thread(sync_once, settings_for(meshca, tmp_path, day_one))
    held = (tmp_path / TRUST_PEM_FILE).read_bytes()
    gone = TrustSyncSettings((("127.0.0.1", free_port()),), "localhost", tmp_path, timeout=2)
    results: list[SyncResult | None] = []
    stop = threading.Event()

    def record(result: SyncResult | None) -> None:
        results.append(result)
        if len(results) == 2:
            stop.set()

    caplog.set_level(logging.INFO, "meshca.test.trust")
    await asyncio.to_thread(sync_loop, gone, timedelta(seconds=1), logging.getLogger("meshca.test.trust"), stop, record)
    assert results == [None, None]  # tried again after the first failure
    assert (tmp_path / TRUST_PEM_FILE).read_bytes() == held
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert f"keeping {tmp_path / TRUST_PEM_FILE}" in lines[0] and "cannot reach meshca at 127.0.0.1:" in lines[0]
    assert "retrying in 1s" in lines[0]


async def test_cli_one_shot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_meshca(tmp_path / "meshca") as meshca:
        (tmp_path / "root.pem").write_bytes(meshca.root_pem)
        argv = ["trust", "sync", "--meshca", f"127.0.0.1:{meshca.port}", "--server-name", "localhost",
                "--dir", str(tmp_path), "--ca", str(tmp_path / "root.pem")]
        assert await asyncio.to_thread(main, argv) == 0
        assert "bundle updated: 1 root(s)" in capsys.readouterr().out
        wrong_name = [*argv[:5], "meshca.example.com", *argv[6:]]
        assert await asyncio.to_thread(main, wrong_name) == 1
        err = capsys.readouterr().err
        assert err.startswith("meshca: trust sync failed: meshca at 127.0.0.1:") and err.count("\n") == 1


def test_bootstrap_takes_meshca_trust_from_the_synced_sds_file(tmp_path: Path) -> None:
    settings = BootstrapSettings(
        node_id="n", cluster="c", meshca_address="127.0.0.1", meshca_port=15010,
        meshca_ca_path=tmp_path / TRUST_PEM_FILE, meshca_server_name="localhost", token="a.b.c",
        meshca_trust_sds_path=tmp_path / TRUST_SDS_FILE,
    )
    cluster = build_bootstrap(settings)["static_resources"]["clusters"][0]
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    combined = context["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "localhost"}}
    ]
    sds = combined["validation_context_sds_secret_config"]
    assert sds["name"] == "meshca_trust"
    assert sds["sds_config"]["path_config_source"] == {
        "path": str(tmp_path / TRUST_SDS_FILE), "watched_directory": {"path": str(tmp_path)}
    }


def test_cli_bootstrap_with_trust_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bootstrap", "--node-id", "n", "--cluster", "c", "--trust-dir", str(tmp_path), "--token", "a.b.c"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshca: error: --trust-dir: ") and "run `meshca trust sync" in err and err.count("\n") == 1
    ca = make_ca(tmp_path / "ca")
    write_bundle(TrustSyncSettings((("127.0.0.1", 1),), "localhost", tmp_path), SpiffeBundle((ca.trust_bundle_pem(),)))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "combined_validation_context" in text and f'path: "{tmp_path / TRUST_SDS_FILE}"' in text
    assert f'filename: "{tmp_path / TRUST_PEM_FILE}"' not in text  # inline token: envoy_grpc, no gRPC root file


def test_cli_bootstrap_with_trust_dir_and_token_file_injects_the_token_on_envoys_own_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_bundle(TrustSyncSettings((("127.0.0.1", 1),), "localhost", tmp_path),
                 SpiffeBundle((make_ca(tmp_path / "ca").trust_bundle_pem(),)))
    token = tmp_path / "tokens" / "token"
    token.parent.mkdir()
    token.write_text("a.b.c")
    argv = ["bootstrap", "--node-id", "n", "--cluster", "c", "--trust-dir", str(tmp_path), "--token-file", str(token)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{TOKEN_SDS_FILE}' does not exist; run `meshca trust sync --dir {tmp_path} --token-file {token}" in err
    write_token_sds(tmp_path, tmp_path / "other-token")
    assert main(argv) == 2
    assert "does not name --token-file" in capsys.readouterr().err
    assert write_token_sds(tmp_path, token) and not write_token_sds(tmp_path, token)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    bootstrap = yaml.safe_load(captured.out)
    (service,) = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"]
    assert "envoy_grpc" in service and "initial_metadata" not in service  # no google_grpc: its roots never reload
    cluster = bootstrap["static_resources"]["clusters"][0]
    (injector, codec) = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    generic = injector["typed_config"]["credential"]["typed_config"]
    assert generic["header"] == "authorization" and generic["header_value_prefix"] == "Bearer "
    assert generic["credential"]["sds_config"]["path_config_source"] == {
        "path": str(tmp_path / TOKEN_SDS_FILE), "watched_directory": {"path": str(token.parent)}
    }
    assert codec["name"] == "envoy.filters.http.upstream_codec"
    sds = json.loads((tmp_path / TOKEN_SDS_FILE).read_text())
    assert sds["resources"][0]["generic_secret"] == {"secret": {"filename": str(token)}}  # the path, never the token


@pytest.mark.parametrize("propagation", [timedelta(0), timedelta(seconds=30)])
async def test_after_rotate_root_now_the_sync_still_verifies_meshca_only_when_its_certificate_waits(
    tmp_path: Path, propagation: timedelta
) -> None:
    """`rotate --root --now` publishes and uses a root at once: a meshca that moved its own certificate to it at
    once (propagation 0, the behaviour before) could no longer be verified with the nodes' synced bundles, and
    the sync's chain of trust would end there."""
    ca = make_ca(tmp_path)
    app = MeshcaApp(ca, [], system_clock, logging.getLogger("meshca.test"),
                    rotation=RotationSettings(ca_check_interval=timedelta(milliseconds=50)))
    certificate = IssuedServerCertificate(ca, ["localhost"], timedelta(hours=1), system_clock,
                                          logging.getLogger("meshca.test.tls"), trust_propagation=propagation)
    port = await app.start("127.0.0.1", 0, certificate)
    try:
        (tmp_path / "root.pem").write_bytes(ca.trust_bundle_pem())
        settings = TrustSyncSettings((("127.0.0.1", port),), "localhost", tmp_path, tmp_path / "root.pem", timeout=5)
        await asyncio.to_thread(sync_once, settings)
        serial = certificate.serial_number
        ca.rotate_root(now=True)
        await asyncio.sleep(0.5)  # several checks of the server certificate
        if propagation:
            assert certificate.serial_number == serial and certificate.held_until is not None
            result = await asyncio.to_thread(sync_once, settings)
            assert result.changed and result.roots == 2  # the nodes get the new root before meshca uses it
        else:
            assert certificate.serial_number != serial
            with pytest.raises(TrustSyncError, match="cannot be verified"):
                await asyncio.to_thread(sync_once, settings)
    finally:
        await app.stop(0)
