"""The Kubernetes manifests (deploy/kubernetes): valid against the Kubernetes schemas, offline
(kubernetes-validate, strict: an unknown field fails), and saying what the deployment needs."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from rmq.core.config import KEYS

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BASE = os.path.join(ROOT, "deploy", "kubernetes")
#: the oldest Kubernetes still supported upstream when these were written, and the newest the package knows
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _kustomization() -> dict:
    with open(os.path.join(BASE, "kustomization.yaml")) as fh:
        return yaml.safe_load(fh)


def _resources() -> list[tuple[str, dict]]:
    out = []
    for name in _kustomization()["resources"]:
        with open(os.path.join(BASE, name)) as fh:
            out += [(name, doc) for doc in yaml.safe_load_all(fh) if doc]
    return out


def _kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in _resources() if doc["kind"] == kind}


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or ()}


def test_the_kustomization_lists_every_manifest_file():
    files = {f for f in os.listdir(BASE) if f.endswith(".yaml") and f != "kustomization.yaml"}
    assert set(_kustomization()["resources"]) == files


@pytest.mark.parametrize("version", VERSIONS)
def test_every_kubernetes_resource_passes_the_schema_strictly(version):
    checked = []
    for name, doc in _resources():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema ships with kubernetes-validate (checked below)
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(f"{name}:{doc['kind']}/{doc['metadata']['name']}")
    assert len(checked) == 11, checked


def test_a_misspelled_field_fails_the_strict_check():
    deployment = copy.deepcopy(_kind("Deployment")["worker-heavy"])
    _container(deployment)["resource"] = _container(deployment).pop("resources")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_workers_take_their_budget_from_a_memory_limit_and_expose_metrics_to_probes():
    deployments = _kind("Deployment")
    for name, node in (("worker-light", "light"), ("worker-heavy", "heavy")):
        container = _container(deployments[name])
        env = _env(container)
        assert container["resources"]["limits"]["memory"], name  # the cgroup limit rmq reads
        assert env["RMQ_MEMORY_BUDGET"]["value"].endswith("%")
        assert env["RMQ_METRICS_ADDR"]["value"] == "0.0.0.0"
        port = int(env["RMQ_METRICS_PORT"]["value"])
        assert container["ports"][0]["containerPort"] == port
        assert deployments[name]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert container["readinessProbe"]["httpGet"]["path"] == "/metrics"
        liveness = " ".join(container["livenessProbe"]["exec"]["command"])
        assert "inspect ping" in liveness and f"{node}@$HOSTNAME" in liveness
        assert f"{node}@%h" in container["command"]
        # the broker password comes from the secret, never from the manifest
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rmq-secrets"


def test_beat_runs_as_a_single_replica_that_never_overlaps_itself():
    beat = _kind("Deployment")["beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"


def test_flower_requires_auth_with_credentials_off_the_command_line():
    flower = _container(_kind("Deployment")["flower"])
    assert _env(flower)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "flower-basic-auth"
    assert not any("basic-auth" in part for part in flower["command"])


def test_redis_persists_to_a_volume_and_reads_its_password_from_a_file():
    redis = _kind("StatefulSet")["redis"]
    config = _kind("ConfigMap")["redis-config"]["data"]["redis.conf"]
    assert "appendonly yes" in config and "dir /data" in config
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    container = _container(redis)
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    script = container["args"][0]
    assert "exec redis-server /tmp/redis.conf" in script and "--requirepass" not in script


def test_the_scaler_scales_heavy_workers_on_the_exporters_heavy_queue_depth():
    scaled = _kind("ScaledObject")["worker-heavy"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in _kind("Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    heavy_queue = KEYS["heavy_queue"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == f'sum(rmq_queue_messages{{job="rmq-exporter", queue="{heavy_queue}"}})'
    assert float(trigger["metadata"]["threshold"]) > 0
    # the exporter it reads is deployed alongside
    assert _container(_kind("Deployment")["rmq-exporter"])["command"][:2] == ["rmq", "exporter"]
