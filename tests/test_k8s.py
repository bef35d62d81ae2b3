"""k8s/: every overlay renders with ``kubectl kustomize``, every object validates against a
schema, and the policy checks hold.

Without ``kubectl`` on PATH the tests that render an overlay are skipped; the base resources
are then still read straight from ``k8s/base`` (namespace and serveConfigV2 filled in as its
kustomization does) and checked against the same schemas and policies.

Schemas, all from disk (no network):
- RayCluster, RayJob, RayService: the KubeRay v1.7.0 CRDs vendored in ``k8s/crds`` (or the
  directory in ``$OODLAB_KUBERAY_CRDS``), made strict: an unknown field is an error, as with
  ``kubectl apply --validate=strict`` (https://kubernetes.io/docs/reference/kubectl/).
- Pod templates (Deployment, Job) and Services: the core/v1 PodTemplateSpec and Service
  schemas that those CRDs embed (generated from k8s.io/api).
- Deployment, Job, PVC, Namespace, ConfigMap and NetworkPolicy wrappers: focused schemas
  written here for the fields we use (no Kubernetes OpenAPI document is installed); the
  NetworkPolicy rules reuse the CRD's embedded networking/v1 rule schema.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ["base", "overlays/local", "overlays/gpu", "overlays/haproxy"]
CRD_DIR = Path(os.environ.get("OODLAB_KUBERAY_CRDS", K8S / "crds"))
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH: the overlays are rendered with "
                            "`kubectl kustomize` (install kubectl to run this test)")
SECRET_REFS = {"oodlab-s3", "oodlab-postgres", "oodlab-serve-token"}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.I)


# ------------------------------------------------------------------ rendering + schemas


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay as ``kubectl kustomize`` renders it (callers are marked needs_kubectl)."""
    assert KUBECTL is not None, "kubectl not on PATH"
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def base_objects() -> list[dict[str, Any]]:
    """The resources of ``k8s/base`` read without kustomize: its ``namespace`` set on every
    namespaced object and serve_config.yaml as the RayService's serveConfigV2, which is what
    its kustomization does to the fields that the schemas and policy checks look at."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    serve_config = (K8S / "base" / "serve_config.yaml").read_text()
    objs = []
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((K8S / "base" / name).read_text()):
            if not obj:
                continue
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
            if obj["kind"] == "RayService":
                obj["spec"]["serveConfigV2"] = serve_config
            objs.append(obj)
    return objs


def strict(schema: Any) -> Any:
    """A copy where object schemas with known properties reject unknown ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    assert path.is_file(), f"KubeRay CRD not found: {path} (set OODLAB_KUBERAY_CRDS)"
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


def _pod_template() -> dict[str, Any]:
    return crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"][
        "properties"]["template"]


def _service() -> dict[str, Any]:
    return crd_schema("RayService")["properties"]["spec"]["properties"]["serveService"]


def _selector() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "properties": {"matchLabels": {"type": "object",
                                           "additionalProperties": {"type": "string"}},
                           "matchExpressions": {"type": "array"}}}


def _meta(namespaced: bool = True) -> dict[str, Any]:
    props = {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
             "labels": {"type": "object", "additionalProperties": {"type": "string"}},
             "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}
    if namespaced:
        props["namespace"] = {"const": "oodlab"}
    return {"type": "object", "required": ["name"] + (["namespace"] if namespaced else []),
            "properties": props, "additionalProperties": False}


def _object(api: str, kind: str, spec: dict[str, Any] | None, namespaced: bool = True,
            **extra: Any) -> dict[str, Any]:
    props = {"apiVersion": {"const": api}, "kind": {"const": kind},
             "metadata": _meta(namespaced)} | extra
    if spec is not None:
        props["spec"] = spec
    return {"type": "object", "required": ["apiVersion", "kind", "metadata"] +
            (["spec"] if spec is not None else []), "properties": props,
            "additionalProperties": False}


@cache
def schemas() -> dict[str, dict[str, Any]]:
    pod = _pod_template()
    rules = crd_schema("RayCluster")["properties"]["spec"]["properties"]["networkPolicy"][
        "properties"]["head"]["properties"]
    quantity = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    out = {kind: crd_schema(kind) for kind in ("RayCluster", "RayJob", "RayService")}
    out["Deployment"] = _object("apps/v1", "Deployment", {
        "type": "object", "required": ["selector", "template"], "additionalProperties": False,
        "properties": {"replicas": {"type": "integer", "minimum": 0}, "selector": _selector(),
                       "strategy": {"type": "object", "properties": {
                           "type": {"enum": ["Recreate", "RollingUpdate"]}}},
                       "template": pod}})
    out["Job"] = _object("batch/v1", "Job", {
        "type": "object", "required": ["template"], "additionalProperties": False,
        "properties": {"backoffLimit": {"type": "integer", "minimum": 0}, "template": pod}})
    out["PersistentVolumeClaim"] = _object("v1", "PersistentVolumeClaim", {
        "type": "object", "required": ["accessModes", "resources"],
        "additionalProperties": False,
        "properties": {"accessModes": {"type": "array", "items": {
            "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "storageClassName": {"type": "string"},
            "resources": {"type": "object", "additionalProperties": False, "required": [
                "requests"], "properties": {"requests": {
                    "type": "object", "required": ["storage"], "additionalProperties": False,
                    "properties": {"storage": quantity}}}}}})
    out["Namespace"] = _object("v1", "Namespace", None, namespaced=False)
    out["ConfigMap"] = _object("v1", "ConfigMap", None, data={
        "type": "object", "additionalProperties": {"type": "string"}})
    out["Service"] = _service()
    out["NetworkPolicy"] = _object("networking.k8s.io/v1", "NetworkPolicy", {
        "type": "object", "required": ["podSelector"], "additionalProperties": False,
        "properties": {"podSelector": _selector(),
                       "policyTypes": {"type": "array", "items": {"enum": ["Ingress",
                                                                           "Egress"]}},
                       "ingress": rules["ingressRules"], "egress": rules["egressRules"]}})
    return out


def validate(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one object, as 'Kind/name: path: message' lines."""
    schema = schemas().get(obj.get("kind"))
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if schema is None:
        return [f"{name}: no schema for kind {obj.get('kind')!r}"]
    errors = jsonschema.Draft7Validator(schema).iter_errors(obj)
    return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in errors]


# ------------------------------------------------------------------ policy checks


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the object makes."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "Job"):
        return [("template", spec["template"]["spec"])]
    clusters = {"RayCluster": [spec], "RayService": [spec.get("rayClusterConfig", {})],
                "RayJob": [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []}
    out = []
    for cluster in clusters.get(kind, []):
        out.append(("head", cluster["headGroupSpec"]["template"]["spec"]))
        out += [(f"group {g['groupName']}", g["template"]["spec"])
                for g in cluster.get("workerGroupSpecs", [])]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        out.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    return out


def _container_problems(where: str, c: dict[str, Any], pod_ctx: dict[str, Any]) -> list[str]:
    probs = []
    ctx = c.get("securityContext", {})
    if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
        probs.append(f"{where}: not runAsNonRoot")
    if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
        probs.append(f"{where}: runAsUser 0")
    if ctx.get("privileged") is True:
        probs.append(f"{where}: privileged")
    if ctx.get("allowPrivilegeEscalation") is not False:
        probs.append(f"{where}: allowPrivilegeEscalation not false")
    if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
        probs.append(f"{where}: capabilities not dropped")
    seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        probs.append(f"{where}: no RuntimeDefault seccomp profile")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                probs.append(f"{where}: no {r} {part[:-1]}")
    for port in c.get("ports", []):
        if "hostPort" in port:
            probs.append(f"{where}: hostPort {port['hostPort']}")
    for env in c.get("env", []):
        if SECRETISH.search(env["name"]) and "value" in env:
            probs.append(f"{where}: env {env['name']} has a plaintext value")
    return probs


def policy_problems(objs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[str]:
    """Every violation of: non-root, no privilege, requests+limits, no plaintext secrets,
    Ray dashboard not exposed outside the cluster."""
    probs: list[str] = []
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("Secret", "Ingress", "Route", "Gateway", "HTTPRoute"):
            probs.append(f"{kind}/{name}: not allowed in the repo (secrets are referenced; "
                         "nothing is exposed outside the cluster)")
        if kind == "Service" and obj.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            probs.append(f"Service/{name}: type {obj['spec']['type']} exposes it outside")
        for where, pod in pod_templates(obj):
            label = f"{kind}/{name} {where}"
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                probs.append(f"{label}: host namespaces")
            pod_ctx = pod.get("securityContext", {})
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                probs += _container_problems(f"{label} container {c['name']}", c, pod_ctx)
            for vol in pod.get("volumes", []):
                if "hostPath" in vol:
                    probs.append(f"{label}: hostPath volume {vol['name']}")
                if "secret" in vol and vol["secret"]["secretName"] not in SECRET_REFS:
                    probs.append(f"{label}: unknown secret {vol['secret']['secretName']}")
        if kind in ("RayCluster", "RayService"):
            cluster = obj["spec"] if kind == "RayCluster" else obj["spec"]["rayClusterConfig"]
            head = cluster["headGroupSpec"]
            if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
                probs.append(f"{kind}/{name}: head service (dashboard) exposed outside")
            if cluster.get("enableInTreeAutoscaling"):
                auto = cluster.get("autoscalerOptions", {})
                fake = {"name": "autoscaler", **{k: auto[k] for k in ("securityContext",
                                                                        "resources") if k in
                                                  auto}}
                probs += _container_problems(f"{kind}/{name} autoscaler", fake, {})
            if kind == "RayService" and cluster.get("authOptions", {}).get("mode") != "token":
                probs.append(f"{kind}/{name}: Ray token auth off")
        if kind == "RayJob" and obj["spec"].get("submissionMode", "K8sJobMode") in (
                "K8sJobMode", "SidecarMode") and "submitterPodTemplate" not in obj["spec"]:
            probs.append(f"RayJob/{name}: default submitter pod (no securityContext/limits)")
    for ref in re.findall(r"secretName: (\S+)|name: (oodlab-\S+)\n\s+key:",
                          yaml.safe_dump_all(list(objs))):
        name = ref[0] or ref[1]
        if name.startswith("oodlab-") and name not in SECRET_REFS:
            probs.append(f"unknown secret reference {name}")
    text = yaml.safe_dump_all(list(objs))
    for pattern in (r"AKIA[0-9A-Z]{16}", r"postgres(?:ql)?://\w+:(?!\$\()\w+@",
                    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"):
        if re.search(pattern, text):
            probs.append(f"a plaintext credential matches {pattern}")
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    if not any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] and
               "Ingress" in p["spec"].get("policyTypes", []) for p in policies):
        probs.append("no default-deny ingress NetworkPolicy")
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "ipBlock" in peer:
                    probs.append(f"NetworkPolicy/{p['metadata']['name']}: ipBlock peer")
                if "namespaceSelector" in peer and not peer.get("podSelector"):
                    probs.append(f"NetworkPolicy/{p['metadata']['name']}: a whole other "
                                 "namespace may connect")
    return probs


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_vendored_crds_are_kuberay_v1(kind):
    crd = yaml.safe_load((K8S / "crds" / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert v1["served"] and v1["storage"]
    assert crd_schema(kind)["properties"]["spec"]["additionalProperties"] is False  # strict
    readme = (K8S / "crds" / "README.md").read_text()
    assert "v1.7.0" in readme and "Apache" in readme
    assert "Apache License" in (K8S / "crds" / "LICENSE").read_text()


def test_base_resources_validate_without_kubectl():
    objs = base_objects()
    assert {o["kind"] for o in objs} >= set(RAY_KINDS) | {"Deployment", "NetworkPolicy"}
    errors = [e for o in objs for e in validate(o)]
    assert errors == [], "\n".join(errors)
    problems = policy_problems(objs)
    assert problems == [], "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    objs = render(overlay)
    kinds = sorted({o["kind"] for o in objs})
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "NetworkPolicy",
            "PersistentVolumeClaim", "Namespace"} <= set(kinds), kinds
    errors = [e for o in objs for e in validate(o)]
    assert errors == [], "\n".join(errors)
    assert all(o["metadata"].get("namespace", "oodlab") == "oodlab" for o in objs)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_policy_checks(overlay):
    problems = policy_problems(render(overlay))
    assert problems == [], "\n".join(problems)


def test_schema_and_policy_checks_can_fail():
    base = base_objects()
    cluster = copy.deepcopy(next(o for o in base if o["kind"] == "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3           # typo
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"     # wrong type
    errors = validate(cluster)
    assert any("maxReplica" in e for e in errors) and any("zero" in e for e in errors)

    bad = copy.deepcopy(next(o for o in base
                             if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"))
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True}
    del c["resources"]["limits"]
    c["env"].append({"name": "DB_PASSWORD", "value": "hunter2"})
    bad["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
           "spec": {"type": "NodePort", "ports": [{"port": 8265}]}}
    head_exposed = copy.deepcopy(next(o for o in base if o["kind"] == "RayService"))
    head_exposed["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    problems = "\n".join(policy_problems([bad, svc, head_exposed]))
    for expected in ("not runAsNonRoot", "privileged", "allowPrivilegeEscalation",
                     "no cpu limit", "no memory limit", "DB_PASSWORD has a plaintext value",
                     "Service/dash: type NodePort", "head service (dashboard) exposed",
                     "no default-deny ingress NetworkPolicy"):
        assert expected in problems, expected


@needs_kubectl
def test_gpu_group_autoscaling_and_dashboard_service():
    def cluster(overlay: str) -> dict[str, Any]:
        return next(o for o in render(overlay) if o["kind"] == "RayCluster")

    for overlay in ("base", "overlays/gpu"):
        spec = cluster(overlay)["spec"]
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["autoscalerOptions"]["version"] == "v2"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]
        res = gpu["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
        for g in groups.values():
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    local = cluster("overlays/local")["spec"]
    assert [g["groupName"] for g in local["workerGroupSpecs"]] == ["cpu"]  # one small node
    assert "nvidia.com/gpu" not in yaml.safe_dump(render("overlays/local"))


@needs_kubectl
def test_haproxy_overlay_sets_serve_mode_on_every_rayservice_container_only():
    """overlays/haproxy: every container of the RayService (head and each worker group) gets
    exactly the variables `oodlab serve --ingress haproxy` sets; base has none of them, and
    the training cluster is the same in both."""
    from oodlab.serve.config import HAPROXY_INGRESS_ENV

    def by_kind(overlay: str) -> dict[str, dict[str, Any]]:
        return {o["kind"]: o for o in render(overlay)}

    def containers(service: dict[str, Any]) -> list[dict[str, Any]]:
        spec = service["spec"]["rayClusterConfig"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]

    def serve_env(container: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e["value"] for e in container.get("env", [])
                if e["name"] in HAPROXY_INGRESS_ENV}

    haproxy, base = by_kind("overlays/haproxy"), by_kind("base")
    assert len(containers(haproxy["RayService"])) >= 2
    for container in containers(haproxy["RayService"]):
        assert serve_env(container) == HAPROXY_INGRESS_ENV, container["name"]
    assert all(serve_env(c) == {} for c in containers(base["RayService"]))
    assert haproxy["RayCluster"] == base["RayCluster"]


def _build_command(kustomization: Path) -> list[str]:
    line = next(x for x in kustomization.read_text().splitlines()
                if x.startswith("# oodlab serve build "))
    return shlex.split(line.removeprefix("# oodlab "))


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_serve_config_is_what_oodlab_serve_build_writes(overlay, tmp_path, monkeypatch):
    from oodlab.cli.main import main

    args = _build_command(K8S / overlay / "kustomization.yaml")
    out_index = args.index("-o") + 1
    committed = ROOT / args[out_index]
    args[out_index] = str(tmp_path / "serve_config.yaml")
    monkeypatch.chdir(ROOT)
    assert main(args) == 0
    assert (tmp_path / "serve_config.yaml").read_text() == committed.read_text()


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_rayservice_serves_the_committed_serve_config(overlay):
    from oodlab.serve.build import validate as validate_serve

    args = _build_command(K8S / overlay / "kustomization.yaml")
    committed = ROOT / args[args.index("-o") + 1]
    service = next(o for o in render(overlay) if o["kind"] == "RayService")
    assert service["spec"]["serveConfigV2"] == committed.read_text()
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    validate_serve(config)
    app = config["applications"][0]
    assert app["args"]["token_file"] == "/etc/oodlab/token" and app["args"]["require_token"]
    assert app["deployments"][0]["user_config"]["tracking_uri"].startswith("http://mlflow.")
    mounts = [m for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              for m in g["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert {"name": "serve-token", "mountPath": "/etc/oodlab", "readOnly": True} in mounts


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_runs_oodlab_tune_on_a_real_spec(overlay):
    from oodlab.cli.main import build_parser
    from oodlab.spec import load_spec
    from oodlab.spec.search_space import check_space, load_space

    job = next(o for o in render(overlay) if o["kind"] == "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "oodlab"}
    assert job["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode",
                                             "SidecarMode")  # the CRD has no enum for it
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "oodlab"]
    args = build_parser().parse_args([a.replace("/app/", f"{ROOT}/") for a in argv[3:]])
    assert args.command == "tune"
    spec = load_spec(args.spec, args.set)
    check_space(load_space(args.space), spec)
    assert spec.storage == "s3://oodlab/runs"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY jobs ./jobs" in dockerfile
    assert "COPY search_spaces ./search_spaces" in dockerfile
    assert re.search(r"^USER 1000$", dockerfile, re.M)


def test_mlflow_server_settings():
    mlflow = next(o for o in base_objects() if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "mlflow")
    c = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not installed
    assert args["backend-store-uri"].startswith("postgresql+psycopg2://$(POSTGRES_USER):"
                                                "$(POSTGRES_PASSWORD)@postgres:5432/")
    assert args["artifacts-destination"].startswith("s3://")
    assert "mlflow.oodlab.svc:5000" in args["allowed-hosts"].split(",")
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "oodlab-postgres"
