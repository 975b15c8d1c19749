"""Validate rendered Kustomize overlays: Kubernetes schemas (strict) and the project's policy.

Run by check.sh with the tools venv (.tools/k8s/venv: PyYAML, kubernetes-validate), never with
the project's venv:

    check_manifests.py --k8s-dir DIR --k8s-version 1.31 [--k8s-version ...] NAME=RENDERED.yaml ...

Each RENDERED.yaml is one overlay's `kustomize build` output, rendered through a wrapper
kustomization in the same folder that adds origin annotations (`config.kubernetes.io/origin`),
so that a finding names the source file. Prints one `FAIL` line per finding and exits 1 if there
is any, else prints one `ok` line per overlay and exits 0.

Schemas: the strict JSON schemas that kubernetes-validate ships (unknown fields are errors, as
with `kubectl --validate=strict`); a kind without a schema is an error too. Policy: what the
schemas cannot say (hardened pods, probes that hit a declared port, references that resolve,
settings the services need) and the deployment rules of DESIGN.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

ORIGIN = "config.kubernetes.io/origin"

#: kind -> path from the object to its pod spec
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
POD_LABEL_PATHS: dict[str, tuple[str, ...]] = {
    kind: (*path[:-1], "metadata", "labels")
    for kind, path in POD_SPEC_PATHS.items()
    if kind != "Pod"
}
POD_LABEL_PATHS["Pod"] = ("metadata", "labels")

#: SIGTERM drains and commits; a checkpoint happens at most every few seconds
MIN_TERMINATION_GRACE_S = 30
#: env names that hold credentials: only ever from a Secret
SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET|USER_INFO|API_KEY|PRIVATE_KEY)")
#: settings every service needs (CONTRACT.md: required, no default)
REQUIRED_SETTINGS = ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL")
#: services whose single writer (the producer's cursor) allows exactly one pod, no overlap
SINGLE_WRITER = {"producer"}
#: services whose replicas each hold full tables: voluntary disruptions one at a time
NEEDS_PDB = {"enricher"}
NAME_LABEL = "app.kubernetes.io/name"


# --- helpers ---------------------------------------------------------------------------------


def dig(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]..., or None where a step is missing."""
    for step in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(step)
    return obj


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)


def quantity(value: Any) -> Fraction | None:
    """A Kubernetes resource quantity ("500m", "1Gi", 2) as a number; None if unparseable."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        return None
    return Fraction(match.group(1)) * _SUFFIX[match.group(2) or ""]


@dataclass
class Obj:
    """One rendered object and where it came from."""

    overlay: str
    body: dict[str, Any]
    origin: str

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str(dig(self.body, "metadata", "name"))

    def ref(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        return f"{self.overlay}: {self.kind}/{self.name}{where}"


@dataclass
class Report:
    """Findings, in the order found."""

    failures: list[str] = field(default_factory=list)

    def fail(self, obj: Obj, message: str) -> None:
        self.failures.append(f"FAIL {obj.ref()}: {message}")


def origin_of(body: dict[str, Any], wrapper_dir: str, k8s_dir: str) -> str:
    """The source file named by kustomize's origin annotation, relative to the k8s dir."""
    annotations = dig(body, "metadata", "annotations") or {}
    raw = annotations.pop(ORIGIN, None)
    if not annotations and "annotations" in body.get("metadata", {}):
        del body["metadata"]["annotations"]
    if not raw:
        return ""
    origin = yaml.safe_load(raw) or {}
    path = origin.get("path") or origin.get("configuredIn")
    if not path:
        return ""
    rel = os.path.relpath(os.path.normpath(os.path.join(wrapper_dir, path)), k8s_dir)
    return rel if "path" in origin else f"generated by {rel}"


# --- schemas ---------------------------------------------------------------------------------


class Schemas:
    """The strict Kubernetes JSON schemas shipped in the kubernetes-validate package."""

    def __init__(self) -> None:
        self._root = resources.files("kubernetes_validate") / "kubernetes-json-schema"

    def _dir(self, version: str) -> Any:
        major_minor = ".".join(version.lstrip("v").split(".")[:2])
        folder = self._root / f"v{major_minor}.0-local-strict"
        if not folder.is_dir():
            known = sorted(p.name for p in self._root.iterdir() if p.name.endswith("-local-strict"))
            raise SystemExit(f"error: no schemas for Kubernetes {version}; the package has {known}")
        return folder

    @functools.cache  # noqa: B019 - one instance per run
    def _registry(self, version: str) -> Registry:
        definitions = json.loads((self._dir(version) / "_definitions.json").read_text())
        return Resource.from_contents(definitions) @ Registry()

    @functools.cache  # noqa: B019 - one instance per run
    def validator(self, version: str, kind: str, api_version: str) -> Any:
        """A validator for one kind, or None when the package has no schema for it."""
        # apps/v1 -> apps-v1, v1 -> v1, rbac.authorization.k8s.io/v1 -> rbac-v1
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        path = self._dir(version) / f"{kind.lower()}-{api}.json"
        if not path.is_file():
            return None
        schema = json.loads(path.read_text())
        registry = Resource.from_contents(schema) @ self._registry(version)
        return jsonschema.Draft202012Validator(schema, registry=registry)


def check_schema(obj: Obj, schemas: Schemas, versions: list[str], report: Report) -> None:
    kind, api_version = obj.body.get("kind"), obj.body.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        report.fail(obj, "no kind or apiVersion")
        return
    for version in versions:
        validator = schemas.validator(version, kind, api_version)
        if validator is None:
            report.fail(obj, f"no Kubernetes {version} schema for {api_version} {kind}")
            continue
        errors = sorted(validator.iter_errors(obj.body), key=lambda e: list(map(str, e.path)))
        for error in errors[:10]:
            where = ".".join(str(p) for p in error.absolute_path) or "(object)"
            message = error.message if len(error.message) < 300 else error.message[:300] + "..."
            report.fail(obj, f"schema (Kubernetes {version}): {where}: {message}")


# --- policy ----------------------------------------------------------------------------------


@dataclass
class EnvValue:
    """Where one environment variable of a container comes from."""

    source: str  # "value", "configmap", "secret", "other"
    value: str | None = None
    ref: str = ""


def resolve_env(
    obj: Obj, container: dict[str, Any], configmaps: dict[str, dict[str, Any]], report: Report
) -> dict[str, EnvValue]:
    """The container's environment as Kubernetes builds it: envFrom in order, then env."""
    env: dict[str, EnvValue] = {}
    cname = container.get("name")
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            name = source["configMapRef"].get("name")
            data = configmaps.get(name)
            if data is None:
                if not source["configMapRef"].get("optional"):
                    report.fail(
                        obj,
                        f"container {cname}: envFrom ConfigMap {name!r} is not "
                        "in the rendered output",
                    )
                continue
            for key, value in data.items():
                env[prefix + key] = EnvValue("configmap", str(value), f"ConfigMap {name}")
        elif "secretRef" in source:
            env[f"<all of Secret {source['secretRef'].get('name')}>"] = EnvValue("secret")
    for var in container.get("env") or []:
        name = var.get("name")
        if "value" in var:
            env[name] = EnvValue("value", str(var["value"]), "env")
            continue
        ref = var.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            secret = ref["secretKeyRef"]
            env[name] = EnvValue("secret", None, f"Secret {secret.get('name')}/{secret.get('key')}")
        elif "configMapKeyRef" in ref:
            cm = ref["configMapKeyRef"]
            data = configmaps.get(cm.get("name"))
            if data is None or cm.get("key") not in data:
                if not cm.get("optional"):
                    report.fail(
                        obj,
                        f"container {cname}: env {name} refers to ConfigMap "
                        f"{cm.get('name')!r} key {cm.get('key')!r}, which is not rendered",
                    )
                continue
            env[name] = EnvValue("configmap", str(data[cm["key"]]), f"ConfigMap {cm.get('name')}")
        else:
            env[name] = EnvValue("other", None, "valueFrom")
    return env


def effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field, the container's overriding the pod's."""
    own = dig(container, "securityContext", key)
    return own if own is not None else dig(pod, "securityContext", key)


def under(path: str, mount: str) -> bool:
    path, mount = os.path.normpath(path), os.path.normpath(mount)
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def check_container(
    obj: Obj,
    pod: dict[str, Any],
    container: dict[str, Any],
    is_init: bool,
    configmaps: dict[str, dict[str, Any]],
    report: Report,
) -> dict[str, EnvValue]:
    cname = container.get("name")
    prefix = f"{'init ' if is_init else ''}container {cname}"

    # resources: requests and limits for cpu and memory, requests within limits
    res = container.get("resources") or {}
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if dig(res, kind, resource) is None:
                report.fail(obj, f"{prefix}: resources.{kind}.{resource} is not set")
    for resource, request in (res.get("requests") or {}).items():
        limit = dig(res, "limits", resource)
        req_q, lim_q = quantity(request), quantity(limit) if limit is not None else None
        if req_q is None or (limit is not None and lim_q is None):
            report.fail(obj, f"{prefix}: resources for {resource} are not valid quantities")
        elif lim_q is not None and req_q > lim_q:
            report.fail(obj, f"{prefix}: {resource} request {request} exceeds its limit {limit}")

    # hardened: non-root with a numeric uid, read-only root, no privilege, no capability
    if effective(pod, container, "runAsNonRoot") is not True:
        report.fail(obj, f"{prefix}: securityContext.runAsNonRoot is not true")
    uid = effective(pod, container, "runAsUser")
    if not isinstance(uid, int) or uid == 0:
        report.fail(obj, f"{prefix}: securityContext.runAsUser is not a non-zero uid")
    sc = container.get("securityContext") or {}
    if sc.get("readOnlyRootFilesystem") is not True:
        report.fail(obj, f"{prefix}: securityContext.readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        report.fail(obj, f"{prefix}: securityContext.allowPrivilegeEscalation is not false")
    if sc.get("privileged") is True:
        report.fail(obj, f"{prefix}: securityContext.privileged is true")
    if "ALL" not in (dig(sc, "capabilities", "drop") or []):
        report.fail(obj, f"{prefix}: securityContext.capabilities.drop does not include ALL")
    if dig(sc, "capabilities", "add"):
        report.fail(obj, f"{prefix}: securityContext.capabilities.add is not empty")
    seccomp = effective(pod, container, "seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        report.fail(obj, f"{prefix}: seccompProfile.type is not RuntimeDefault (or Localhost)")

    # image: a pinned tag or digest
    image = str(container.get("image", ""))
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        report.fail(obj, f"{prefix}: image {image!r} has no tag (or :latest)")

    # probes: liveness and readiness on every long-running container, on a declared port
    ports = container.get("ports") or []
    names = {p.get("name"): p.get("containerPort") for p in ports if p.get("name")}
    numbers = {p.get("containerPort") for p in ports}
    if not is_init:
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in container:
                report.fail(obj, f"{prefix}: no {probe}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe) or {}
        handler = spec.get("httpGet") or spec.get("tcpSocket") or spec.get("grpc")
        port = (handler or {}).get("port")
        if port is None:
            continue
        if isinstance(port, str) and port not in names:
            report.fail(obj, f"{prefix}: {probe} uses port {port!r}, not a declared port name")
        elif isinstance(port, int) and port not in numbers:
            report.fail(obj, f"{prefix}: {probe} uses port {port}, not a declared containerPort")

    # environment: resolvable, and credentials only from Secrets
    env = resolve_env(obj, container, configmaps, report)
    for name, value in env.items():
        if SECRET_NAME.search(name) and value.source not in ("secret",):
            report.fail(
                obj, f"{prefix}: {name} is a credential but comes from {value.ref}, not a Secret"
            )

    # the metrics server (probes) listens on METRICS_PORT: it must be the declared port
    metrics = env.get("METRICS_PORT")
    if metrics is not None and "metrics" in names and str(metrics.value) != str(names["metrics"]):
        report.fail(
            obj,
            f"{prefix}: METRICS_PORT={metrics.value} ({metrics.ref}) but the "
            f"port named metrics is {names['metrics']}",
        )

    # a read-only root needs writable volumes for /tmp and every RocksDB/state directory
    mounts = [m for m in container.get("volumeMounts") or [] if not m.get("readOnly")]
    if sc.get("readOnlyRootFilesystem") is True:
        if not any(under("/tmp", m.get("mountPath", "")) for m in mounts):
            report.fail(obj, f"{prefix}: read-only root filesystem without a writable /tmp volume")
        for name, value in env.items():
            writable = any(under(str(value.value), m.get("mountPath", "")) for m in mounts)
            if name.endswith("_STATE_DIR") and value.value and not writable:
                report.fail(
                    obj,
                    f"{prefix}: {name}={value.value} is not on a writable "
                    "volume (the root filesystem is read-only)",
                )
    return env


def check_workload(obj: Obj, configmaps: dict[str, dict[str, Any]], report: Report) -> None:
    pod = dig(obj.body, *POD_SPEC_PATHS[obj.kind]) or {}
    grace = pod.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int) or grace < MIN_TERMINATION_GRACE_S:
        report.fail(
            obj,
            "terminationGracePeriodSeconds must be set and at least "
            f"{MIN_TERMINATION_GRACE_S} (SIGTERM drains and commits)",
        )
    if pod.get("automountServiceAccountToken") is not False:
        report.fail(
            obj,
            "automountServiceAccountToken is not false (the services never call "
            "the Kubernetes API)",
        )
    if pod.get("enableServiceLinks") is not False:
        report.fail(
            obj,
            "enableServiceLinks is not false (service links inject variables that "
            "look like PRODUCER_/ENRICHER_/NOTIFIER_ settings)",
        )
    for flag in ("hostPID", "hostIPC"):
        if pod.get(flag):
            report.fail(obj, f"{flag} is true")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for volume in volumes.values():
        cm = dig(volume, "configMap", "name")
        if cm and cm not in configmaps and not dig(volume, "configMap", "optional"):
            report.fail(obj, f"volume {volume.get('name')}: ConfigMap {cm!r} is not rendered")
    for is_init, key in ((True, "initContainers"), (False, "containers")):
        for container in pod.get(key) or []:
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    report.fail(
                        obj,
                        f"container {container.get('name')}: volumeMount "
                        f"{mount.get('name')!r} has no volume",
                    )
            env = check_container(obj, pod, container, is_init, configmaps, report)
            args = container.get("args") or []
            if args and str(args[0]).startswith("services."):
                check_service_settings(obj, container, env, report)


def check_service_settings(
    obj: Obj, container: dict[str, Any], env: dict[str, EnvValue], report: Report
) -> None:
    """The settings a service cannot start without (CONTRACT.md, Settings)."""
    cname = container.get("name")
    for name in REQUIRED_SETTINGS:
        value = env.get(name)
        if value is None or (value.source != "secret" and not value.value):
            report.fail(obj, f"container {cname}: required setting {name} is not set")
    protocol = env.get("KAFKA_SECURITY_PROTOCOL")
    # envFrom a whole Secret may hold them: its keys are not known here
    whole_secret = any(name.startswith("<all of Secret") for name in env)
    if protocol is not None and str(protocol.value).startswith("SASL") and not whole_secret:
        for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
            if name not in env:
                report.fail(
                    obj,
                    f"container {cname}: {name} is not set although "
                    f"KAFKA_SECURITY_PROTOCOL={protocol.value}",
                )


def selects(selector: dict[str, Any] | None, labels: dict[str, Any] | None) -> bool:
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def check_overlay(objs: list[Obj], report: Report) -> list[str]:
    """Policy over one overlay's objects; returns the Secrets it expects to exist."""
    configmaps = {o.name: o.body.get("data") or {} for o in objs if o.kind == "ConfigMap"}
    workloads = [o for o in objs if o.kind in POD_SPEC_PATHS]
    secrets: dict[str, set[str]] = {}

    for obj in objs:
        if obj.kind == "ConfigMap":
            for key in configmaps[obj.name]:
                if SECRET_NAME.search(key):
                    report.fail(obj, f"key {key} looks like a credential: put it in a Secret")
        if obj.kind == "Secret" and (obj.body.get("data") or obj.body.get("stringData")):
            report.fail(
                obj, "a Secret with values is committed; reference one the operator creates instead"
            )
        if obj.kind in POD_SPEC_PATHS:
            check_workload(obj, configmaps, report)
            pod = dig(obj.body, *POD_SPEC_PATHS[obj.kind]) or {}
            for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                for var in container.get("env") or []:
                    ref = dig(var, "valueFrom", "secretKeyRef")
                    if ref:
                        secrets.setdefault(ref.get("name"), set()).add(ref.get("key"))
            for volume in pod.get("volumes") or []:
                secret = volume.get("secret")
                if secret:
                    keys = {i.get("key") for i in secret.get("items") or []} or {"*"}
                    secrets.setdefault(secret.get("secretName"), set()).update(keys)

    def pods_selected(selector: dict[str, Any] | None) -> list[Obj]:
        return [w for w in workloads if selects(selector, dig(w.body, *POD_LABEL_PATHS[w.kind]))]

    for obj in objs:
        if obj.kind == "Service" and dig(obj.body, "spec", "selector"):
            matched = pods_selected(dig(obj.body, "spec", "selector"))
            if not matched:
                report.fail(obj, "spec.selector matches no workload's pod labels")
            for port in dig(obj.body, "spec", "ports") or []:
                target = port.get("targetPort", port.get("port"))
                for w in matched:
                    pod = dig(w.body, *POD_SPEC_PATHS[w.kind]) or {}
                    declared = [
                        p for c in pod.get("containers") or [] for p in c.get("ports") or []
                    ]
                    if not any(target in (p.get("name"), p.get("containerPort")) for p in declared):
                        report.fail(
                            obj, f"targetPort {target!r} is not a port of {w.kind}/{w.name}"
                        )
        pdb_selector = dig(obj.body, "spec", "selector", "matchLabels")
        if obj.kind == "PodDisruptionBudget" and not pods_selected(pdb_selector):
            report.fail(obj, "spec.selector.matchLabels matches no workload's pod labels")

    # DESIGN.md, Deployment: the producer is a single writer; each enricher holds full tables
    for w in workloads:
        name = dig(w.body, "metadata", "labels", NAME_LABEL)
        if name in SINGLE_WRITER:
            if w.kind != "Deployment" or dig(w.body, "spec", "replicas") != 1:
                report.fail(w, "a single writer: must be a Deployment with replicas: 1")
            if dig(w.body, "spec", "strategy", "type") != "Recreate":
                report.fail(
                    w,
                    "a single writer: spec.strategy.type must be Recreate (no "
                    "overlapping pods during a rollout)",
                )
        if name in NEEDS_PDB:
            pdbs = [
                o
                for o in objs
                if o.kind == "PodDisruptionBudget"
                and w in pods_selected(dig(o.body, "spec", "selector", "matchLabels"))
            ]
            if not pdbs:
                report.fail(w, "no PodDisruptionBudget selects its pods")
            for pdb in pdbs:
                if dig(pdb.body, "spec", "maxUnavailable") != 1:
                    report.fail(
                        pdb,
                        "spec.maxUnavailable must be 1 (replicas restore their "
                        "tables one at a time)",
                    )
    return sorted(f"{name}[{','.join(sorted(keys))}]" for name, keys in secrets.items())


# --- main ------------------------------------------------------------------------------------


def load(overlay: str, path: str, wrapper_dir: str, k8s_dir: str) -> Iterator[Obj]:
    with open(path) as f:
        for body in yaml.safe_load_all(f):
            if body:
                origin = origin_of(body, wrapper_dir, k8s_dir)
                yield Obj(overlay, body, origin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k8s-dir", required=True, help="the deploy/k8s tree that was rendered")
    parser.add_argument(
        "--k8s-version",
        action="append",
        required=True,
        help="Kubernetes version to validate against (repeatable)",
    )
    parser.add_argument("rendered", nargs="+", metavar="OVERLAY=FILE")
    args = parser.parse_args(argv)

    schemas, report = Schemas(), Report()
    summaries = []
    for item in args.rendered:
        overlay, _, path = item.partition("=")
        # origin paths are relative to the wrapper kustomization the file was rendered from
        wrapper_dir = os.path.dirname(os.path.abspath(path))
        objs = list(load(overlay, path, wrapper_dir, os.path.abspath(args.k8s_dir)))
        if not objs:
            report.failures.append(f"FAIL {overlay}: renders no objects")
            continue
        for obj in objs:
            check_schema(obj, schemas, args.k8s_version, report)
        secrets = check_overlay(objs, report)
        summaries.append(
            f"ok {overlay}: {len(objs)} objects, Kubernetes {', '.join(args.k8s_version)} "
            f"schemas (strict) and policy; expects Secrets: {', '.join(secrets) or 'none'}"
        )
    # one line per finding on stdout, for check.sh to pass on
    sys.stdout.write("\n".join(report.failures or summaries) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
