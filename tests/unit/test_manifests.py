"""Offline validation of the deployment files: Dockerfile, compose.yaml and k8s/.

* every YAML file under k8s/ parses, and is either a kustomization, a file one of them uses,
  or a known Helm values/example file;
* the kustomizations (base, dev, prod, prod-keda, and dev with the KEDA component added) are
  rendered with tests/unit/kustomize_lite.py (kustomize itself is a Go binary, not on PyPI);
* every built-in Kubernetes object, rendered or standalone, is validated in strict mode against
  the JSON schemas bundled in the PyPI package `kubernetes-validate`, for the oldest and newest
  Kubernetes minor versions checked here; the KEDA ScaledObject (a CRD) against a hand-written
  subset schema in tests/unit/schemas/;
* compose.yaml against the compose-spec JSON schema vendored from the `docker-compose` wheel;
* cross-cutting invariants: probes, resources, non-root, drain timing, PDBs, image tags,
  network isolation, autoscaling wiring, secrets hygiene.

No network, no cluster, no Docker.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate.utils as kv_utils
import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
K8S = ROOT / "k8s"
SCHEMAS = HERE / "schemas"

NAMESPACE = "tidewire"
WORKLOADS = ("gateway", "orchestrator", "tool-workers")
MODULES = {"gateway": "gateway", "orchestrator": "orchestrator", "tool-workers": "tool_workers"}
HEALTH_PORTS = {"gateway": 8080, "orchestrator": 8081, "tool-workers": 8082}
# Kubernetes minor versions whose schemas every object must satisfy (oldest supported here, newest bundled).
K8S_VERSIONS = ("1.29", kv_utils.latest_version())

# YAML files under k8s/ that are not kustomize inputs (Helm values, documentation examples).
NON_KUSTOMIZE_YAML = {
    "nats-values.yaml",
    "prometheus-adapter-values.yaml",
    "overlays/prod/secret.example.yaml",
}
# Secrets that the prod overlay references but deliberately does not ship (created out of band).
EXTERNAL_SECRETS = {"prod": {"tidewire-secrets"}}
PLACEHOLDER_ANNOTATION = "tidewire.dev/placeholder"


def _load_kustomize_lite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kustomize_lite", HERE / "kustomize_lite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kl = _load_kustomize_lite()


# ---------------------------------------------------------------------------------------------
# helpers


def k8s_yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def rel(path: Path) -> str:
    return path.relative_to(K8S).as_posix()


def load_docs(path: Path) -> list[Any]:
    return kl.load_yaml_documents(path)


@cache
def render(variant: str) -> tuple[dict[str, Any], ...]:
    """variant: base | dev | prod | prod-keda | dev+keda (cached; `rendered` hands out copies)."""
    overlay, _, component = variant.partition("+")
    path = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    # "+keda": the overlay with `components: [../../components/keda]` added, as docs/deployment.md says.
    extra = [K8S / "components" / component] if component else []
    return tuple(kl.build(path, extra_components=extra))


def rendered(variant: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(render(variant)))


def of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels + matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def config_value(resources: list[dict[str, Any]], workload: dict[str, Any], key: str) -> str | None:
    """The value a container of `workload` sees for env var `key` (env, then envFrom ConfigMaps)."""
    cms = of_kind(resources, "ConfigMap")
    for container in workload["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env") or []:
            if env["name"] == key and "value" in env:
                return str(env["value"])
        for env_from in container.get("envFrom") or []:
            ref = env_from.get("configMapRef")
            if ref and key in (cms[ref["name"]].get("data") or {}):
                return str(cms[ref["name"]]["data"][key])
    return None


def prestop_sleep_seconds(container: dict[str, Any]) -> int:
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    if len(command) == 1:
        command = shlex.split(command[0])
    if command[-3:-1] == ["sh", "-c"] or command[:2] == ["sh", "-c"]:
        command = shlex.split(command[-1])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return int(command[1])
    return 0


def iter_k8s_objects(docs: list[Any]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
            yield doc


@cache
def keda_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "keda-scaledobject-v1alpha1.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


CRD_VALIDATORS = {("keda.sh/v1alpha1", "ScaledObject"): keda_validator}


def validate_object(obj: dict[str, Any], where: str) -> None:
    """Strict schema validation of one object, built-in kinds for every version in K8S_VERSIONS."""
    crd = CRD_VALIDATORS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        errors = sorted(crd().iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{where}: {obj['kind']}/{obj['metadata'].get('name')}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )
        return
    for version in K8S_VERSIONS:
        try:
            kv_utils.validate(obj, version, strict=True)
        except kv_utils.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{where}: {obj['kind']}/{obj['metadata'].get('name')} (k8s {version}): {path}: {exc.message}"
            )
        except kv_utils.SchemaNotFoundError as exc:
            pytest.fail(
                f"{where}: {exc.message} - add a vendored schema for this kind to tests/unit/schemas/"
            )


def kustomize_inputs() -> dict[str, set[str]]:
    """Files referenced by kustomizations: {'resources': {...}, 'patches': {...}, 'kustomizations': {...}}."""
    out: dict[str, set[str]] = {"resources": set(), "patches": set(), "kustomizations": set()}
    for kfile in K8S.rglob("kustomization.yaml"):
        out["kustomizations"].add(rel(kfile))
        (k,) = load_docs(kfile)
        for entry in k.get("resources") or []:
            path = (kfile.parent / entry).resolve()
            if path.is_file():
                out["resources"].add(rel(path))
        for entry in k.get("patches") or []:
            if "path" in entry:
                out["patches"].add(rel((kfile.parent / entry["path"]).resolve()))
    return out


# ---------------------------------------------------------------------------------------------
# k8s/: files


@pytest.mark.parametrize("path", k8s_yaml_files(), ids=rel)
def test_every_k8s_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: top-level documents must be mappings"


def test_every_k8s_yaml_is_used_or_documented() -> None:
    inputs = kustomize_inputs()
    used = inputs["resources"] | inputs["patches"] | inputs["kustomizations"] | NON_KUSTOMIZE_YAML
    orphans = [rel(p) for p in k8s_yaml_files() if rel(p) not in used]
    assert not orphans, f"YAML under k8s/ that no kustomization uses: {orphans}"
    missing = [name for name in NON_KUSTOMIZE_YAML if not (K8S / name).is_file()]
    assert not missing, missing


def test_standalone_manifests_validate_against_k8s_schemas() -> None:
    inputs = kustomize_inputs()
    files = sorted(inputs["resources"] | {"overlays/prod/secret.example.yaml"})
    assert len(files) >= 10
    for name in files:
        for obj in iter_k8s_objects(load_docs(K8S / name)):
            validate_object(obj, name)


def test_patches_are_partial_objects_of_known_kinds() -> None:
    for name in sorted(kustomize_inputs()["patches"]):
        for doc in load_docs(K8S / name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (
                f"{name}: patch needs apiVersion/kind/metadata"
            )
            assert doc["metadata"].get("name"), f"{name}: patch needs metadata.name"
            if doc.get("$patch") == "delete" or (doc["apiVersion"], doc["kind"]) in CRD_VALIDATORS:
                continue
            # A partial object fails `required` checks, but its kind must have a schema: the merged
            # result is validated in the render tests.
            try:
                kv_utils.validate(doc, K8S_VERSIONS[-1], strict=True)
            except kv_utils.ValidationError:
                pass
            except kv_utils.SchemaNotFoundError as exc:
                pytest.fail(f"{name}: {exc.message}")


def test_keda_scaledobject_is_an_optional_component_only() -> None:
    (base,) = load_docs(K8S / "base" / "kustomization.yaml")
    assert not any("keda" in entry for entry in base.get("resources") or [])
    (component,) = load_docs(K8S / "components" / "keda" / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    for overlay in ("dev", "prod"):
        assert not any(r["kind"] == "ScaledObject" for r in rendered(overlay))
    # prod-keda keeps prod's orchestrator scaling range.
    (so,) = of_kind(rendered("prod-keda"), "ScaledObject").values()
    prod_hpa = of_kind(rendered("prod"), "HorizontalPodAutoscaler")["orchestrator"]["spec"]
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (
        prod_hpa["minReplicas"],
        prod_hpa["maxReplicas"],
    )
    # Why prod-keda is an overlay on top of prod: inside prod, prod's own HPA patch loses its target.
    with pytest.raises(kl.KustomizeError, match="no resource matches patch"):
        kl.build(K8S / "overlays" / "prod", extra_components=[K8S / "components" / "keda"])


# ---------------------------------------------------------------------------------------------
# k8s/: rendered kustomizations

VARIANTS = ("base", "dev", "prod", "prod-keda", "dev+keda")
DEPLOYED = ("dev", "prod", "prod-keda", "dev+keda")


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_validates_against_k8s_schemas(variant: str) -> None:
    resources = rendered(variant)
    assert resources
    seen = set()
    for obj in resources:
        key = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        validate_object(obj, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_namespace(variant: str) -> None:
    for obj in rendered(variant):
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("variant", DEPLOYED)
def test_workloads_have_probes_resources_and_run_as_non_root(variant: str) -> None:
    resources = rendered(variant)
    deployments = of_kind(resources, "Deployment")
    assert set(deployments) == set(WORKLOADS)
    workloads = list(deployments.values()) + list(of_kind(resources, "StatefulSet").values())
    for workload in workloads:
        name = f"{variant}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext") or {}
        assert spec.get("automountServiceAccountToken") is False, name
        for container in containers(workload):
            cname = f"{name}/{container['name']}"
            assert container.get("readinessProbe"), f"{cname}: readinessProbe"
            assert container.get("livenessProbe"), f"{cname}: livenessProbe"
            res = container.get("resources") or {}
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(section) or {}), f"{cname}: resources.{section}"
            sc = container.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{cname}: runAsNonRoot"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{cname}: runAsUser must be a non-zero uid"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cname}: capabilities.drop"
            assert not sc.get("privileged"), cname
    for name, deployment in deployments.items():
        (container,) = pod_spec(deployment)["containers"]
        port = HEALTH_PORTS[name]
        named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            http = container[probe]["httpGet"]
            assert http["path"] == path, f"{name}.{probe}"
            assert named_ports.get(http["port"], http["port"]) == port, f"{name}.{probe} port"
        assert container["command"] == ["python", "-m", MODULES[name]]
        env_port = config_value(
            resources, deployment, "TIDEWIRE_HTTP_PORT" if name == "gateway" else "TIDEWIRE_HEALTH_PORT"
        )
        assert env_port == str(port), name
        # the services default to 127.0.0.1, unreachable for probes and Services
        assert config_value(resources, deployment, "TIDEWIRE_HOST") == "0.0.0.0", name
        assert container["securityContext"].get("readOnlyRootFilesystem") is True, name
        assert pod_spec(deployment)["securityContext"]["runAsUser"] == 10001  # the Dockerfile's uid


@pytest.mark.parametrize("variant", DEPLOYED)
def test_gateway_drains_before_it_is_killed(variant: str) -> None:
    resources = rendered(variant)
    gateway = of_kind(resources, "Deployment")["gateway"]
    (container,) = pod_spec(gateway)["containers"]
    drain = int(config_value(resources, gateway, "TIDEWIRE_DRAIN_SECONDS") or 0)
    sleep = prestop_sleep_seconds(container)
    grace = pod_spec(gateway)["terminationGracePeriodSeconds"]
    assert drain >= 1, "TIDEWIRE_DRAIN_SECONDS must reach the gateway"
    assert sleep >= 5, "the gateway needs a preStop sleep so the load balancer stops routing first"
    assert grace > drain + sleep, f"terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {sleep}"
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for name in ("orchestrator", "tool-workers"):
        assert pod_spec(of_kind(resources, "Deployment")[name])["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize("variant", DEPLOYED)
def test_every_deployment_has_a_pdb(variant: str) -> None:
    resources = rendered(variant)
    pdbs = of_kind(resources, "PodDisruptionBudget")
    workloads = list(of_kind(resources, "Deployment").values())
    workloads += [s for s in of_kind(resources, "StatefulSet").values() if s["spec"]["replicas"] > 1]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs.values() if selector_matches(p["spec"]["selector"], labels)]
        assert len(covering) == 1, (
            f"{variant}: {workload['metadata']['name']} is covered by {len(covering)} PDBs"
        )
        spec = covering[0]["spec"]
        assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable"), covering[0]["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_pinned(variant: str) -> None:
    for workload in rendered(variant):
        if workload["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in containers(workload):
            name, tag, digest = kl.split_image(container["image"])
            assert tag or digest, f"{container['image']}: no tag or digest"
            assert tag != "latest", f"{container['image']}: :latest"


def test_overlay_images() -> None:
    def tidewire_images(variant: str) -> set[str]:
        return {c["image"] for d in of_kind(rendered(variant), "Deployment").values() for c in containers(d)}

    assert tidewire_images("dev") == {"tidewire:0.1.0"}
    (prod_image,) = tidewire_images("prod")
    assert prod_image.startswith("registry.example.com/tidewire/tidewire:")


@pytest.mark.parametrize("variant", VARIANTS)
def test_references_resolve(variant: str) -> None:
    resources = rendered(variant)
    cms, secrets = of_kind(resources, "ConfigMap"), of_kind(resources, "Secret")
    external = EXTERNAL_SECRETS.get(variant.split("+")[0].removesuffix("-keda"), set())
    pods = [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")]
    for workload in pods:
        spec = pod_spec(workload)
        for container in containers(workload):
            for env_from in container.get("envFrom") or []:
                if "configMapRef" in env_from:
                    assert env_from["configMapRef"]["name"] in cms
                if "secretRef" in env_from:
                    assert (
                        env_from["secretRef"]["name"] in secrets or env_from["secretRef"]["name"] in external
                    )
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in (
                        secrets[ref["name"]].get("stringData") or secrets[ref["name"]].get("data")
                    )
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in cms
        if spec.get("serviceAccountName"):
            assert spec["serviceAccountName"] in of_kind(resources, "ServiceAccount")
    # Services select pods, HPAs and PDBs point at workloads.
    templates = [w["spec"]["template"]["metadata"]["labels"] for w in pods]
    for svc in of_kind(resources, "Service").values():
        assert any(selector_matches({"matchLabels": svc["spec"]["selector"]}, t) for t in templates), svc[
            "metadata"
        ]
    deployments = of_kind(resources, "Deployment")
    for hpa in of_kind(resources, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for so in of_kind(resources, "ScaledObject").values():
        assert so["spec"]["scaleTargetRef"]["name"] in deployments
    # The generated ConfigMap carries a content hash, so config changes roll the pods.
    (config,) = [name for name in cms if name.startswith("tidewire-config")]
    assert re.fullmatch(r"tidewire-config-[a-z0-9]{10}", config)


def test_config_map_hash_changes_with_content() -> None:
    names = {
        v: next(n for n in of_kind(rendered(v), "ConfigMap") if n.startswith("tidewire-config"))
        for v in ("base", "dev", "prod")
    }
    assert len(set(names.values())) == 3, names


@pytest.mark.parametrize("variant", DEPLOYED)
def test_autoscaling(variant: str) -> None:
    resources = rendered(variant)
    hpas = of_kind(resources, "HorizontalPodAutoscaler")
    gateway_metrics = hpas["gateway"]["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in gateway_metrics)
    if "keda" in variant:
        assert "orchestrator" not in hpas, "KEDA owns the orchestrator HPA: two HPAs would fight"
        (so,) = of_kind(resources, "ScaledObject").values()
        (jetstream,) = [t for t in so["spec"]["triggers"] if t["type"] == "nats-jetstream"]
        meta = jetstream["metadata"]
        host = meta["natsServerMonitoringEndpoint"].split(":")[0]
        assert host.split(".")[:2] == ["nats", NAMESPACE]
        subjects = pytest.importorskip("shared.subjects")
        assert meta["stream"] == subjects.TURNS_STREAM
        assert meta["consumer"] == subjects.TURNS_CONSUMER
        floor = so["spec"]["minReplicaCount"]
    else:
        metrics = hpas["orchestrator"]["spec"]["metrics"]
        (external,) = [m for m in metrics if m["type"] == "External"]
        assert external["external"]["metric"]["name"] == "tidewire_turn_queue_pending"
        assert external["external"]["target"]["type"] == "AverageValue"
        floor = hpas["orchestrator"]["spec"]["minReplicas"]
    # HPA floors keep >= 2 of the request-serving pods so a lost pod never drops all sessions.
    assert hpas["gateway"]["spec"]["minReplicas"] >= 2
    assert floor >= 2


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    (values,) = load_docs(K8S / "prometheus-adapter-values.yaml")
    (rule,) = values["rules"]["external"]
    assert "tidewire_turn_queue_pending" in rule["seriesQuery"]
    assert rule["name"]["as"] == "tidewire_turn_queue_pending"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"


def test_prod_is_bigger_than_dev_and_uses_external_datastores() -> None:
    dev, prod = rendered("dev"), rendered("prod")
    dev_deps, prod_deps = of_kind(dev, "Deployment"), of_kind(prod, "Deployment")

    def cpu_millis(value: str | int) -> float:
        value = str(value)
        return float(value[:-1]) if value.endswith("m") else float(value) * 1000

    for name in WORKLOADS:
        assert prod_deps[name]["spec"]["replicas"] > dev_deps[name]["spec"]["replicas"], name
        dev_req = pod_spec(dev_deps[name])["containers"][0]["resources"]["requests"]
        prod_req = pod_spec(prod_deps[name])["containers"][0]["resources"]["requests"]
        assert cpu_millis(prod_req["cpu"]) > cpu_millis(dev_req["cpu"]), name
    dev_hpa, prod_hpa = of_kind(dev, "HorizontalPodAutoscaler"), of_kind(prod, "HorizontalPodAutoscaler")
    for name in WORKLOADS:
        assert prod_hpa[name]["spec"]["maxReplicas"] >= dev_hpa[name]["spec"]["maxReplicas"]
        assert prod_hpa[name]["spec"]["minReplicas"] <= prod_deps[name]["spec"]["replicas"]
    # dev runs NATS, Postgres, Redis in-cluster; prod runs none of them (Helm NATS, managed DBs).
    assert set(of_kind(dev, "StatefulSet")) == {"nats", "postgres", "redis"}
    assert not of_kind(prod, "StatefulSet")
    # No placeholder secret ships to prod; the Secret there is created out of band.
    assert not of_kind(prod, "Secret")
    for obj in prod:
        assert PLACEHOLDER_ANNOTATION not in (obj["metadata"].get("annotations") or {}), obj["metadata"][
            "name"
        ]
        assert "PLACEHOLDER" not in json.dumps(obj), obj["metadata"]["name"]
    prod_config = next(c for n, c in of_kind(prod, "ConfigMap").items() if n.startswith("tidewire-config"))
    assert urlsplit(prod_config["data"]["TIDEWIRE_NATS_URL"]).hostname == "nats"


def test_placeholder_secrets_are_marked() -> None:
    for variant in ("base", "dev"):
        for secret in of_kind(rendered(variant), "Secret").values():
            assert secret["metadata"]["annotations"][PLACEHOLDER_ANNOTATION] == "true"
            assert all("PLACEHOLDER" in v or v.startswith("redis://") for v in secret["stringData"].values())
    (example,) = load_docs(K8S / "overlays" / "prod" / "secret.example.yaml")
    assert example["metadata"]["annotations"][PLACEHOLDER_ANNOTATION] == "true"
    assert set(example["stringData"]) == {
        "TIDEWIRE_POSTGRES_DSN",
        "TIDEWIRE_REDIS_URL",
        "TIDEWIRE_JWT_SECRET",
    }
    base_secret = of_kind(rendered("base"), "Secret")["tidewire-secrets"]
    assert set(base_secret["stringData"]) == set(example["stringData"])


def test_dev_datastores() -> None:
    dev = rendered("dev")
    sets = of_kind(dev, "StatefulSet")
    # NATS: 3-node JetStream cluster with file storage.
    nats = sets["nats"]
    assert nats["spec"]["replicas"] == 3
    conf = of_kind(dev, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream" in conf and "store_dir: /data" in conf
    assert conf.count("nats-headless:6222") == 3
    assert of_kind(dev, "Service")["nats-headless"]["spec"]["publishNotReadyAddresses"] is True
    # Postgres: synchronous commit; password agrees with the DSN in tidewire-secrets.
    (pg,) = pod_spec(sets["postgres"])["containers"]
    assert "synchronous_commit=on" in pg["args"]
    secrets = of_kind(dev, "Secret")
    dsn = urlsplit(secrets["tidewire-secrets"]["stringData"]["TIDEWIRE_POSTGRES_DSN"])
    assert dsn.hostname == "postgres" and dsn.port == 5432
    assert dsn.password == secrets["postgres-dev"]["stringData"]["POSTGRES_PASSWORD"]
    # Redis: append-only file on.
    (redis,) = pod_spec(sets["redis"])["containers"]
    assert " --appendonly yes " in " " + " ".join(redis["command"]) + " "
    assert urlsplit(secrets["tidewire-secrets"]["stringData"]["TIDEWIRE_REDIS_URL"]).hostname == "redis"


def test_nats_helm_values_for_prod() -> None:
    (values,) = load_docs(K8S / "nats-values.yaml")
    assert values["fullnameOverride"] == "nats"
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
    assert values["config"]["jetstream"]["fileStore"]["enabled"] is True
    assert values["config"]["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert values["podDisruptionBudget"]["enabled"] is True
    assert values["config"]["monitor"]["port"] == 8222
    assert values["container"]["image"]["tag"] != "latest"


# ---------------------------------------------------------------------------------------------
# NetworkPolicy: a small evaluator of the rendered policies


def ingress_allowed(
    policies: list[dict[str, Any]],
    *,
    dst_labels: dict[str, str],
    port: int,
    src_labels: dict[str, str] | None,
    src_namespace_labels: dict[str, str],
) -> bool:
    """Is TCP `port` on a pod with `dst_labels` (namespace tidewire) reachable from the source?

    `src_labels` None means a source outside any pod selector match (another namespace / outside)."""
    same_namespace = src_namespace_labels.get("kubernetes.io/metadata.name") == NAMESPACE
    selecting = [
        p
        for p in policies
        if selector_matches(p["spec"]["podSelector"], dst_labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, None) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    return True
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (
                    selector_matches(ns_sel, src_namespace_labels) if ns_sel is not None else same_namespace
                )
                pod_ok = pod_sel is None or (src_labels is not None and selector_matches(pod_sel, src_labels))
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("variant", ("dev", "prod"))
def test_network_policies(variant: str) -> None:
    resources = rendered(variant)
    policies = list(of_kind(resources, "NetworkPolicy").values())
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), (
        "default deny"
    )
    ns = {"kubernetes.io/metadata.name": NAMESPACE}
    outside = {"kubernetes.io/metadata.name": "ingress-nginx"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    deployments = of_kind(resources, "Deployment")
    labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    nats_labels = {
        "app.kubernetes.io/name": "nats",
        "app.kubernetes.io/component": "nats",
    }  # dev set and Helm chart
    stores = [(nats_labels, 4222)]
    if variant == "dev":
        sts = of_kind(resources, "StatefulSet")
        assert sts["nats"]["spec"]["template"]["metadata"]["labels"].items() >= nats_labels.items()
        stores += [
            (sts["postgres"]["spec"]["template"]["metadata"]["labels"], 5432),
            (sts["redis"]["spec"]["template"]["metadata"]["labels"], 6379),
        ]

    def allowed(dst: dict[str, str], port: int, src: dict[str, str] | None, src_ns: dict[str, str]) -> bool:
        return ingress_allowed(
            policies, dst_labels=dst, port=port, src_labels=src, src_namespace_labels=src_ns
        )

    # Only the gateway is reachable from outside the namespace.
    assert allowed(labels["gateway"], 8080, None, outside)
    for name in ("orchestrator", "tool-workers"):
        assert not allowed(labels[name], HEALTH_PORTS[name], None, outside), name
        assert allowed(labels[name], HEALTH_PORTS[name], None, monitoring), f"Prometheus scrapes {name}"
    for store, port in stores:
        assert not allowed(store, port, None, outside), f"{store} reachable from outside"
        assert not allowed(store, port, {"app": "random"}, ns), f"{store} reachable from a random pod"
        # Every tidewire workload reaches NATS, Postgres and Redis.
        for name in WORKLOADS:
            assert allowed(store, port, labels[name], ns), f"{name} cannot reach {store}:{port}"
    # NATS servers reach each other (cluster routes); KEDA reads the monitoring port.
    assert allowed(nats_labels, 6222, nats_labels, ns)
    assert allowed(nats_labels, 8222, None, {"kubernetes.io/metadata.name": "keda"})
    # Rules open to any source only ever select the gateway.
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            if not rule.get("from"):
                assert policy["spec"]["podSelector"] == {
                    "matchLabels": {
                        "app.kubernetes.io/name": "tidewire",
                        "app.kubernetes.io/component": "gateway",
                    }
                }, policy["metadata"]


@pytest.mark.parametrize("variant", ("dev", "prod"))
def test_ingress_is_websocket_friendly_without_stickiness(variant: str) -> None:
    resources = rendered(variant)
    (ingress,) = of_kind(resources, "Ingress").values()
    annotations = ingress["metadata"].get("annotations") or {}
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    sticky = [
        a
        for a in annotations
        if a.startswith("nginx.ingress.kubernetes.io/")
        and ("affinity" in a or "session-cookie" in a or "upstream-hash-by" in a)
    ]
    assert not sticky, f"no stickiness needed: {sticky}"
    services = of_kind(resources, "Service")
    assert services["gateway"]["spec"].get("sessionAffinity", "None") == "None"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            svc_ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            assert backend["port"]["name"] in svc_ports
    assert bool(ingress["spec"].get("tls")) is (variant == "prod")


# ---------------------------------------------------------------------------------------------
# compose.yaml


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_validates_against_compose_spec() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator_cls = jsonschema.Draft201909Validator
    validator_cls.check_schema(schema)
    errors = list(validator_cls(schema).iter_errors(compose()))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    # and the schema really is strict
    broken = copy.deepcopy(compose())
    broken["services"]["gateway"]["helthcheck"] = {}
    assert list(validator_cls(schema).iter_errors(broken))


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"nats", "postgres", "redis", "gateway", "orchestrator", "tool-workers"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name}: healthcheck"
        image = svc["image"]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else None
        assert tag and tag != "latest", f"{name}: {image}"
    nats = services["nats"]
    assert nats["image"] == "nats:2.10-alpine"
    command = nats["command"]
    assert "-js" in command and command[command.index("-sd") + 1] == "/data"
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert services["postgres"]["image"] == "postgres:16"
    assert "synchronous_commit=on" in services["postgres"]["command"]
    assert services["redis"]["image"] == "redis:7"
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert services["orchestrator"].get("deploy", {}).get("replicas", 1) >= 2
    for name in WORKLOADS:
        svc = services[name]
        assert svc["command"] == ["python", "-m", MODULES[name]]
        assert svc["build"]["dockerfile"] == "Dockerfile"
        deps = svc["depends_on"]
        assert {d: deps[d]["condition"] for d in ("nats", "postgres", "redis")} == dict.fromkeys(
            ("nats", "postgres", "redis"), "service_healthy"
        )
        env = compose_env(svc)
        for var in (
            "TIDEWIRE_NATS_URL",
            "TIDEWIRE_POSTGRES_DSN",
            "TIDEWIRE_REDIS_URL",
            "TIDEWIRE_JWT_SECRET",
            "TIDEWIRE_LOG_LEVEL",
        ):
            assert env.get(var), f"{name}: {var}"
        assert env["TIDEWIRE_HOST"] == "0.0.0.0", name
        port_var = "TIDEWIRE_HTTP_PORT" if name == "gateway" else "TIDEWIRE_HEALTH_PORT"
        assert env[port_var] == str(HEALTH_PORTS[name])
        assert f":{HEALTH_PORTS[name]}/readyz" in " ".join(svc["healthcheck"]["test"])
    gateway = services["gateway"]
    drain = int(compose_env(gateway)["TIDEWIRE_DRAIN_SECONDS"])
    assert int(gateway["stop_grace_period"].rstrip("s")) > drain
    assert gateway["ports"] == ["8080:8080"]
    # Same drain as Kubernetes.
    base_gateway = of_kind(rendered("base"), "Deployment")["gateway"]
    assert config_value(rendered("base"), base_gateway, "TIDEWIRE_DRAIN_SECONDS") == str(drain)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"<<'?(\w+)'?\n.*?\n\1\n", "<<heredoc\n", text, flags=re.S)  # drop heredoc bodies
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for word, rest in instructions
        if word == "ARG" and "=" in rest
    }
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    users = [rest for word, rest in final_stage if word == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "runtime stage runs as uid 10001"
    assert any(w == "COPY" and "--from=build" in r and "/opt/venv" in r for w, r in final_stage)
    (cmd,) = [json.loads(rest) for word, rest in final_stage if word == "CMD"]
    assert cmd == ["python", "-m", "gateway"]
    assert not any(w == "HEALTHCHECK" for w, _ in instructions)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests", "k8s"} <= ignored


# ---------------------------------------------------------------------------------------------
# kustomize_lite itself (it stands in for kustomize, so its semantics are tested too)


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(data) if isinstance(data, list) else yaml.safe_dump(data))


def test_kustomize_lite_hash_matches_kustomize() -> None:
    # Vectors from kustomize's hasher tests.
    assert kl.configmap_hash({"metadata": {"name": ""}, "data": {"one": ""}}) == "9g67k2htb6"
    assert (
        kl.configmap_hash({"metadata": {"name": ""}, "data": {"two": "2", "one": "", "three": "3"}})
        == "f5h7t85m9b"
    )


def test_kustomize_lite_strategic_merge() -> None:
    base = {
        "spec": {
            "replicas": 1,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "a",
                            "image": "x",
                            "env": [{"name": "K", "value": "1"}],
                            "resources": {"limits": {"cpu": "1"}},
                        },
                        {"name": "b", "image": "y"},
                    ]
                }
            },
        }
    }
    patch = {
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "a",
                            "env": [{"name": "J", "value": "2"}],
                            "resources": {"requests": {"cpu": "1"}},
                        },
                        {"name": "b", "$patch": "delete"},
                    ]
                }
            },
        }
    }
    out = kl.strategic_merge(base, patch)
    assert out["spec"]["replicas"] == 3
    (a,) = out["spec"]["template"]["spec"]["containers"]
    assert a["image"] == "x" and [e["name"] for e in a["env"]] == ["K", "J"]
    assert a["resources"] == {"limits": {"cpu": "1"}, "requests": {"cpu": "1"}}
    assert kl.strategic_merge({"a": 1, "b": 2}, {"b": None}) == {"a": 1}
    assert kl.split_image("reg:5000/a/b:1.2@sha256:ff") == ("reg:5000/a/b", "1.2", "sha256:ff")
    assert kl._retag("tidewire", {"name": "tidewire", "newName": "r/t", "newTag": "2"}) == "r/t:2"


def test_kustomize_lite_refuses_what_kustomize_refuses(tmp_path: Path) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}
    _write(tmp_path / "outside.yaml", cm)
    _write(tmp_path / "k" / "kustomization.yaml", {"resources": ["../outside.yaml"]})
    with pytest.raises(kl.KustomizeError, match="not in or below"):
        kl.build(tmp_path / "k")
    _write(tmp_path / "u" / "kustomization.yaml", {"namePrefix": "x-"})
    with pytest.raises(kl.KustomizeError, match="unsupported"):
        kl.build(tmp_path / "u")
    _write(tmp_path / "d" / "cm.yaml", [cm, cm])
    _write(tmp_path / "d" / "kustomization.yaml", {"resources": ["cm.yaml"]})
    with pytest.raises(kl.KustomizeError, match="already registered"):
        kl.build(tmp_path / "d")
    _write(tmp_path / "p" / "cm.yaml", cm)
    _write(tmp_path / "p" / "patch.yaml", {**cm, "metadata": {"name": "nope"}})
    _write(
        tmp_path / "p" / "kustomization.yaml", {"resources": ["cm.yaml"], "patches": [{"path": "patch.yaml"}]}
    )
    with pytest.raises(kl.KustomizeError, match="no resource matches"):
        kl.build(tmp_path / "p")
