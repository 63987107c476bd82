"""deploy/ examples: YAML parses, the workload example's Envoy bootstrap is valid, systemd units are sane."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from meshca.ca.bundle import SpiffeBundle
from meshca.dev.envoy_process import find_envoy, wait_until
from meshca.fields import parse_host_port
from meshca.files import write_atomic
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap, render_yaml
from meshca.node.trust import TRUST_PEM_FILE, TRUST_SDS_FILE, TrustSyncSettings, write_bundle, write_token_sds
from tests.meshca_harness import TRUST_DOMAIN, make_ca, running_meshca

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
WORKLOAD_MANIFEST = K8S / "workload-example.yaml"
TRUST_DIR = Path("/etc/meshca-trust")  # the workload example's emptyDir that meshca-trust-sync keeps current
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a throwaway CA (ca.pem) and a server certificate for DNS:meshca.local."""
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *ec, "-subj", "/CN=test-root", "-days", "1", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    openssl("req", *ec, "-subj", "/CN=meshca", "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:meshca.local\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem", cwd=d)
    return d


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def find_doc(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}"
    return matches[0]


def container(deployment: Mapping[str, Any], name: str) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def volume(deployment: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def mount_path(c: Mapping[str, Any], volume_name: str) -> str:
    return next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume_name)


def mounts(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


# -- every file ---------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_examples() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {"kubernetes/meshca.yaml", "kubernetes/etcd.yaml", "kubernetes/workload-example.yaml",
            "systemd/meshca.service", "systemd/envoy-sidecar@.service"} <= names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} has no YAML documents"
    if path.parent == K8S:  # kubernetes/config/: meshca settings files, not Kubernetes objects
        for doc in docs:
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
            assert isinstance(doc.get("kind"), str) and doc["kind"], doc
            assert doc["metadata"]["name"], doc
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace"), f"{doc['kind']}/{doc['metadata']['name']} has no namespace"


# deploy/kubernetes/meshca.yaml and etcd.yaml: tests/test_deploy.py (schemas, settings, security, the image).


# -- deploy/kubernetes/workload-example.yaml --------------------------------------------------------


def workload_docs() -> list[dict[str, Any]]:
    return load_docs(WORKLOAD_MANIFEST)


def workload_settings() -> BootstrapSettings:
    """What the bootstrap ConfigMap is rendered from (the `meshca bootstrap` command in its comment)."""
    return BootstrapSettings(
        node_id="set-by-envoy-service-node",
        cluster="frontend",
        meshca_address="meshca.meshca-system.svc.cluster.local",
        meshca_port=15010,
        meshca_ca_path=TRUST_DIR / TRUST_PEM_FILE,
        meshca_server_name="meshca.meshca-system.svc",
        token_path=Path("/var/run/secrets/meshca/meshca-token"),
        admin_port=15000,
        node_metadata={"NAMESPACE": "shop", "SERVICE_ACCOUNT": "frontend"},
        meshca_trust_sds_path=TRUST_DIR / TRUST_SDS_FILE,
    )


def embedded_bootstrap() -> str:
    return str(find_doc(workload_docs(), "ConfigMap", "frontend-envoy-bootstrap")["data"]["bootstrap.yaml"])


def envoy_args(env: Mapping[str, str]) -> list[str]:
    """The sidecar's args with $(VAR) expanded the way the kubelet does it."""
    sidecar = container(find_doc(workload_docs(), "Deployment", "frontend"), "envoy")
    args = []
    for arg in sidecar["args"]:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        args.append(arg)
    return args


def test_workload_bootstrap_is_meshca_bootstrap_output() -> None:
    assert yaml.safe_load(embedded_bootstrap()) == build_bootstrap(workload_settings())
    assert embedded_bootstrap() == render_yaml(workload_settings())  # regenerate rather than hand-edit


def test_workload_wiring() -> None:
    docs = workload_docs()
    deployment = find_doc(docs, "Deployment", "frontend")
    assert deployment["metadata"]["namespace"] == "shop"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "frontend"
    assert find_doc(docs, "ServiceAccount", "frontend")["metadata"]["namespace"] == "shop"
    sidecar = container(deployment, "envoy")
    # node.id "<pod>.<namespace>" through Envoy's --service-node, from the Downward API.
    args = sidecar["args"]
    assert args[args.index("--service-node") + 1] == "$(POD_NAME).$(POD_NAMESPACE)"
    assert args[args.index("--service-cluster") + 1] == "frontend"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    # The projected token: audience meshca, one hour, at the path the bootstrap reads.
    (source,) = volume(deployment, "meshca-token")["projected"]["sources"]
    assert source["serviceAccountToken"] == {"audience": "meshca", "expirationSeconds": 3600, "path": "meshca-token"}
    settings = workload_settings()
    assert settings.token_path == Path(mount_path(sidecar, "meshca-token")) / "meshca-token"
    # Envoy's trust in meshca is the synced SDS file in the shared emptyDir (read-only for Envoy), not the
    # day-one ConfigMap, which only the trust sync reads.
    assert settings.meshca_trust_sds_path == Path(mount_path(sidecar, "meshca-trust")) / TRUST_SDS_FILE
    assert mounts(sidecar)["meshca-trust"]["readOnly"] is True
    assert set(volume(deployment, "meshca-trust")) == {"name", "emptyDir"}
    assert "meshca-root" not in mounts(sidecar)
    config_path = args[args.index("--config-path") + 1]
    assert Path(config_path) == Path(mount_path(sidecar, "envoy-bootstrap")) / "bootstrap.yaml"
    assert volume(deployment, "envoy-bootstrap")["configMap"]["name"] == "frontend-envoy-bootstrap"
    # Only the sidecar sees the token.
    app = container(deployment, "frontend")
    assert all(m["name"] != "meshca-token" for m in app.get("volumeMounts", []))


def sync_container() -> dict[str, Any]:
    return container(find_doc(workload_docs(), "Deployment", "frontend"), "meshca-trust-sync")


def test_the_trust_sync_sidecar_keeps_the_directory_envoys_bootstrap_reads() -> None:
    """meshca-trust-sync: a native sidecar whose command meshca's own parser accepts, syncing into the directory
    and for the token file that Envoy's bootstrap names, from the meshca Envoy dials, with the day-one root."""
    from meshca.cli.bootstrap import _parse_meshca_addresses
    from meshca.cli.main import build_parser
    from meshca.cli.trust import cmd_trust_sync

    deployment = find_doc(workload_docs(), "Deployment", "frontend")
    pod = deployment["spec"]["template"]["spec"]
    sync = sync_container()
    # An init container with restartPolicy Always (Kubernetes >= 1.29): started, and its startupProbe passed,
    # before the regular containers (Envoy) start; restarted whenever it exits, for as long as the pod runs.
    assert [c["name"] for c in pod["initContainers"]] == ["meshca-trust-sync"]
    assert sync["restartPolicy"] == "Always"
    assert sync["startupProbe"]["exec"]["command"] == ["test", "-s", str(TRUST_DIR / TRUST_SDS_FILE)]
    assert sync["resources"]["requests"] and sync["resources"]["limits"]["memory"]
    argv = sync["command"]
    assert argv[0] == "/opt/meshca/.venv/bin/meshca" and "args" not in sync
    args = build_parser().parse_args(argv[1:])
    assert args.handler is cmd_trust_sync and args.watch
    settings = workload_settings()
    assert settings.meshca_trust_sds_path is not None
    assert Path(args.dir) == TRUST_DIR == settings.meshca_trust_sds_path.parent
    assert Path(mount_path(sync, "meshca-trust")) == TRUST_DIR and not mounts(sync)["meshca-trust"].get("readOnly")
    assert Path(args.token_file) == settings.token_path
    assert "meshca-token" not in mounts(sync)  # it writes only the token's path, for Envoy
    assert _parse_meshca_addresses(args.meshca) == settings.meshca_endpoints
    assert args.server_name == settings.meshca_server_name
    # --ca: the day-one root from the ConfigMap, read-only
    assert Path(args.ca).parent == Path(mount_path(sync, "meshca-root")) and mounts(sync)["meshca-root"]["readOnly"]
    assert volume(deployment, "meshca-root")["configMap"]["name"] == "meshca-root"


def on_host(text: str, trust_dir: Path, token_dir: Path, root_dir: Path | None = None) -> str:
    """The pod's paths in a bootstrap or command line replaced by the test's directories."""
    text = text.replace(str(TRUST_DIR), str(trust_dir)).replace("/var/run/secrets/meshca", str(token_dir))
    if root_dir is not None:
        text = text.replace("/etc/meshca/", f"{root_dir}/")
    assert "/etc/meshca" not in text and "/var/run/secrets" not in text, text
    return text


def validate_with_envoy(bootstrap_text: str, tmp_path: Path) -> None:
    """`envoy --mode validate` with the sidecar's own command-line flags."""
    config = tmp_path / "bootstrap.yaml"
    config.write_text(bootstrap_text)
    args = envoy_args({"POD_NAME": "frontend-7d9f8c6b5-abcde", "POD_NAMESPACE": "shop"})
    args[args.index("--config-path") + 1] = str(config)
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", *args], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_workload_bootstrap_validates_with_envoy(pki: Path, tmp_path: Path) -> None:
    """Real Envoy loads the ConfigMap's bootstrap with the sidecar's own command-line flags, with the files the
    trust sync writes (here from a throwaway CA) in the trust directory."""
    token_dir, trust_dir = tmp_path / "tokens", tmp_path / "trust"
    token_dir.mkdir()
    trust_dir.mkdir()
    token = token_dir / "meshca-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    write_bundle(TrustSyncSettings((("127.0.0.1", 1),), "meshca.local", trust_dir),
                 SpiffeBundle(((pki / "ca.pem").read_bytes(),)))
    write_token_sds(trust_dir, token)
    validate_with_envoy(on_host(embedded_bootstrap(), trust_dir, token_dir), tmp_path)


AGENT_WORKLOAD_MANIFEST = K8S / "workload-agent-example.yaml"


def agent_workload_settings() -> BootstrapSettings:
    """What the agent-mode example's bootstrap ConfigMap is rendered from (the command in its comment)."""
    return replace(workload_settings(), cluster="catalog", node_metadata={"NAMESPACE": "shop", "SERVICE_ACCOUNT": "catalog"},
                   agent_socket=Path("/run/meshca/workload/sds.sock"))


def test_agent_workload_bootstrap_is_the_commented_meshca_bootstrap_output() -> None:
    """The same command as workload-example.yaml's (which the e2e test below renders in a pod's directories) for
    catalog, plus --agent-socket; the ConfigMap holds what it renders."""
    from meshca.cli.main import build_parser

    docs = load_docs(AGENT_WORKLOAD_MANIFEST)
    embedded = str(find_doc(docs, "ConfigMap", "catalog-envoy-bootstrap")["data"]["bootstrap.yaml"])
    assert embedded == render_yaml(agent_workload_settings())
    text = AGENT_WORKLOAD_MANIFEST.read_text()
    match = re.search(r"^ *# +(meshca bootstrap .*?)\n *#\n", text, re.MULTILINE | re.DOTALL)
    assert match, "the ConfigMap's comment names the meshca bootstrap command"
    argv = shlex.split(re.sub(r"\\\n *# *", " ", match.group(1)))[1:]
    args = build_parser().parse_args(argv)  # (rendering it needs the pod's trust directory: see the e2e test above)
    assert (args.cluster, args.agent_socket, args.trust_dir) == ("catalog", "/run/meshca/workload/sds.sock",
                                                                 str(TRUST_DIR))
    assert argv == [a.replace("frontend", "catalog") for a in bootstrap_command_in_comment()] + [
        "--agent-socket", "/run/meshca/workload/sds.sock"]


def test_agent_workload_bootstrap_validates_with_envoy(pki: Path, tmp_path: Path) -> None:
    """Real Envoy loads the agent-mode bootstrap (the agent's socket need not exist yet: Envoy keeps trying it)."""
    token_dir, trust_dir = tmp_path / "tokens", tmp_path / "trust"
    token_dir.mkdir()
    trust_dir.mkdir()
    token = token_dir / "meshca-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    write_bundle(TrustSyncSettings((("127.0.0.1", 1),), "meshca.local", trust_dir),
                 SpiffeBundle(((pki / "ca.pem").read_bytes(),)))
    write_token_sds(trust_dir, token)
    embedded = str(find_doc(load_docs(AGENT_WORKLOAD_MANIFEST), "ConfigMap", "catalog-envoy-bootstrap")["data"][
        "bootstrap.yaml"])
    validate_with_envoy(on_host(embedded, trust_dir, token_dir).replace("/run/meshca/workload", str(tmp_path)), tmp_path)


def bootstrap_command_in_comment() -> list[str]:
    """The `meshca bootstrap` command line the ConfigMap's comment says renders its bootstrap (argv[1:])."""
    text = WORKLOAD_MANIFEST.read_text()
    match = re.search(r"^ *# +kubectl -n shop exec deploy/frontend -c meshca-trust-sync -- (meshca bootstrap .*?)\n *#\n",
                      text, re.MULTILINE | re.DOTALL)
    assert match, "the ConfigMap's comment names the meshca bootstrap command"
    command = re.sub(r"\\\n *# *", " ", match.group(1))
    return shlex.split(command)[1:]


def meshca_program() -> list[str]:
    """The `meshca` console script of this interpreter's environment (the image's /opt/meshca/.venv/bin/meshca)."""
    script = Path(sys.executable).parent / "meshca"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli"]


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


@pytest.mark.e2e
async def test_the_pods_commands_run_against_a_real_meshca(tmp_path: Path) -> None:
    """The trust sync sidecar's exact command (host paths, a loopback meshca), started with a stale day-one root,
    writes nothing until that root is refreshed, then what its startup probe waits for; the ConfigMap comment's
    `meshca bootstrap` command renders exactly the ConfigMap's bootstrap from those files; real Envoy validates it
    and, run with the sidecar's flags, is admitted by meshca as the pod."""
    trust_dir, token_dir, root_dir = tmp_path / "trust", tmp_path / "tokens", tmp_path / "root"
    for directory in (trust_dir, token_dir, root_dir):
        directory.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    pod = "frontend-7d9f8c6b5-abcde"
    unrelated_root = make_ca(tmp_path / "unrelated").trust_bundle_pem()
    async with running_meshca(tmp_path / "meshca") as meshca:
        (root_dir / "root.pem").write_bytes(unrelated_root)  # a stale ConfigMap meshca-root
        (token_dir / "meshca-token").write_text(meshca.token("shop", "frontend", pod_name=pod))  # pod-bound

        def to_loopback(text: str) -> str:  # meshca's Service and name -> the test's meshca (it serves "localhost")
            text = text.replace("meshca.meshca-system.svc.cluster.local:15010", f"127.0.0.1:{meshca.port}")
            text = text.replace("meshca.meshca-system.svc.cluster.local", "127.0.0.1")
            text = text.replace("port_value: 15010", f"port_value: {meshca.port}")
            return text.replace("meshca.meshca-system.svc", "localhost")

        sync = sync_container()
        argv = [to_loopback(on_host(arg, trust_dir, token_dir, root_dir)) for arg in sync["command"][1:]]
        probe = [on_host(arg, trust_dir, token_dir) for arg in sync["startupProbe"]["exec"]["command"]]
        sync_log = open(tmp_path / "sync.log", "wb")  # noqa: SIM115 - closed below
        sync_proc = subprocess.Popen([*meshca_program(), *argv], env=env, stdin=subprocess.DEVNULL,
                                     stdout=sync_log, stderr=subprocess.STDOUT)
        envoy_proc: subprocess.Popen[bytes] | None = None
        try:
            await asyncio.to_thread(wait_until, lambda: "cannot be verified with --ca" in (tmp_path / "sync.log")
                                    .read_text(), 30, 0.1, "the sync refuses the meshca its --ca cannot verify")
            assert subprocess.run(probe, check=False).returncode == 1
            assert sorted(p.name for p in trust_dir.iterdir()) == ["meshca-token-sds.json"]  # there for Envoy anyway
            write_atomic(root_dir / "root.pem", meshca.root_pem, 0o644)  # the ConfigMap refreshed
            await asyncio.to_thread(wait_until, lambda: subprocess.run(probe, check=False).returncode == 0, 30, 0.1,
                                    "the startup probe passes")
            assert sync_proc.poll() is None  # --watch: it keeps running

            bootstrap_argv = [on_host(arg, trust_dir, token_dir) for arg in bootstrap_command_in_comment()]
            rendered = await asyncio.to_thread(subprocess.run, [*meshca_program(), *bootstrap_argv], env=env,
                                               capture_output=True, text=True, timeout=60, check=False)
            assert (rendered.returncode, rendered.stderr) == (0, "")
            body = "".join(line for line in rendered.stdout.splitlines(keepends=True) if not line.startswith("#"))
            assert body == on_host(embedded_bootstrap(), trust_dir, token_dir)
            await asyncio.to_thread(validate_with_envoy, body, tmp_path)

            # From here on the ConfigMap's root verifies nothing: Envoy's trust in meshca is the synced file.
            write_atomic(root_dir / "root.pem", unrelated_root, 0o644)
            config = tmp_path / "pod-bootstrap.yaml"
            config.write_text(to_loopback(body).replace("port_value: 15000", "port_value: 0"))
            args = envoy_args({"POD_NAME": pod, "POD_NAMESPACE": "shop"})
            args[args.index("--config-path") + 1] = str(config)
            envoy_log = open(tmp_path / "envoy.log", "wb")  # noqa: SIM115 - closed below
            envoy_proc = subprocess.Popen([find_envoy(), *args], stdin=subprocess.DEVNULL, stdout=envoy_log,
                                          stderr=subprocess.STDOUT, cwd=tmp_path)
            envoy_log.close()

            def admitted() -> bool:
                return any(p.node_id == f"{pod}.shop" and p.identity == f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
                           for p in meshca.app.registry.snapshot())

            try:
                await asyncio.to_thread(wait_until, admitted, 30, 0.1, "meshca admits the pod's Envoy")
            except Exception:
                raise AssertionError((tmp_path / "envoy.log").read_text()[-3000:]) from None
        finally:
            if envoy_proc is not None:
                stop(envoy_proc)
            sync_code = stop(sync_proc)
            sync_log.close()
        assert sync_code == 0, (tmp_path / "sync.log").read_text()


# -- Envoy's --service-node really replaces node.id on the wire ------------------------------------------


@pytest.fixture
def first_requests(pki: Path) -> Iterator[tuple[int, list[bytes], threading.Event]]:
    """A TLS ADS server (DNS:meshca.local) that records the first request of each stream."""
    seen: list[bytes] = []
    arrived = threading.Event()

    def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        seen.append(next(requests, b""))
        arrived.set()
        for _ in requests:
            pass
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        ADS_SERVICE, {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(handle),
                      "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(handle)})])
    creds = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port, seen, arrived
    finally:
        server.stop(grace=0).wait(5)


@pytest.mark.e2e
def test_service_node_flag_sets_the_node_id_meshca_sees(
    first_requests: tuple[int, list[bytes], threading.Event], pki: Path, tmp_path: Path
) -> None:
    """Pins Envoy 1.40: the workload example relies on --service-node overriding node.id."""
    port, seen, arrived = first_requests
    token = tmp_path / "token"
    token.write_text("a.b.c")
    settings = BootstrapSettings(node_id="set-by-envoy-service-node", cluster="frontend", meshca_address="127.0.0.1",
                                 meshca_port=port, meshca_ca_path=pki / "ca.pem", token_path=token)
    config = tmp_path / "bootstrap.yaml"
    config.write_text(render_yaml(settings))
    log = open(tmp_path / "envoy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [find_envoy(), "-c", str(config), "--disable-hot-restart",
         "--admin-address-path", str(tmp_path / "admin"), "--service-node", "frontend-7d9f.shop",
         "--service-cluster", "frontend", "--log-level", "info"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        assert arrived.wait(15), (tmp_path / "envoy.log").read_text()[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    assert b"frontend-7d9f.shop" in seen[0]
    assert b"set-by-envoy-service-node" not in seen[0]


# -- deploy/systemd -----------------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize(
    "name", ["meshca.service", "envoy-sidecar@.service", "meshca-trust-sync.service", "meshca-agent.service"]
)
def test_systemd_unit_sections(name: str) -> None:
    unit = read_unit(SYSTEMD / name)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    service = unit["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert "StartLimitIntervalSec" not in service  # a [Unit] key; systemd ignores it in [Service]


def test_meshca_unit() -> None:
    service = read_unit(SYSTEMD / "meshca.service")["Service"]
    assert service["ExecStart"] == "/opt/meshca/.venv/bin/meshca serve --config /etc/meshca/meshca.yaml"
    assert service["User"] == "meshca"
    assert service["StateDirectory"] == "meshca"
    assert service["StateDirectoryMode"] == "0700"
    assert service["ReadWritePaths"] == "/var/lib/meshca"


def test_envoy_sidecar_template_unit() -> None:
    service = read_unit(SYSTEMD / "envoy-sidecar@.service")["Service"]
    assert "--config-path /etc/envoy/%i.yaml" in service["ExecStart"]
    assert "--disable-hot-restart" in service["ExecStart"]  # several sidecars per host
    assert service["ExecStartPre"].split()[1:3] == ["--mode", "validate"]


def test_trust_sync_unit_runs_the_command_meshca_parses() -> None:
    """The unit's ExecStart is a `meshca trust sync` command line meshca's own parser accepts."""
    import shlex

    from meshca.cli.main import build_parser

    service = read_unit(SYSTEMD / "meshca-trust-sync.service")["Service"]
    argv = shlex.split(service["ExecStart"].replace("\\\n", " "))
    assert argv[0] == "/opt/meshca/.venv/bin/meshca" and argv[1:3] == ["trust", "sync"]
    args = build_parser().parse_args(argv[1:])
    assert args.watch and args.dir == "/etc/envoy/meshca-trust" == service["ReadWritePaths"]


def test_agent_unit_runs_the_command_meshca_parses() -> None:
    """The unit's ExecStart is a `meshca agent` command line meshca's own parser accepts; the sockets' directory is
    the unit's RuntimeDirectory, reachable by group envoy only, and the example config's sockets live there."""
    from meshca.cli.main import build_parser

    text = (SYSTEMD / "meshca-agent.service").read_text()
    service = read_unit(SYSTEMD / "meshca-agent.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/meshca/.venv/bin/meshca" and argv[1] == "agent"
    args = build_parser().parse_args(argv[1:])
    assert args.config == "/etc/meshca/agent.yaml" and args.handler.__name__ == "cmd_agent"
    assert service["RuntimeDirectory"] == "meshca" and service["RuntimeDirectoryMode"] == "0750"
    assert service["Group"] == "envoy" and service["User"] != "root"
    assert service["CapabilityBoundingSet"] == "" and service["LimitCORE"] == "0"
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# /etc/meshca/agent.yaml")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("# Render"))
    example = yaml.safe_load("\n".join(line.removeprefix("#") for line in lines[start:end]))
    assert set(example) == {"meshca", "server_name", "ca", "admin", "workloads"}
    assert parse_host_port(example["admin"])[0] == "127.0.0.1"  # /status is for the host's operator only
    (workload,) = example["workloads"]
    assert workload["socket"].startswith("/run/meshca/") and workload["socket_group"] == service["Group"]
    assert "--agent-socket /run/meshca/" in text
