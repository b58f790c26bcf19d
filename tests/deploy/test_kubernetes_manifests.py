"""The Kubernetes manifests of deploy/kubernetes, checked offline (no cluster, no network).

- The kustomization is rendered here the way kustomize renders it (its `resources`, the only field the
  base uses) and, where a `kustomize` or `kubectl` binary is on the PATH, compared with kustomize's output.
- Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget are validated with
  `kubernetes-validate` (the Kubernetes OpenAPI schemas as JSON schemas, carried in the wheel) in strict
  mode, against the oldest Kubernetes the manifests target and the newest the validator carries.
- The ServiceMonitor is validated against SERVICEMONITOR_SCHEMA, Kiln's own description of the
  monitoring.coreos.com/v1 fields it uses, as strict (no field it does not list) as the others.
- Then the cross-checks no schema can make: the probe paths answer as each probe needs (asked of the
  app itself), ports line up, the grace period covers the preStop sleep plus the server's drain, the HPA's metrics are gauges the server
  exports and the prometheus-adapter rules serve them, the image runs as the Dockerfile's user, and the
  image tag is the one docs/deploy.md builds.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kiln.engine.info import EngineStats
from kiln.serve.app import create_app
from kiln.serve.metrics import ServerMetrics
from kiln.serve.runner import make_server
from kiln.serve.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
DOCS = ROOT / "docs" / "deploy.md"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes the manifests are for: the preStop `sleep` action is beta and on by default from
# 1.30 (alpha behind a feature gate in 1.29, whose schema already has the field).
OLDEST_KUBERNETES = "1.30"
NEWEST_KUBERNETES = ".".join(kubernetes_validate.latest_version().split(".")[:2])
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources"}
# Seconds the engine gets to shut down after the drain, before the kubelet's SIGKILL.
ENGINE_SHUTDOWN_MARGIN_SECONDS = 10
# The least time the startup probe gives a model to load.
MIN_STARTUP_BUDGET_SECONDS = 300

# A Prometheus duration: units from years down to milliseconds, largest first, each at most once ("1m30s").
DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(0|(?=[0-9])([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$",
}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
# The ServiceMonitor fields Kiln's manifest uses or may use (an overlay adding a namespace, a `release`
# label, a namespaceSelector), written for these tests: anything else, a misspelling included, fails.
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "namespace": {"type": "string", "minLength": 1},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": {**STRING_MAP, "minProperties": 1}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    },
                },
                "jobLabel": {"type": "string", "minLength": 1},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},  # the Service port's name
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


# --- rendering -----------------------------------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


@cache
def _rendered() -> tuple[dict[str, Any], ...]:
    kustomization = _kustomization()
    return tuple(obj for name in kustomization["resources"] for obj in _load_all(BASE / name))


def rendered() -> list[dict[str, Any]]:
    """`kustomize build deploy/kubernetes`, a fresh copy per call."""
    return copy.deepcopy(list(_rendered()))


def one(kind: str) -> dict[str, Any]:
    found = [obj for obj in rendered() if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def kiln_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return container


def literal_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in kiln_container().get("env", []) if "value" in e}


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number, or the name of a container port) as a number."""
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in kiln_container()["ports"] if "name" in p}
    assert port in ports, f"no container port named {port!r} (have {sorted(ports)})"
    return ports[port]


class _StubEngine:
    """Enough of an `EngineClient` to build the app and its server without starting anything."""

    def stats(self) -> EngineStats:
        return EngineStats()


@cache
def answers_before_the_engine_starts(path: str) -> int:
    """The status `GET path` gets from the app, API keys configured, engine not started (yet loading)."""
    app = create_app(_StubEngine(), ServerSettings(api_keys=["a-key"]))  # type: ignore[arg-type]
    return TestClient(app).get(path).status_code  # no `with`: the lifespan (engine start) never runs


def exported_metric_types() -> dict[str, str]:
    """Name -> Prometheus type of every metric family `/metrics` exports."""
    body, _ = ServerMetrics(EngineStats, lambda: 0).render()
    return {family.name: family.type for family in text_string_to_metric_families(body.decode())}


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    for name in [n for n in os.environ if n.startswith("KILN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ServerSettings()


def prestop_sleep_seconds(container: dict[str, Any]) -> int:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"), command
    return int(command[1])


@cache
def _servicemonitor_validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SERVICEMONITOR_SCHEMA)
    return jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA)


def validate(obj: dict[str, Any], version: str) -> None:
    """Raise if `obj` does not match its schema: Kubernetes' own, or SERVICEMONITOR_SCHEMA."""
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor"
        _servicemonitor_validator().validate(obj)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


def docs_kubernetes_section() -> str:
    text = DOCS.read_text()
    match = re.search(r"^## Kubernetes\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "docs/deploy.md has no '## Kubernetes' section"
    return match.group(1)


# --- the kustomization ---------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_renderable_fields() -> None:
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= KUSTOMIZATION_KEYS, (
        f"the base uses {sorted(set(kustomization) - KUSTOMIZATION_KEYS)}, which this test does not render"
    )
    on_disk = {p.name for p in BASE.glob("*.y*ml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    for name in kustomization["resources"]:
        assert len(_load_all(BASE / name)) == 1, f"{name}: one object per file"
    kinds = [obj["kind"] for obj in rendered()]
    assert sorted(kinds) == sorted(CORE_KINDS | {"ServiceMonitor"})


def test_the_rendering_here_is_what_kustomize_builds() -> None:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(BASE)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(BASE)]
    else:
        pytest.skip("neither kustomize nor kubectl on the PATH (the other tests validate the rendering here)")
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout

    def by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}

    assert by_name(list(yaml.safe_load_all(out))) == by_name(rendered())


# --- schemas -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", sorted({OLDEST_KUBERNETES, NEWEST_KUBERNETES}))
def test_every_object_matches_its_schema(version: str) -> None:
    validated = set()
    for obj in rendered():
        validate(obj, version)  # a kind with no schema raises SchemaNotFoundError
        validated.add(obj["kind"])
    assert validated == CORE_KINDS | {"ServiceMonitor"}


def _misspell(obj: dict[str, Any]) -> None:
    obj["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}


def _port_as_text(obj: dict[str, Any]) -> None:
    obj["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"


def _sleep_as_exec_field(obj: dict[str, Any]) -> None:
    obj["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["command"] = ["sleep"]


def _hpa_without_target(obj: dict[str, Any]) -> None:
    del obj["spec"]["metrics"][0]["pods"]["target"]


def _endpoint_typo(obj: dict[str, Any]) -> None:
    obj["spec"]["endpoints"][0]["intervall"] = "15s"


def _bad_interval(obj: dict[str, Any]) -> None:
    obj["spec"]["endpoints"][0]["interval"] = "15 seconds"


def _no_selector(obj: dict[str, Any]) -> None:
    del obj["spec"]["selector"]


def _port_as_number(obj: dict[str, Any]) -> None:
    obj["spec"]["endpoints"][0]["port"] = 8000  # `port` names a Service port; a number goes in targetPort


@pytest.mark.parametrize(
    ("kind", "breaks"),
    [
        ("Deployment", _misspell),
        ("Deployment", _port_as_text),
        ("Deployment", _sleep_as_exec_field),
        ("HorizontalPodAutoscaler", _hpa_without_target),
        ("ServiceMonitor", _endpoint_typo),
        ("ServiceMonitor", _bad_interval),
        ("ServiceMonitor", _no_selector),
        ("ServiceMonitor", _port_as_number),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__.strip("_"),
)
def test_the_validation_catches_a_broken_manifest(kind: str, breaks: Any) -> None:
    obj = one(kind)
    validate(obj, OLDEST_KUBERNETES)
    breaks(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate(obj, OLDEST_KUBERNETES)


# --- wiring between the objects ------------------------------------------------------------------------


def test_the_service_routes_to_the_servers_port(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, service = one("Deployment"), one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    settings = settings_from_env(monkeypatch, literal_env())
    assert settings.host == "0.0.0.0"  # the server's default, 127.0.0.1, is unreachable from the Service
    for port in service["spec"]["ports"]:
        assert container_port(port["targetPort"]) == settings.port
    exposed = {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)", DOCKERFILE.read_text(), flags=re.M)}
    assert settings.port in exposed, f"the Dockerfile exposes {sorted(exposed)}"


def test_the_servicemonitor_scrapes_the_services_metrics_port() -> None:
    monitor, service = one("ServiceMonitor"), one("Service")
    selector = monitor["spec"]["selector"]
    assert "matchExpressions" not in selector
    assert selector["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "namespaceSelector" not in monitor["spec"], "the Service is in the ServiceMonitor's namespace"
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        # Prometheus sends no API key: the path must answer without one.
        assert answers_before_the_engine_starts(endpoint.get("path", "/metrics")) == 200
        assert endpoint.get("scheme", "http") == "http"


def test_the_pdb_covers_the_pods_and_lets_drains_proceed() -> None:
    pdb, deployment, hpa = one("PodDisruptionBudget"), one("Deployment"), one("HorizontalPodAutoscaler")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert "minAvailable" not in pdb["spec"]
    # At least one pod may be evicted (a node drain can proceed), and never all of the minimum.
    assert 1 <= pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


# --- probes and shutdown -------------------------------------------------------------------------------


def test_probes_use_the_servers_health_and_readiness_routes() -> None:
    container = kiln_container()
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("liveness", "readiness", "startup")}
    for probe in probes.values():
        assert container_port(probe["port"]) == container_port("http")
        assert probe.get("scheme", "HTTP") == "HTTP"
    # The kubelet sends no API key, and the engine is still loading: liveness must pass already (a probe
    # on /ready would restart every loading or draining pod), readiness must not (/ready: 503 `loading`).
    assert probes["liveness"]["path"] == "/health"
    assert answers_before_the_engine_starts(probes["liveness"]["path"]) == 200
    assert probes["readiness"]["path"] == "/ready"
    assert answers_before_the_engine_starts(probes["readiness"]["path"]) == 503
    assert probes["startup"]["path"] in (probes["liveness"]["path"], probes["readiness"]["path"])


def test_the_startup_probe_gives_the_engine_time_to_load() -> None:
    deployment, container = one("Deployment"), kiln_container()
    startup = container["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    start_periods = re.findall(r"--start-period=(\d+)s", DOCKERFILE.read_text())
    assert budget >= max([MIN_STARTUP_BUDGET_SECONDS, *map(int, start_periods)])
    # A rollout is not declared failed while its new pods may still be loading.
    assert deployment["spec"]["progressDeadlineSeconds"] > budget
    liveness = container["livenessProbe"]
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"]


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    env = literal_env()
    assert "KILN_DRAIN_TIMEOUT_SECONDS" in env, "set the drain timeout explicitly, next to the grace period"
    settings = settings_from_env(monkeypatch, env)
    # The server's own shutdown deadline (uvicorn's graceful-shutdown timeout), as kiln serve sets it.
    server = make_server(_StubEngine(), settings)  # type: ignore[arg-type]
    server_deadline = server.config.timeout_graceful_shutdown
    assert server_deadline >= settings.drain_timeout_seconds
    sleep = prestop_sleep_seconds(kiln_container())
    assert sleep >= 5, "the load balancers need a few seconds to drop the pod"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= sleep + server_deadline + ENGINE_SHUTDOWN_MARGIN_SECONDS, (
        f"terminationGracePeriodSeconds {grace} < preStop {sleep} + server shutdown {server_deadline} "
        f"+ {ENGINE_SHUTDOWN_MARGIN_SECONDS}"
    )


def test_every_kiln_variable_is_a_server_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    env = kiln_container()["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))
    fields = set(ServerSettings.model_fields)
    for name in names:
        assert name.startswith("KILN_") and name[5:].lower() in fields, f"{name} is not a kiln serve setting"
    settings_from_env(monkeypatch, literal_env())  # every literal value parses
    assert pod_spec()["enableServiceLinks"] is False


# --- resources and security ----------------------------------------------------------------------------


def test_each_replica_asks_for_a_gpu_and_its_memory() -> None:
    resources = kiln_container()["resources"]
    requests, limits = resources["requests"], resources["limits"]
    gpus = limits["nvidia.com/gpu"]
    assert isinstance(gpus, int) and gpus >= 1
    assert requests.get("nvidia.com/gpu", gpus) == gpus  # extended resources: requests equal limits
    assert {"cpu", "memory"} <= requests.keys()
    assert limits["memory"] == requests["memory"]

    def gib(quantity: str) -> float:
        number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", quantity).groups()  # type: ignore[union-attr]
        return float(number) / (1024 if unit == "Mi" else 1)

    # tmpfs volumes count against the container's memory limit.
    in_memory = [
        gib(v["emptyDir"]["sizeLimit"]) for v in pod_spec()["volumes"] if v.get("emptyDir", {}).get("medium")
    ]
    assert sum(in_memory) < gib(limits["memory"]) / 2


def test_the_pod_runs_as_the_images_non_root_user() -> None:
    spec, container = pod_spec(), kiln_container()
    pod_security, security = spec["securityContext"], container["securityContext"]
    dockerfile = DOCKERFILE.read_text()
    image_uids = {int(uid) for uid in re.findall(r"^USER\s+(\d+)", dockerfile, flags=re.M)}
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] in image_uids and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    if security.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        homes = set(re.findall(r"useradd\b.*--home-dir\s+(\S+)", dockerfile))
        assert {"/tmp", "/dev/shm", *homes} <= mounts, "the server, Triton and torch write there"


def test_the_image_is_the_tag_docs_deploy_builds() -> None:
    image = kiln_container()["image"]
    registry, _, local_tag = image.partition("/")
    assert "." in registry or ":" in registry, f"{image}: name the registry the cluster pulls from"
    docs = DOCS.read_text()
    built = set(re.findall(r"docker buildx build\b[^\n]*(?:\\\n[^\n]*)*?\s-t\s+(\S+)", docs))
    assert local_tag in built, f"{local_tag} is not among the tags docs/deploy.md builds: {sorted(built)}"


# --- autoscaling ---------------------------------------------------------------------------------------


def hpa_metric_names() -> list[str]:
    return [m["pods"]["metric"]["name"] for m in one("HorizontalPodAutoscaler")["spec"]["metrics"]]


def test_the_hpa_scales_the_deployment_on_gauges_the_server_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply would reset it"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    exported = exported_metric_types()
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert exported.get(name) == "gauge", f"{name} is not a gauge of kiln/serve/metrics.py"
        assert metric["pods"]["target"]["type"] == "AverageValue"
    targets = {
        m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]
    }
    if "kiln_num_requests_running" in targets:
        max_num_seqs = settings_from_env(monkeypatch, literal_env()).max_num_seqs
        assert max_num_seqs is not None, "set KILN_MAX_NUM_SEQS: the running-requests target is a share of it"
        assert 0 < float(targets["kiln_num_requests_running"]) < max_num_seqs


def test_the_prometheus_adapter_rules_serve_the_hpa_metrics() -> None:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules = values["rules"]["custom"]
    exported = exported_metric_types()
    served = {}
    for rule in rules:
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        metric, matchers = series.groups()
        assert metric in exported, f"{metric} is not exported by kiln/serve/metrics.py"
        assert 'namespace!=""' in matchers and 'pod!=""' in matchers
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        as_name = re.sub(rule["name"]["matches"], rule["name"].get("as") or r"\g<0>", metric)
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
        served[as_name] = metric
    for name in hpa_metric_names():
        assert name in served, f"no prometheus-adapter rule serves {name}"


# --- the docs ------------------------------------------------------------------------------------------


def test_docs_show_the_manifests_instead_of_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    section = docs_kubernetes_section()
    assert "kubectl apply -k deploy/kubernetes" in section
    assert "deploy/prometheus-adapter/values.yaml" in section
    assert not re.search(r"^\s*kind:\s*Deployment", section, flags=re.M), "the Deployment lives in deploy/"
    assert "not run on a cluster" in section.lower()
    assert f"Kubernetes {OLDEST_KUBERNETES} and {NEWEST_KUBERNETES}" in section, "the versions validated"
    drain = settings_from_env(monkeypatch, literal_env()).drain_timeout_seconds
    numbers = {
        "terminationGracePeriodSeconds": pod_spec()["terminationGracePeriodSeconds"],
        "KILN_DRAIN_TIMEOUT_SECONDS": int(drain),
        "preStop": prestop_sleep_seconds(kiln_container()),
    }
    for name, value in numbers.items():
        assert re.search(rf"`{name}`[^`\n]{{0,30}}\b{value}\b", section), f"docs: `{name}` is {value}"


def test_the_adapter_rule_in_the_docs_is_the_one_in_deploy() -> None:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    blocks = re.findall(r"```yaml\n(.*?)```", docs_kubernetes_section(), flags=re.S)
    shown = [rule for block in blocks if "seriesQuery" in block for rule in yaml.safe_load(block)]
    assert shown, "docs/deploy.md shows no prometheus-adapter rule"
    for rule in shown:
        assert rule in rules, f"docs/deploy.md shows a rule that deploy/prometheus-adapter lacks: {rule}"
