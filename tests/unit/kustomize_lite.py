"""A minimal, offline stand-in for `kustomize build`, for exactly the features k8s/ uses.

kustomize is a Go binary that is not published on PyPI, so the unit tests render the overlays
with this module instead. It implements:

* `resources:` — YAML files (multi-document) and directories holding a Kustomization, built
  recursively; like kustomize's default load restrictor, a *file* must lie in or below the
  kustomization's own directory (directories may be anywhere);
* `components:` — directories holding a `kind: Component` (their resources, generators and
  patches are applied to the including kustomization's resources);
* `namespace:` — set on every namespaced resource;
* `patches:` — strategic-merge patches only (`path:` or inline `patch:`, optional `target:`),
  multi-document, with the `$patch: delete` / `$patch: replace` directives, `null` to delete a
  key, and merge keys for the list fields k8s/ patches (containers by name, env by name, ...);
* `configMapGenerator:` — `literals:` only, `behavior: create|merge|replace`, with kustomize's
  content-hash name suffix and the suffixed name propagated to pod-template references;
* `images:` — `name` / `newName` / `newTag` / `digest`.

Anything else in a kustomization (namePrefix, labels, JSON 6902 patches, replicas, helmCharts,
secretGenerator, vars/replacements, ...) raises `KustomizeError` instead of being silently
ignored, so the tests fail loudly if k8s/ starts using a feature this renderer does not model.
It is a test aid, not a kustomize replacement: output order and some edge cases can differ.

Command line: `python tests/unit/kustomize_lite.py k8s/overlays/dev` prints the rendered YAML.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "patches",
    "configMapGenerator",
    "images",
}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"kind", "name", "namespace", "group", "version"}
GENERATOR_FIELDS = {"name", "namespace", "behavior", "literals"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}

# Cluster-scoped kinds never get a namespace.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "StorageClass",
    "PersistentVolume",
    "PriorityClass",
    "IngressClass",
    "APIService",
    "RuntimeClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ClusterIssuer",
}

# Strategic-merge keys of the list fields (from the Kubernetes OpenAPI `x-kubernetes-patch-merge-key`).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
    "hostAliases": "ip",
}

# kustomize's "legacy" output order (kinds not listed keep their relative order in between).
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]

# Internal marker on generated ConfigMaps that still need their hash suffix.
_NEEDS_HASH = "__kustomize_lite_needs_hash__"


class KustomizeError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# loading


def find_kustomization(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _within(root: Path, path: Path) -> bool:
    root_real, path_real = os.path.realpath(root), os.path.realpath(path)
    return path_real == root_real or path_real.startswith(root_real + os.sep)


def _resolve_file(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if not _within(root, path):
        raise KustomizeError(f"security; file '{path}' is not in or below '{root.resolve()}'")
    if not path.is_file():
        raise KustomizeError(f"{root}: file '{relative}' does not exist")
    return path


def _check_fields(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise KustomizeError(
            f"{where}: unsupported field(s) {sorted(unknown)} (kustomize_lite models only {sorted(allowed)})"
        )


def _resource_id(res: Resource) -> tuple[str, str, str, str]:
    meta = res.get("metadata") or {}
    group = str(res.get("apiVersion", "")).rpartition("/")[0]
    return (group, str(res.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")))


def _id_str(res: Resource) -> str:
    group, kind, ns, name = _resource_id(res)
    return f"{kind}{'.' + group if group else ''}/{name}{' -n ' + ns if ns else ''}"


# ---------------------------------------------------------------------------------------------
# building


class _Builder:
    def __init__(self, extra_components: list[Path] | None = None) -> None:
        self._stack: list[Path] = []
        self._extra_components = [Path(c).resolve() for c in extra_components or []]

    def build_dir(self, directory: Path, expect_kind: str = "Kustomization") -> list[Resource]:
        directory = directory.resolve()
        if directory in self._stack:
            raise KustomizeError(f"cycle: {' -> '.join(map(str, self._stack + [directory]))}")
        kfile = find_kustomization(directory)
        if kfile is None:
            raise KustomizeError(f"{directory}: no kustomization file")
        docs = load_yaml_documents(kfile)
        if len(docs) != 1 or not isinstance(docs[0], dict):
            raise KustomizeError(f"{kfile}: must hold exactly one mapping")
        k = docs[0]
        _check_fields(str(kfile), k, KUSTOMIZATION_FIELDS)
        kind = k.get("kind", "Kustomization")
        if kind != expect_kind:
            raise KustomizeError(f"{kfile}: kind {kind!r} used where a {expect_kind} is expected")
        expected_api = (
            "kustomize.config.k8s.io/v1alpha1" if kind == "Component" else "kustomize.config.k8s.io/v1beta1"
        )
        if k.get("apiVersion", expected_api) != expected_api:
            raise KustomizeError(f"{kfile}: apiVersion must be {expected_api}")
        self._stack.append(directory)
        try:
            resources: list[Resource] = []
            self._accumulate(directory, k, resources)
            components = [(directory / comp).resolve() for comp in k.get("components") or []]
            if len(self._stack) == 1:
                components += self._extra_components
            for comp_dir in components:
                if not comp_dir.is_dir():
                    raise KustomizeError(f"{kfile}: component '{comp_dir}' is not a directory")
                self._apply_component(comp_dir, resources)
            self._transform(directory, k, resources)
            return resources
        finally:
            self._stack.pop()

    def _accumulate(self, directory: Path, k: dict[str, Any], resources: list[Resource]) -> None:
        for entry in k.get("resources") or []:
            target = (directory / entry).resolve()
            if target.is_dir():
                new = self.build_dir(target)
            else:
                path = _resolve_file(directory, entry)
                new = []
                for doc in load_yaml_documents(path):
                    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                        raise KustomizeError(f"{path}: every document must be a Kubernetes object")
                    if doc["kind"] in ("Kustomization", "Component"):
                        raise KustomizeError(f"{path}: a {doc['kind']} cannot be listed as a resource file")
                    new.append(copy.deepcopy(doc))
            for res in new:
                _add_unique(resources, res)
        self._generate(directory, k, resources)

    def _apply_component(self, comp_dir: Path, resources: list[Resource]) -> None:
        if comp_dir in self._stack:
            raise KustomizeError(f"cycle through component {comp_dir}")
        kfile = find_kustomization(comp_dir)
        if kfile is None:
            raise KustomizeError(f"{comp_dir}: no kustomization file")
        (k,) = load_yaml_documents(kfile)
        _check_fields(str(kfile), k, KUSTOMIZATION_FIELDS)
        if k.get("kind") != "Component" or k.get("apiVersion") != "kustomize.config.k8s.io/v1alpha1":
            raise KustomizeError(
                f"{kfile}: components must be kind Component, apiVersion kustomize.config.k8s.io/v1alpha1"
            )
        self._stack.append(comp_dir)
        try:
            self._accumulate(comp_dir, k, resources)
            for comp in k.get("components") or []:
                self._apply_component((comp_dir / comp).resolve(), resources)
            self._transform(comp_dir, k, resources)
        finally:
            self._stack.pop()

    # -- generators -------------------------------------------------------------------------

    def _generate(self, directory: Path, k: dict[str, Any], resources: list[Resource]) -> None:
        for gen in k.get("configMapGenerator") or []:
            _check_fields(f"{directory}: configMapGenerator", gen, GENERATOR_FIELDS)
            name = gen["name"]
            data: dict[str, str] = {}
            for literal in gen.get("literals") or []:
                key, sep, value = str(literal).partition("=")
                if not sep or not key:
                    raise KustomizeError(f"{directory}: configMapGenerator {name}: bad literal {literal!r}")
                data[key] = value
            behavior = gen.get("behavior", "create")
            existing = [
                r for r in resources if r.get("kind") == "ConfigMap" and r["metadata"]["name"] == name
            ]
            if behavior == "create":
                if existing:
                    raise KustomizeError(
                        f"{directory}: ConfigMap {name} already exists (use behavior: merge)"
                    )
                cm: Resource = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": name},
                    "data": data,
                }
                if gen.get("namespace"):
                    cm["metadata"]["namespace"] = gen["namespace"]
                cm[_NEEDS_HASH] = True
                resources.append(cm)
            elif behavior in ("merge", "replace"):
                if len(existing) != 1:
                    raise KustomizeError(
                        f"{directory}: ConfigMap {name} to {behavior} not found exactly once"
                    )
                target = existing[0]
                if behavior == "merge":
                    target.setdefault("data", {}).update(data)
                else:
                    target["data"] = data
            else:
                raise KustomizeError(f"{directory}: configMapGenerator {name}: unknown behavior {behavior!r}")

    # -- transformers -----------------------------------------------------------------------

    def _transform(self, directory: Path, k: dict[str, Any], resources: list[Resource]) -> None:
        for entry in k.get("patches") or []:
            _check_fields(f"{directory}: patches", entry, PATCH_FIELDS)
            if ("path" in entry) == ("patch" in entry):
                raise KustomizeError(f"{directory}: a patch needs exactly one of path/patch")
            if "path" in entry:
                docs = load_yaml_documents(_resolve_file(directory, entry["path"]))
                origin = entry["path"]
            else:
                docs = [d for d in yaml.safe_load_all(entry["patch"]) if d is not None]
                origin = "inline patch"
            target = entry.get("target")
            if target is not None:
                _check_fields(f"{directory}: patch target", target, TARGET_FIELDS)
            for doc in docs:
                if not isinstance(doc, dict):
                    raise KustomizeError(f"{directory}: {origin}: only strategic-merge patches are supported")
                _apply_patch(resources, doc, target, f"{directory}/{origin}")
        namespace = k.get("namespace")
        if namespace:
            for res in resources:
                if res.get("kind") not in CLUSTER_SCOPED:
                    res.setdefault("metadata", {})["namespace"] = namespace
        for image in k.get("images") or []:
            _check_fields(f"{directory}: images", image, IMAGE_FIELDS)
            for res in resources:
                for container in _containers(res):
                    container["image"] = _retag(container.get("image", ""), image)


def _add_unique(resources: list[Resource], res: Resource) -> None:
    rid = _resource_id(res)
    for other in resources:
        if _resource_id(other) == rid:
            raise KustomizeError(f"may not add resource with an already registered id: {_id_str(res)}")
    resources.append(res)


def _matches(res: Resource, patch: Resource, target: dict[str, Any] | None) -> bool:
    meta = res.get("metadata") or {}
    if target is not None:
        group, _, version = res.get("apiVersion", "").rpartition("/")
        checks = {
            "kind": res.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "group": group,
            "version": version,
        }
        return all(checks[key] == value for key, value in target.items())
    pmeta = patch.get("metadata") or {}
    if res.get("kind") != patch.get("kind") or meta.get("name") != pmeta.get("name"):
        return False
    if pmeta.get("namespace") and meta.get("namespace") and pmeta["namespace"] != meta["namespace"]:
        return False
    return _resource_id(res)[0] == _resource_id(patch)[0]


def _apply_patch(
    resources: list[Resource], patch: Resource, target: dict[str, Any] | None, origin: str
) -> None:
    hits = [i for i, res in enumerate(resources) if _matches(res, patch, target)]
    if not hits:
        raise KustomizeError(f"{origin}: no resource matches patch for {_id_str(patch)}")
    if target is None and len(hits) > 1:
        raise KustomizeError(f"{origin}: patch for {_id_str(patch)} matches {len(hits)} resources")
    if patch.get("$patch") == "delete":
        for i in reversed(hits):
            del resources[i]
        return
    body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
    if target is not None:
        body.get("metadata", {}).pop("name", None)
    for i in hits:
        resources[i] = strategic_merge(resources[i], body)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` into `base` (returns a new object)."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {key: copy.deepcopy(value) for key, value in patch.items() if key != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        if not isinstance(base, dict):
            base = {}
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None or _is_delete(value):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strategic_merge(None, value, key)
        return merged
    if isinstance(patch, list):
        merge_key = MERGE_KEYS.get(field)
        if field == "ports" and patch and all(isinstance(p, dict) for p in patch):
            merge_key = "containerPort" if "containerPort" in patch[0] else "port"
        if merge_key is None or not isinstance(base, list):
            return [strategic_merge(None, item) for item in patch if not _is_delete(item)]
        merged_list = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                raise KustomizeError(f"list {field!r}: patch item without merge key {merge_key!r}: {item!r}")
            index = next(
                (
                    i
                    for i, cur in enumerate(merged_list)
                    if isinstance(cur, dict) and cur.get(merge_key) == item[merge_key]
                ),
                None,
            )
            if _is_delete(item):
                if index is not None:
                    del merged_list[index]
            elif index is None:
                merged_list.append(strategic_merge(None, item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def _is_delete(item: Any) -> bool:
    return isinstance(item, dict) and item.get("$patch") == "delete"


def _pod_specs(res: Resource) -> Iterator[dict[str, Any]]:
    spec = res.get("spec") or {}
    if res.get("kind") == "Pod":
        yield spec
    template = spec.get("template") or {}
    if isinstance(template.get("spec"), dict):
        yield template["spec"]
    job_template = (spec.get("jobTemplate") or {}).get("spec") or {}
    job_pod = (job_template.get("template") or {}).get("spec")
    if isinstance(job_pod, dict):
        yield job_pod


def _containers(res: Resource) -> Iterator[dict[str, Any]]:
    for pod in _pod_specs(res):
        for field in ("initContainers", "containers", "ephemeralContainers"):
            yield from pod.get(field) or []


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/a/b:tag@sha256:x' -> ('reg:5000/a/b', 'tag', 'sha256:x')."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _retag(image: str, rule: dict[str, Any]) -> str:
    name, tag, digest = split_image(image)
    if name != rule["name"]:
        return image
    name = str(rule.get("newName", name))
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    if "newTag" in rule:
        return f"{name}:{rule['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# ---------------------------------------------------------------------------------------------
# hash suffix (same algorithm as sigs.k8s.io/kustomize/api/hasher)


def configmap_hash(cm: Resource) -> str:
    payload: dict[str, Any] = {
        "kind": "ConfigMap",
        "name": cm["metadata"]["name"],
        "data": cm.get("data") or "",
    }
    if cm.get("binaryData"):
        payload["binaryData"] = cm["binaryData"]
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these three characters.
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _apply_hash_suffixes(resources: list[Resource]) -> None:
    renames: dict[tuple[str, str], str] = {}
    for res in resources:
        if res.pop(_NEEDS_HASH, False):
            meta = res["metadata"]
            new_name = f"{meta['name']}-{configmap_hash(res)}"
            renames[(meta.get("namespace", ""), meta["name"])] = new_name
            meta["name"] = new_name
    if not renames:
        return
    for res in resources:
        ns = (res.get("metadata") or {}).get("namespace", "")

        def rename(ref: dict[str, Any] | None, ns: str = ns) -> None:
            if isinstance(ref, dict) and (ns, ref.get("name")) in renames:
                ref["name"] = renames[(ns, ref["name"])]

        for pod in _pod_specs(res):
            for volume in pod.get("volumes") or []:
                rename(volume.get("configMap"))
                for source in (volume.get("projected") or {}).get("sources") or []:
                    rename(source.get("configMap"))
            for field in ("initContainers", "containers", "ephemeralContainers"):
                for container in pod.get(field) or []:
                    for env_from in container.get("envFrom") or []:
                        rename(env_from.get("configMapRef"))
                    for env in container.get("env") or []:
                        rename((env.get("valueFrom") or {}).get("configMapKeyRef"))


def _order(resources: list[Resource]) -> list[Resource]:
    def rank(item: tuple[int, Resource]) -> tuple[int, int, int]:
        index, res = item
        kind = res.get("kind", "")
        if kind in ORDER_FIRST:
            return (0, ORDER_FIRST.index(kind), index)
        if kind in ORDER_LAST:
            return (2, ORDER_LAST.index(kind), index)
        return (1, 0, index)

    return [res for _, res in sorted(enumerate(resources), key=rank)]


def build(
    path: str | os.PathLike[str], extra_components: list[str | os.PathLike[str]] | None = None
) -> list[Resource]:
    """Renders the kustomization in directory `path`, like `kustomize build path`.

    `extra_components` are appended to that kustomization's own `components:` (as if listed there)."""
    resources = _Builder([Path(c) for c in extra_components or []]).build_dir(Path(path))
    _apply_hash_suffixes(resources)
    return _order(resources)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        resources = build(argv[1])
    except KustomizeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(resources, sort_keys=False, default_flow_style=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
