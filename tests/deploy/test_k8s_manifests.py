"""The Kubernetes manifests (deploy/k8s): every overlay rendered by `kubectl kustomize`, checked
offline by kubernetes-validate --strict and checkov, and against the gateway itself (probe paths,
ports, the policy ConfigMap, `tabiji check-config`, the key-copying init container, a kubelet-style
ConfigMap update). Imports gateway and policies only to check the manifests against them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gateway.app import build_app
from gateway.assertion import AssertionKeyRing, KeyRingError
from gateway.audit.checkpoint import generate_key, load_private_key
from gateway.decide import PolicyHolder
from gateway.devices.ca import DeviceCA
from gateway.policy_reload import PolicyReloader
from gateway.settings import GatewaySettings, load_settings
from policies.cases import compile_cases, run_case
from policies.loader import load_directory, load_policy_dir

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()
)
TOOLS = Path(os.environ.get("TABIJI_TOOLS_VENV", str(REPO / ".venv-tools"))) / "bin"
# The oldest Kubernetes the manifests are written for (lifecycle.preStop.sleep is on by default
# from 1.30) and kubernetes-validate's newest bundled schema (None: its default).
K8S_VERSIONS = ("1.30", None)
HEALTHZ, READYZ = "/.tabiji/healthz", "/.tabiji/readyz"
# What each Secret key the Deployment reads as an environment variable holds in a cluster, here
# with a password nobody uses. A key the Deployment starts reading must be added here.
SECRET_ENV_PLACEHOLDERS = {
    ("tabiji-stores", "session-store-url"): "rediss://:placeholder@redis.invalid:6379/0",
    ("tabiji-stores", "audit-store-url"): "postgresql://tabiji:placeholder@db.invalid/tabiji",
    ("tabiji-stores", "devices-store-url"): "postgresql://tabiji:placeholder@db.invalid/tabiji",
}
# checkov checks that must have run and passed on every overlay: a renamed check, or a manifest
# checkov silently failed to parse, would otherwise pass by checking nothing.
REQUIRED_CHECKS = {
    "CKV_K8S_8",  # liveness probe
    "CKV_K8S_9",  # readiness probe
    "CKV_K8S_11",  # CPU limits
    "CKV_K8S_13",  # memory limits
    "CKV_K8S_20",  # allowPrivilegeEscalation false
    "CKV_K8S_22",  # read-only root file system
    "CKV_K8S_23",  # no root containers
    "CKV_K8S_28",  # NET_RAW dropped
    "CKV_K8S_31",  # seccomp RuntimeDefault
    "CKV_K8S_37",  # capabilities dropped
    "CKV_K8S_38",  # service account token not mounted
    "CKV_K8S_40",  # high UID
    "CKV_K8S_43",  # image pinned by digest
    "CKV2_K8S_6",  # a NetworkPolicy selects the pods
}
# A URL with a password in it (user:password@host): never in a rendered manifest.
CREDENTIAL_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:]*:[^\s/@]+@", re.IGNORECASE)


def must_have(condition: bool, reason: str) -> None:
    """Skip when a tool is missing; fail instead when CI=true (CI installs it)."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """One `kubectl kustomize` output: its text and its documents."""

    target: str
    text: str
    docs: tuple[dict[str, Any], ...]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"{self.target}: expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def gateway(self) -> dict[str, Any]:
        return next(c for c in self.pod["containers"] if c["name"] == "gateway")

    @property
    def init_keys(self) -> dict[str, Any]:
        return next(c for c in self.pod["initContainers"] if c["name"] == "install-keys")

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def config_map(self, name: str) -> dict[str, str]:
        found = [cm for cm in self.all("ConfigMap") if cm["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.target}: ConfigMap {name} is not rendered"
        data: dict[str, str] = found[0]["data"]
        return data

    def mount(self, path: str) -> dict[str, Any]:
        return next(m for m in self.gateway["volumeMounts"] if m["mountPath"] == path)

    @property
    def config_text(self) -> str:
        """The gateway.yaml the pod reads: the ConfigMap key mounted at the config path."""
        mount = self.mount(config_path(self))
        volume = self.volume(mount["name"])
        return self.config_map(volume["configMap"]["name"])[mount["subPath"]]

    @property
    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.config_text)
        return data


def config_path(rendered: Rendered) -> str:
    """The config file the container is started with (`serve --config PATH`)."""
    args = rendered.gateway["args"]
    return str(args[args.index("--config") + 1])


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, whose built-in kustomize renders the overlays offline."""
    path = shutil.which("kubectl")
    must_have(path is not None, "kubectl is not installed: `kubectl kustomize` renders deploy/k8s")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def render(kubectl: str) -> Callable[[str], Rendered]:
    """Render `base` or an overlay once per session."""
    cache: dict[str, Rendered] = {}

    def rendered(target: str) -> Rendered:
        if target not in cache:
            directory = K8S / "base" if target == "base" else K8S / "overlays" / target
            result = subprocess.run(
                [kubectl, "kustomize", str(directory)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
            docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
            cache[target] = Rendered(target, result.stdout, docs)
        return cache[target]

    return rendered


@pytest.fixture(scope="session")
def tools() -> Path:
    """.venv-tools/bin with the offline checkers, made by deploy/tools.sh when missing."""
    needed = ("kubernetes-validate", "checkov", "yamllint")
    if not all((TOOLS / name).exists() for name in needed):
        result = subprocess.run(
            [str(REPO / "deploy" / "tools.sh")],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        must_have(
            result.returncode == 0,
            f"deploy/tools.sh could not make the deploy tools:\n{result.stderr[-3000:]}",
        )
    must_have(
        all((TOOLS / name).exists() for name in needed),
        f"{TOOLS} lacks {', '.join(needed)} (run deploy/tools.sh)",
    )
    return TOOLS


def write_rendered(tmp_path: Path, rendered: Rendered) -> Path:
    path = tmp_path / f"{rendered.target}.yaml"
    path.write_text(rendered.text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the tools' lock


def test_tools_lock_pins_every_package_by_hash() -> None:
    """deploy/lock/tools.txt pins every package (==) with hashes, and holds every tools.in tool."""
    lock = (REPO / "deploy" / "lock" / "tools.txt").read_text(encoding="utf-8")
    wanted = [
        re.split(r"[=<>~ ]", line.strip())[0].lower()
        for line in (REPO / "deploy" / "lock" / "tools.in").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    blocks = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+)", lock, re.M
    )
    pinned = {name.lower() for name, _, _ in blocks}
    requirement_lines = [line for line in lock.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert len(requirement_lines) == len(blocks), "a requirement without == and hashes"
    assert set(wanted) <= pinned, f"tools.in names missing from the lock: {set(wanted) - pinned}"
    assert "podman-compose" in pinned
    assert "checkov" in pinned


# --------------------------------------------------------------------------- offline validators


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "newest")
@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_kubernetes_validate_strict(
    target: str,
    version: str | None,
    render: Callable[[str], Rendered],
    tools: Path,
    tmp_path: Path,
) -> None:
    """Every rendered resource matches the Kubernetes schema, unknown fields refused (--strict)."""
    rendered = render(target)
    command = [str(tools / "kubernetes-validate"), "--strict", "--quiet"]
    if version:
        command += ["--kubernetes-version", version]
    result = subprocess.run(
        [*command, str(write_rendered(tmp_path, rendered))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rendered.docs) >= 7


def test_yamllint_strict(tools: Path) -> None:
    """Every YAML file under deploy/k8s passes yamllint --strict (warnings fail too)."""
    result = subprocess.run(
        [
            str(tools / "yamllint"),
            "--strict",
            "--config-file",
            str(K8S / ".yamllint.yaml"),
            str(K8S),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(K8S.rglob("*.yaml"))) >= 15


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes_or_skips_with_a_reason(
    overlay: str, render: Callable[[str], Rendered], tools: Path, tmp_path: Path
) -> None:
    """checkov finds no failed check; each skip carries its written reason in the manifest."""
    path = write_rendered(tmp_path, render(overlay))
    result = subprocess.run(
        [
            str(tools / "checkov"),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--output",
            "json",
            "--file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"},
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    results = [r["results"] for r in reports if r.get("check_type") == "kubernetes"]
    assert results, f"checkov ran no kubernetes checks: {result.stdout[:2000]}"
    failed = [
        (c["check_id"], c["resource"], c["check_name"]) for r in results for c in r["failed_checks"]
    ]
    assert not failed, f"checkov failed checks: {failed}"
    skipped = [c for r in results for c in r["skipped_checks"]]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason) >= 20, f"{check['check_id']} is skipped without a written reason"
    passed = {c["check_id"] for r in results for c in r["passed_checks"]}
    assert passed >= REQUIRED_CHECKS, f"checks that did not pass: {REQUIRED_CHECKS - passed}"
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------ what checkov does not know


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_part_is_rendered(overlay: str, render: Callable[[str], Rendered]) -> None:
    """An overlay renders the whole deployment, in its own namespace, and defines no Secret."""
    rendered = render(overlay)
    kinds = sorted(doc["kind"] for doc in rendered.docs)
    for kind in (
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    ):
        assert kind in kinds, f"{overlay}: no {kind}"
    assert kinds.count("ConfigMap") == 2
    assert "Secret" not in kinds, "Secrets are created by the operator, never shipped"
    namespace = rendered.one("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in rendered.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_in_the_manifests(overlay: str, render: Callable[[str], Rendered]) -> None:
    """Passwords come only from Secret references: no URL with a password, no literal secret env."""
    rendered = render(overlay)
    assert not CREDENTIAL_IN_URL.search(rendered.text)
    for container in rendered.pod["containers"] + rendered.pod["initContainers"]:
        for variable in container.get("env", []):
            if "value" in variable:
                assert not re.search(r"secret|password|token|key|store", variable["name"], re.I), (
                    f"{variable['name']} is a literal; take it from a Secret"
                )
            else:
                assert set(variable["valueFrom"]) == {"secretKeyRef"}
    # The config's own store URLs carry no password (the Secret's TABIJI_… variables override).
    config = rendered.config
    for url in (
        config["identity"]["session"]["store"],
        config["audit"]["store"],
        config["devices"]["store"],
    ):
        assert not CREDENTIAL_IN_URL.search(url)
    secret_volumes = {v["secret"]["secretName"] for v in rendered.pod["volumes"] if "secret" in v}
    assert secret_volumes == {
        "tabiji-oidc",
        "tabiji-assertion-keys",
        "tabiji-audit-key",
        "tabiji-device-ca",
    }


def containerfile_user() -> tuple[int, int]:
    """The UID:GID deploy/Containerfile runs as (its last USER line)."""
    text = (REPO / "deploy" / "Containerfile").read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    assert users, "deploy/Containerfile has no numeric USER uid:gid"
    uid, gid = users[-1]
    return int(uid), int(gid)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str, render: Callable[[str], Rendered]) -> None:
    """Non-root as the image's own user, read-only root, no capabilities, no API token, and
    every writable path an emptyDir; requests and limits everywhere; the image pinned by digest."""
    rendered = render(overlay)
    uid, gid = containerfile_user()
    pod = rendered.pod
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    account = rendered.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == uid
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}", container["image"])
        for need in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][need])
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            if not mount.get("readOnly"):
                assert "emptyDir" in volumes[mount["name"]], f"{mount['mountPath']} is writable"
    # Private keys stay in memory, never on the node's disk.
    assert rendered.volume("keys")["emptyDir"]["medium"] == "Memory"


def seconds(value: object) -> float:
    """A config duration ('500ms', '30s', '1m' or a number) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(value).strip())
    assert match, value
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_availability(overlay: str, render: Callable[[str], Rendered]) -> None:
    """≥ 2 replicas spread over nodes; a CPU autoscaler and a disruption budget for the same pods;
    the grace period outlasts the pause before SIGTERM plus the gateway's graceful shutdown."""
    rendered = render(overlay)
    deployment = rendered.one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= replicas <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    if "minAvailable" in pdb:
        assert 1 <= pdb["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can proceed
    else:
        assert pdb["maxUnavailable"] >= 1
    spread = rendered.pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)
    pause = rendered.gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = rendered.pod["terminationGracePeriodSeconds"]
    graceful = seconds(rendered.config.get("server", {}).get("graceful_shutdown", "30s"))
    assert grace >= pause + graceful + 5
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def container_port(rendered: Rendered, name: str) -> int:
    port: int = next(p["containerPort"] for p in rendered.gateway["ports"] if p["name"] == name)
    return port


def ingress_ports(rendered: Rendered) -> set[int]:
    policy = rendered.one("NetworkPolicy")["spec"]
    return {port["port"] for rule in policy["ingress"] for port in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_agree_with_the_config(overlay: str, render: Callable[[str], Rendered]) -> None:
    """The container port the probes, Service and NetworkPolicy use is the config's listen port;
    a metrics listener has its own named port that only the NetworkPolicy's scraper may reach."""
    rendered = render(overlay)
    config = rendered.config
    listen = config["listen"]
    assert listen["host"] == "0.0.0.0"  # noqa: S104 — reachable on the pod's address
    assert container_port(rendered, "http") == listen["port"]
    service_ports = rendered.one("Service")["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["http"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert rendered.gateway[probe]["httpGet"]["port"] == "http"
    metrics = (config.get("metrics") or {}).get("listen")
    names = {p["name"] for p in rendered.gateway["ports"]}
    if metrics:
        assert container_port(rendered, "metrics") == metrics["port"]
        assert ingress_ports(rendered) == {listen["port"], metrics["port"]}
    else:
        assert names == {"http"}
        assert ingress_ports(rendered) == {listen["port"]}
    policy = rendered.one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"].items() <= (
        rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    # Every ingress rule names its peers: an empty `from` would admit every pod in the cluster.
    assert all(rule.get("from") for rule in policy["ingress"])
    # Egress to public HTTPS (the IdP) keeps the cloud metadata service and private ranges shut.
    blocks = [
        peer["ipBlock"] for rule in policy["egress"] for peer in rule["to"] if "ipBlock" in peer
    ]
    for block in blocks:
        if block["cidr"] == "0.0.0.0/0":
            assert {"169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(
                block["except"]
            )


async def asgi_get(app: Any, host: str, path: str) -> tuple[int, bytes]:
    """One GET through the gateway's ASGI app in-process, as kubelet sends it (Host: pod IP)."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", host.encode()), (b"user-agent", b"kube-probe/1.30")],
        "client": ("10.244.0.1", 40000),
        "server": ("10.244.3.7", 8080),
        "extensions": {"tabiji.raw_target": path.encode()},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app.forwarder.start()
    try:
        await app(scope, receive, send)
    finally:
        await app.forwarder.close()
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), body


@pytest.mark.anyio
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_probes_reach_the_gateways_own_endpoints(
    overlay: str, render: Callable[[str], Rendered], tmp_path: Path
) -> None:
    """Readiness asks /.tabiji/readyz and liveness /.tabiji/healthz, and the gateway answers both
    with 200 on the pod's address as Host (kubelet's), where a wrong path would not be 200."""
    rendered = render(overlay)
    paths = {
        name: rendered.gateway[name]["httpGet"]["path"]
        for name in ("readinessProbe", "livenessProbe", "startupProbe")
    }
    assert paths == {"readinessProbe": READYZ, "livenessProbe": HEALTHZ, "startupProbe": HEALTHZ}
    port = rendered.config["listen"]["port"]
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"listen: {{host: 0.0.0.0, port: {port}}}\n"
        "public_url: https://gateway.town.example\n"
        "routes:\n"
        "  - {name: app, from: https://app.town.example, to: 'http://127.0.0.1:9', public: true}\n",
        encoding="utf-8",
    )
    app = build_app(load_settings(config))
    host = f"10.244.3.7:{port}"
    for path in set(paths.values()):
        status, body = await asgi_get(app, host, path)
        assert status == 200, (path, body[:300])
        assert json.loads(body)["status"] in {"alive", "ready"}
    status, _ = await asgi_get(app, host, "/healthz")  # a probe path outside /.tabiji/
    assert status != 200


def policy_files(rendered: Rendered) -> dict[str, str]:
    """The policy ConfigMap mounted at the config's policy directory (never through subPath)."""
    config_dir = PurePosixPath(config_path(rendered)).parent
    directory = config_dir / rendered.config["policies"]["dir"]
    mount = rendered.mount(str(directory))
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    return rendered.config_map(rendered.volume(mount["name"])["configMap"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_configmap_loads_and_its_cases_pass(
    overlay: str, render: Callable[[str], Rendered], tmp_path: Path
) -> None:
    """The policy ConfigMap's files load with the real policy loader, and their tests pass."""
    rendered = render(overlay)
    for name, text in policy_files(rendered).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    loaded = load_directory(tmp_path)
    cases, errors = compile_cases(loaded.cases, loaded.policy_set, datetime.now(UTC))
    assert not errors, [str(e) for e in errors]
    assert cases, "the policy ConfigMap carries its test cases"
    failed = [case for case in cases if not run_case(case, loaded.policy_set).passed]
    assert not failed
    config = rendered.config
    named = {route["policy"] for route in config["routes"] if route.get("policy")}
    named |= {config["audit"]["view_policy"], config["devices"]["admin_policy"]}
    assert named <= set(loaded.policy_set.names())


# --------------------------------------------------------------------------- the config, for real


def lay_out(rendered: Rendered, root: Path) -> tuple[Path, dict[str, str]]:
    """Recreate the gateway container's file view under `root`: ConfigMaps with their data,
    Secret mounts with a placeholder for each file the config names there, emptyDirs empty.
    Returns the config file and the container's environment (Secret values as placeholders)."""
    secret_dirs: list[Path] = []
    for mount in rendered.gateway["volumeMounts"]:
        volume = rendered.volume(mount["name"])
        target = root / mount["mountPath"].lstrip("/")
        if "configMap" in volume:
            data = rendered.config_map(volume["configMap"]["name"])
            if "subPath" in mount:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[mount["subPath"]], encoding="utf-8")
            else:
                target.mkdir(parents=True, exist_ok=True)
                for name, text in data.items():
                    (target / name).write_text(text, encoding="utf-8")
        else:
            target.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                secret_dirs.append(target)
    config_file = root / config_path(rendered).lstrip("/")
    for provider in rendered.config["identity"]["providers"]:
        secret = (config_file.parent / provider["client_secret_file"]).resolve()
        assert any(secret.parent == directory for directory in secret_dirs), (
            f"{provider['client_secret_file']} is not in a mounted Secret"
        )
        secret.write_text("placeholder-client-secret\n", encoding="utf-8")
    env: dict[str, str] = {}
    for variable in rendered.gateway.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            key = (ref["name"], ref["key"])
            assert key in SECRET_ENV_PLACEHOLDERS, f"add a placeholder for Secret key {key}"
            env[variable["name"]] = SECRET_ENV_PLACEHOLDERS[key]
    return config_file, env


@pytest.fixture
def clean_tabiji_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TABIJI_… variable from the caller's shell leaks into the config under test."""
    for name in list(os.environ):
        if name.startswith("TABIJI_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_passes_tabiji_check_config(
    overlay: str, render: Callable[[str], Rendered], tmp_path: Path, clean_tabiji_env: None
) -> None:
    """`tabiji check-config` accepts the ConfigMap's config as the pod sees it: the mounts laid out,
    the Secret-fed variables set (with placeholders); so the ConfigMap, mounts and env agree."""
    rendered = render(overlay)
    config_file, env = lay_out(rendered, tmp_path / "pod")
    tabiji = Path(sys.executable).with_name("tabiji")
    result = subprocess.run(
        [str(tabiji), "check-config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_paths_fit_the_mounts(
    overlay: str,
    render: Callable[[str], Rendered],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_tabiji_env: None,
) -> None:
    """Everything the gateway writes lies on an emptyDir; the key paths are where install-keys puts
    the Secrets' keys; the stores in force are the Secret's (the file's are overridden)."""
    rendered = render(overlay)
    config_file, env = lay_out(rendered, tmp_path / "pod")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings: GatewaySettings = load_settings(config_file)
    assert (
        settings.identity.session.store
        == SECRET_ENV_PLACEHOLDERS[("tabiji-stores", "session-store-url")]
    )
    assert settings.audit.store == SECRET_ENV_PLACEHOLDERS[("tabiji-stores", "audit-store-url")]
    assert settings.devices.store == SECRET_ENV_PLACEHOLDERS[("tabiji-stores", "devices-store-url")]
    assert settings.devices.enabled
    writable = [
        PurePosixPath(m["mountPath"])
        for m in rendered.gateway["volumeMounts"]
        if "emptyDir" in rendered.volume(m["name"])
    ]
    script = "\n".join(rendered.init_keys["args"])
    for path in (
        settings.assertion.key_dir,
        settings.audit.key_file.parent,
        settings.audit.spool_dir,
        settings.devices.ca_dir,
    ):
        inside = PurePosixPath(path)
        assert any(inside == w or w in inside.parents for w in writable), f"{path} is read-only"
    for path in (
        settings.assertion.key_dir,
        settings.audit.key_file.parent,
        settings.devices.ca_dir,
    ):
        assert f" {path}\n" in script or script.rstrip().endswith(f" {path}"), (
            f"install-keys does not fill {path}"
        )
    assert settings.audit.durability == "durable"  # several replicas: a killed pod loses nothing


# --------------------------------------------------------------------------- install-keys, for real


def kubelet_publish(directory: Path, files: Mapping[str, bytes], stamp: str, mode: int) -> None:
    """Write `files` into `directory` the way kubelet updates a Secret or ConfigMap volume: a new
    hidden ..<timestamp> directory, a ..data symlink swapped onto it by rename, and stable
    user-visible symlinks name -> ..data/name (pkg/volume/util/atomic_writer.go)."""
    directory.mkdir(parents=True, exist_ok=True)
    fresh = directory / f"..{stamp}"
    fresh.mkdir()
    for name, data in files.items():
        (fresh / name).write_bytes(data)
        (fresh / name).chmod(mode)
    data_link = directory / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    os.symlink(fresh.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", data_link)
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if old:
        shutil.rmtree(directory / old)


def regular_files(directory: Path) -> dict[str, bytes]:
    """What `kubectl create secret generic --from-file=DIR` would take (no dotfiles, no dirs)."""
    return {
        p.name: p.read_bytes()
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def install_keys(
    rendered: Rendered, root: Path, sources: Mapping[str, Path]
) -> subprocess.CompletedProcess[str]:
    """Run the init container's own script with its mounts under `root`: each Secret volume laid
    out as kubelet does (mode 0440, as with fsGroup), from the directories in `sources`."""
    container = rendered.init_keys
    script = container["args"][0]
    mounts = sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        script = script.replace(mount["mountPath"], str(root) + mount["mountPath"])
        volume = rendered.volume(mount["name"])
        target = root / mount["mountPath"].lstrip("/")
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440
            kubelet_publish(
                target,
                regular_files(sources[volume["secret"]["secretName"]]),
                "2026_01_01_00_00_00.1",
                0o440,
            )
        else:
            target.mkdir(parents=True, exist_ok=True)
    assert container["command"][0] == "/bin/sh"
    return subprocess.run(
        [*container["command"], script], capture_output=True, text=True, timeout=60, check=False
    )


def real_key_sources(root: Path) -> dict[str, Path]:
    """Keys made by the gateway's own code, as an operator makes them before creating Secrets."""
    assertion, audit, ca = root / "assertion", root / "audit", root / "device-ca"
    AssertionKeyRing(assertion).ensure(time.time())
    audit.mkdir()
    generate_key(audit / "audit-key.pem")
    DeviceCA(ca).load()
    return {"tabiji-assertion-keys": assertion, "tabiji-audit-key": audit, "tabiji-device-ca": ca}


def test_a_secret_volume_is_refused_by_the_gateways_key_checks(tmp_path: Path) -> None:
    """Why install-keys exists: keys straight from a Secret volume (group-readable) are refused."""
    sources = real_key_sources(tmp_path / "src")
    volume = tmp_path / "volume"
    kubelet_publish(
        volume, regular_files(sources["tabiji-assertion-keys"]), "2026_01_01_00_00_00.1", 0o440
    )
    with pytest.raises(KeyRingError):
        AssertionKeyRing(volume).load()
    audit = tmp_path / "audit"
    kubelet_publish(
        audit, regular_files(sources["tabiji-audit-key"]), "2026_01_01_00_00_00.1", 0o440
    )
    with pytest.raises(PermissionError):
        load_private_key(audit / "audit-key.pem")


def test_install_keys_gives_the_gateway_keys_it_accepts(
    render: Callable[[str], Rendered], tmp_path: Path
) -> None:
    """The init container's script turns the three Secret volumes into key directories the
    gateway's own loaders accept (0700 directories, 0600 files, a lock file possible)."""
    rendered = render(OVERLAYS[0])
    sources = real_key_sources(tmp_path / "src")
    root = tmp_path / "pod"
    result = install_keys(rendered, root, sources)
    assert result.returncode == 0, result.stderr
    keys = root / "var/lib/tabiji/keys"
    ring = AssertionKeyRing(keys / "assertion")
    ring.load()
    expected = AssertionKeyRing(sources["tabiji-assertion-keys"])
    expected.load()
    assert ring.signing_key(time.time()).kid == expected.signing_key(time.time()).kid
    load_private_key(keys / "audit" / "audit-key.pem")
    ca = DeviceCA(keys / "device-ca")
    ca.load()  # writes its .lock beside the key: the directory must be writable
    for directory in ("assertion", "audit", "device-ca"):
        assert stat.S_IMODE((keys / directory).stat().st_mode) == 0o700
        for file in (keys / directory).iterdir():
            if file.name.endswith(".pem") or file.name.endswith(".json"):
                assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_install_keys_fails_the_pod_without_keys(
    render: Callable[[str], Rendered], tmp_path: Path
) -> None:
    """An empty key Secret stops the pod instead of letting each replica make keys of its own."""
    rendered = render(OVERLAYS[0])
    sources = real_key_sources(tmp_path / "src")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = install_keys(rendered, tmp_path / "pod", {**sources, "tabiji-assertion-keys": empty})
    assert result.returncode != 0
    assert not (tmp_path / "pod/var/lib/tabiji/keys/assertion/keyring.json").exists()


# ------------------------------------------------------------------ a policy change rolls out


def changed_policies(files: Mapping[str, str]) -> dict[str, bytes]:
    """The same policy files with one more policy: a change the content hash must notice."""
    out = {name: text.encode() for name, text in files.items()}
    name = next(n for n, text in files.items() if "policies" in (yaml.safe_load(text) or {}))
    data = yaml.safe_load(files[name])
    data["policies"].append(
        {"name": "rollout-probe", "allow": [{"name": "nobody", "all": [{"reject": True}]}]}
    )
    out[name] = yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode()
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_a_configmap_update_reaches_the_workers(
    overlay: str, render: Callable[[str], Rendered], tmp_path: Path
) -> None:
    """kubelet's update of the policy volume (a ..data symlink swap; no policy file's name changes)
    is picked up by the reloader as the config sets it up, within a few poll intervals."""
    rendered = render(overlay)
    files = policy_files(rendered)
    policies = rendered.config["policies"]
    interval = seconds(policies.get("poll_interval", "2s"))
    volume = tmp_path / "policies"
    kubelet_publish(
        volume, {n: t.encode() for n, t in files.items()}, "2026_01_01_00_00_00.1", 0o644
    )
    config = rendered.config
    required = frozenset(route["policy"] for route in config["routes"] if route.get("policy"))
    reloader = PolicyReloader(
        directory=volume,
        holder=PolicyHolder(load_policy_dir(volume)),
        required=required,
        poll_interval=interval,
        use_events=policies.get("watch", "events") == "events",
        count=lambda result: None,
    )
    before = reloader.holder.current.content_hash
    await reloader.start()
    try:
        await asyncio.sleep(0.5)  # the watcher is running
        started = time.monotonic()
        kubelet_publish(volume, changed_policies(files), "2026_01_01_00_01_00.2", 0o644)
        deadline = started + 3 * interval + 5
        # Polling the holder is the test's own probe (the reloader has no change event to await).
        while reloader.holder.current.content_hash == before and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
    finally:
        await reloader.stop()
    assert reloader.holder.current.content_hash != before, "the ConfigMap update was not seen"
    assert "rollout-probe" in reloader.holder.current.names()
    print(f"{overlay}: policy ConfigMap swap seen after {took:.2f}s (poll_interval {interval}s)")
