"""Kubernetes manifests: a Kubeflow PyTorchJob for pretraining and a KubeRay RayJob for sweeps."""

from __future__ import annotations

from typing import Any

import yaml

from .plan import LaunchPlan, k8s_name, shell_join
from .templates import drop_none, fill_data, load_template_yaml

SHM_VOLUME = "dshm"


class _Dumper(yaml.SafeDumper):
    """Writes every replica's pod template in full (no YAML anchors) so each reads on its own."""

    def ignore_aliases(self, data):
        return True


def _image(plan: LaunchPlan) -> str | None:
    return plan.profile.kubernetes.image or plan.profile.environment.image


def _resources(plan: LaunchPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    r = plan.profile.resources
    requests: dict[str, Any] = {}
    if r.cpus_per_task:
        requests["cpu"] = str(r.cpus_per_task)
    if r.memory:
        requests["memory"] = r.memory
    limits = dict(requests)
    if r.gpu:
        limits["nvidia.com/gpu"] = r.gpus_per_node  # extended resources: requests default to the limit
    return requests, limits


def _volumes(plan: LaunchPlan) -> tuple[list[dict], list[dict]]:
    k = plan.profile.kubernetes
    volumes, mounts = [], []
    for v in k.volumes:
        source = {"persistentVolumeClaim": {"claimName": v.claim}} if v.claim else {"hostPath": {"path": v.host_path}}
        volumes.append({"name": v.name, **source})
        mounts.append({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only})
    volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}})
    mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    return volumes, mounts


def pod_template(plan: LaunchPlan, container: str, command: list[str] | None, ports: list[dict]) -> dict[str, Any]:
    """The pod template every replica or Ray group uses (``cluster/k8s/pod.yaml``)."""
    k, env = plan.profile.kubernetes, plan.profile.environment
    grace = plan.profile.slurm.signal_grace_s
    requests, limits = _resources(plan)
    volumes, mounts = _volumes(plan)
    variables = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(max(grace - 20, 10)), **env.variables}
    values = {
        "grace": grace,
        "node_selector": dict(k.node_selector) or None,
        "container": container,
        "image": _image(plan),
        "pull_policy": k.image_pull_policy,
        "workdir": plan.profile.paths.workdir,
        "command": command,
        "env": [{"name": n, "value": str(v)} for n, v in variables.items()],
        "ports": ports or None,
        "requests": requests or None,
        "limits": limits or None,
        "mounts": mounts,
        "volumes": volumes,
    }
    pod = drop_none(fill_data(load_template_yaml("k8s/pod.yaml"), values, "cluster/k8s/pod.yaml"))
    if k.service_account:
        pod["spec"]["serviceAccountName"] = k.service_account
    return pod


def pytorchjob(plan: LaunchPlan) -> dict[str, Any]:
    """A PyTorchJob: Master + (nodes − 1) Workers, each running torchrun with nprocPerNode ranks."""
    command = ["torchrun", "--nnodes", str(plan.nodes), "--nproc_per_node", str(plan.gpus_per_node),
               "-m", "lampretrain.cli", *plan.command_args()]
    values = {
        "name": k8s_name(plan.job_name()),
        "namespace": plan.profile.kubernetes.namespace,
        "nproc": str(plan.gpus_per_node),  # PyTorchJob v1 types nprocPerNode as a string
        "backoff_limit": plan.profile.kubernetes.backoff_limit,
        "workers": plan.nodes - 1,
        "pod": pod_template(plan, "pytorch", command, [{"name": "pytorchjob-port", "containerPort": 23456}]),
    }
    job = fill_data(load_template_yaml("k8s/pytorchjob.yaml"), values, "cluster/k8s/pytorchjob.yaml")
    if plan.nodes == 1:
        del job["spec"]["pytorchReplicaSpecs"]["Worker"]
    return job


def rayjob(plan: LaunchPlan) -> dict[str, Any]:
    """A RayJob: a head and (nodes − 1) workers with the same GPUs; the entrypoint is the sweep."""
    ray = plan.profile.ray
    head_ports = [
        {"name": "gcs", "containerPort": ray.port},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    r = plan.profile.resources
    params = {"num-cpus": str(r.cpus_per_task)} if r.cpus_per_task else {}
    values = {
        "name": k8s_name(plan.job_name()),
        "namespace": plan.profile.kubernetes.namespace,
        "entrypoint": shell_join([plan.profile.environment.python, "-m", "lampretrain.cli", *plan.command_args(), "--address", "auto"]),
        "ray_version": plan.profile.kubernetes.ray_version,
        # KubeRay submits the entrypoint and reads its status through the job API on the head's dashboard port,
        # from other pods, so it listens on the pod's address; authOptions (rayjob.yaml) puts a token on it
        "head_params": {"dashboard-host": "0.0.0.0", **params},
        "worker_params": dict(params),
        "workers": plan.nodes - 1,
        "head_pod": pod_template(plan, "ray-head", None, head_ports),
        "worker_pod": pod_template(plan, "ray-worker", None, []),
    }
    return fill_data(load_template_yaml("k8s/rayjob.yaml"), values, "cluster/k8s/rayjob.yaml")


def render(plan: LaunchPlan, origin: str) -> str:
    manifest = pytorchjob(plan) if plan.job == "pretrain" else rayjob(plan)
    return f"# Rendered by `lampretrain launch` ({origin}).\n" + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)
