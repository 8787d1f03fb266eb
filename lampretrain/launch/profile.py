"""The cluster profile: where and how a recipe runs (scheduler account, software environment, shared paths).

A profile is YAML validated by :func:`lampretrain.config.from_dict`, so an
unknown key names the allowed ones. Command-line flags (``--nodes``,
``--gpus-per-node``, ...) override the profile's ``resources`` section.
Example (``cluster/profiles/*.yaml`` hold complete ones)::

    name: my-cluster
    resources: {nodes: 2, gpus_per_node: 4, cpus_per_task: 32}
    slurm: {partition: gpu, account: proj123, time: "24:00:00"}
    environment: {modules: [cuda/12.4], setup: ["source ~/venvs/lam/bin/activate"]}
    paths: {data: /shared/lam/store, output: /shared/lam/runs}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, apply_overrides, from_dict, load_yaml

_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class ResourcesSection:
    nodes: int = 1
    gpus_per_node: int = 1  # ranks per node (one rank per GPU; CPU processes for --cluster local without GPUs)
    cpus_per_task: int | None = None  # Slurm --cpus-per-task / K8s cpu request per node
    memory: str | None = None  # Slurm --mem (e.g. "480G") / K8s memory request (e.g. "480Gi")
    gpu: bool = True  # a GPU cluster: gpus_per_node must be >= 1 and ranks use NCCL


@dataclass
class SlurmSection:
    partition: str | None = None  # required for --cluster slurm / ray-slurm
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"  # wall-clock limit, [D-]HH:MM:SS
    constraint: str | None = None
    gres: str | None = None  # e.g. "gpu:a100:4"; default: --gpus-per-node
    requeue: bool = True  # requeue on preemption / time limit, resuming from the newest checkpoint
    signal_grace_s: int = 120  # Slurm sends USR1 this many seconds before the time limit
    port: int = 29500  # rendezvous port on the first node
    srun_args: list[str] = field(default_factory=list)  # extra srun options (e.g. --container-image=...)
    extra: list[str] = field(default_factory=list)  # extra "#SBATCH ..." options, e.g. "--exclusive"
    log_dir: str | None = None  # default: <paths.output>/slurm

    def check(self) -> None:
        if not _SLURM_TIME.match(self.time):
            raise ConfigError(f"time: '{self.time}' is not a Slurm time limit like 24:00:00 or 2-00:00:00")
        if self.signal_grace_s < 1:
            raise ConfigError(f"signal_grace_s: must be >= 1, got {self.signal_grace_s}")


@dataclass
class VolumeSection:
    """A Kubernetes volume mounted into every pod (a PersistentVolumeClaim or a hostPath)."""

    name: str
    mount_path: str
    claim: str | None = None  # PersistentVolumeClaim name
    host_path: str | None = None
    read_only: bool = False

    def check(self) -> None:
        if (self.claim is None) == (self.host_path is None):
            raise ConfigError(f"volume '{self.name}': give exactly one of claim, host_path")
        if not self.mount_path.startswith("/"):
            raise ConfigError(f"mount_path: '{self.mount_path}' must be an absolute path")


@dataclass
class KubernetesSection:
    namespace: str = "default"
    image: str | None = None  # required for --cluster k8s (falls back to environment.image)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = None
    volumes: list[VolumeSection] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    shm_size: str = "16Gi"  # /dev/shm for DataLoader workers and NCCL
    ray_version: str = "2.60.0"  # KubeRay RayJob spec.rayClusterSpec.rayVersion; token auth needs >= 2.52
    backoff_limit: int = 3  # PyTorchJob restarts (each resumes from the newest checkpoint)


@dataclass
class RaySection:
    port: int = 6379  # head GCS port
    dashboard: bool = False  # the dashboard stays off unless asked
    dashboard_host: str = "127.0.0.1"  # bind address when enabled
    worker_wait_s: int = 300  # how long the batch script waits for all workers to join


@dataclass
class EnvironmentSection:
    image: str | None = None  # container image (Slurm: passed to srun_args by the site's plugin; K8s default)
    modules: list[str] = field(default_factory=list)  # `module load` lines (Slurm)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (venv activation, ...)
    variables: dict[str, str] = field(default_factory=dict)  # exported environment variables
    python: str = "python"  # interpreter on the nodes


@dataclass
class PathsSection:
    data: str | None = None  # the prepared store on the shared filesystem (sets the recipe's data.store)
    output: str | None = None  # run directory root on the shared filesystem (the recipe's output = output/<name>)
    workdir: str | None = None  # where the job runs (a checkout of lampretrain); default: the submit directory


@dataclass
class ClusterProfile:
    name: str = "cluster"
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    kubernetes: KubernetesSection = field(default_factory=KubernetesSection)
    ray: RaySection = field(default_factory=RaySection)
    environment: EnvironmentSection = field(default_factory=EnvironmentSection)
    paths: PathsSection = field(default_factory=PathsSection)


def parse_profile(data: dict, overrides: list[str] | None = None, where: str = "profile") -> ClusterProfile:
    """Validate plain data (after ``key.path=value`` overrides) into a :class:`ClusterProfile`."""
    return from_dict(ClusterProfile, apply_overrides(data, list(overrides or [])), where)


def load_profile(path: str | Path | None, overrides: list[str] | None = None) -> ClusterProfile:
    """Read a profile YAML (or the built-in defaults when ``path`` is None); errors name the file and key."""
    data = load_yaml(path) if path is not None else {}
    return parse_profile(data, overrides, where=str(path) if path is not None else "profile")
