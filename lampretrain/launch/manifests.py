"""Structural checks of the Kubernetes manifests we render: the fields their kinds require.

Written from the Kubeflow training-operator v1 (``kubeflow.org/v1`` PyTorchJob) and KubeRay v1
(``ray.io/v1`` RayJob) API types and the core ``PodTemplateSpec``; each problem names the field path.
"""

from __future__ import annotations

import re
from typing import Any

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035: job and service names
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
PYTORCH_REPLICA_TYPES = ("Master", "Worker")


def _get(node: Any, path: str, problems: list[str], kind: type | tuple = object) -> Any:
    """The value at dotted ``path`` if present and of ``kind``; otherwise a problem is recorded."""
    value = node
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            problems.append(f"{path}: required")
            return None
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        problems.append(f"{path}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return None
    return value


def _check_metadata(doc: dict, problems: list[str]) -> None:
    name = _get(doc, "metadata.name", problems, str)
    if name is not None and (len(name) > 63 or not _DNS_LABEL.match(name)):
        problems.append(f"metadata.name: '{name}' is not a DNS-1035 label (lowercase letters, digits, '-', <= 63)")


def check_pod_template(template: Any, where: str, problems: list[str], container: str | None = None) -> None:
    """A PodTemplateSpec: containers with name and image, quantities that parse, mounts of declared volumes."""
    if not isinstance(template, dict):
        problems.append(f"{where}: expected a pod template mapping")
        return
    containers = _get(template, "spec.containers", [], list)
    if not containers:
        problems.append(f"{where}.spec.containers: required, at least one container")
        return
    volumes = template["spec"].get("volumes") or []
    names = set()
    for k, v in enumerate(volumes):
        sources = [key for key in v if key != "name"] if isinstance(v, dict) else []
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or len(sources) != 1:
            problems.append(f"{where}.spec.volumes[{k}]: needs a name and exactly one source")
        else:
            names.add(v["name"])
    for k, c in enumerate(containers):
        at = f"{where}.spec.containers[{k}]"
        if not isinstance(c, dict):
            problems.append(f"{at}: expected a mapping")
            continue
        for key in ("name", "image"):
            if not isinstance(c.get(key), str) or not c[key]:
                problems.append(f"{at}.{key}: required")
        for key in ("command", "args"):
            if key in c and not (isinstance(c[key], list) and all(isinstance(a, str) for a in c[key])):
                problems.append(f"{at}.{key}: expected a list of strings")
        for kind in ("requests", "limits"):
            for res, q in (c.get("resources", {}).get(kind) or {}).items():
                if not _QUANTITY.match(str(q)):
                    problems.append(f"{at}.resources.{kind}.{res}: '{q}' is not a quantity")
        for m, mount in enumerate(c.get("volumeMounts") or []):
            if mount.get("name") not in names:
                problems.append(f"{at}.volumeMounts[{m}].name: '{mount.get('name')}' is not a volume of the pod")
            if not str(mount.get("mountPath", "")).startswith("/"):
                problems.append(f"{at}.volumeMounts[{m}].mountPath: required, an absolute path")
        for e, var in enumerate(c.get("env") or []):
            if not isinstance(var.get("name"), str) or not isinstance(var.get("value", ""), str):
                problems.append(f"{at}.env[{e}]: needs a name and a string value")
    if container is not None and container not in [c.get("name") for c in containers if isinstance(c, dict)]:
        problems.append(f"{where}.spec.containers: the operator needs a container named '{container}'")


def check_pytorchjob(doc: dict) -> list[str]:
    """Problems of a ``kubeflow.org/v1`` PyTorchJob (an empty list when it is well formed)."""
    problems: list[str] = []
    if doc.get("apiVersion") != "kubeflow.org/v1" or doc.get("kind") != "PyTorchJob":
        problems.append(f"apiVersion/kind: expected kubeflow.org/v1 PyTorchJob, got {doc.get('apiVersion')} {doc.get('kind')}")
    _check_metadata(doc, problems)
    specs = _get(doc, "spec.pytorchReplicaSpecs", problems, dict)
    nproc = doc.get("spec", {}).get("nprocPerNode")
    if nproc is not None and not (isinstance(nproc, str) and (nproc.isdigit() or nproc in ("auto", "cpu", "gpu"))):
        problems.append(f"spec.nprocPerNode: expected a string (a number, auto, cpu or gpu), got {nproc!r}")
    for rtype, spec in (specs or {}).items():
        at = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in PYTORCH_REPLICA_TYPES:
            problems.append(f"{at}: unknown replica type; allowed: {', '.join(PYTORCH_REPLICA_TYPES)}")
            continue
        replicas = _get(spec, "replicas", problems, int)
        if replicas is not None and (replicas < 0 or rtype == "Master" and replicas != 1):
            problems.append(f"{at}.replicas: {replicas} (Master must be 1, Worker >= 0)")
        policy = spec.get("restartPolicy")
        if policy is not None and policy not in RESTART_POLICIES:
            problems.append(f"{at}.restartPolicy: '{policy}' not one of {', '.join(RESTART_POLICIES)}")
        check_pod_template(spec.get("template"), f"{at}.template", problems, container="pytorch")
    if specs is not None and "Master" not in specs:
        problems.append("spec.pytorchReplicaSpecs.Master: required (torchrun's rendezvous runs on it)")
    return problems


def _older(version: str, than: tuple[int, int]) -> bool:
    """Whether a "major.minor[.patch]" version is below ``than``; an unparsable one counts as older."""
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) < than
    except (IndexError, ValueError):
        return True


def check_rayjob(doc: dict) -> list[str]:
    """Problems of a ``ray.io/v1`` RayJob (an empty list when it is well formed)."""
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append(f"apiVersion/kind: expected ray.io/v1 RayJob, got {doc.get('apiVersion')} {doc.get('kind')}")
    _check_metadata(doc, problems)
    entrypoint = _get(doc, "spec.entrypoint", problems, str)
    if entrypoint is not None and not entrypoint.strip():
        problems.append("spec.entrypoint: empty")
    cluster = _get(doc, "spec.rayClusterSpec", problems, dict)
    if cluster is None:
        return problems
    # the head's job API runs code for whoever reaches it: off the pod's loopback it must want a token
    dashboard = ((cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0")
    if dashboard not in ("127.0.0.1", "localhost") and (cluster.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"spec.rayClusterSpec.authOptions.mode: 'token' required, the dashboard listens on {dashboard}")
    version = str(cluster.get("rayVersion", ""))
    if (cluster.get("authOptions") or {}).get("mode") == "token" and _older(version, (2, 52)):
        problems.append(f"spec.rayClusterSpec.rayVersion: {version!r}; token authentication needs Ray >= 2.52")
    head = _get(cluster, "headGroupSpec", problems, dict)
    groups = [("spec.rayClusterSpec.headGroupSpec", head)] if head is not None else []
    for k, g in enumerate(_get(cluster, "workerGroupSpecs", problems, list) or []):
        at = f"spec.rayClusterSpec.workerGroupSpecs[{k}]"
        groups.append((at, g))
        if not isinstance(g.get("groupName"), str) or not g["groupName"]:
            problems.append(f"{at}.groupName: required")
        counts = {key: g.get(key) for key in ("minReplicas", "replicas", "maxReplicas")}
        for key, n in counts.items():
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                problems.append(f"{at}.{key}: expected an integer >= 0, got {n!r}")
        lo, n, hi = counts["minReplicas"], counts["replicas"], counts["maxReplicas"]
        if all(isinstance(x, int) for x in (lo, n, hi)) and not lo <= n <= hi:
            problems.append(f"{at}: need minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
    for at, g in groups:
        params = g.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{at}.rayStartParams: required, a mapping of strings")
        check_pod_template(g.get("template"), f"{at}.template", problems)
    return problems


def check_manifest(doc: dict) -> list[str]:
    """Dispatch on ``kind``; unknown kinds are a problem (we render only these two)."""
    checks = {"PyTorchJob": check_pytorchjob, "RayJob": check_rayjob}
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in checks:
        return [f"kind: {kind!r} is not one of {', '.join(checks)}"]
    return checks[kind](doc)
