"""A launch plan: which job runs where, with which profile, and the exact trainer command every node runs."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import load_yaml
from .profile import ClusterProfile

Cluster = Literal["slurm", "ray-slurm", "k8s", "local"]
CLUSTERS: tuple[str, ...] = ("slurm", "ray-slurm", "k8s", "local")


@dataclass
class LaunchPlan:
    cluster: Cluster
    job: Literal["pretrain", "sweep"]  # pretrain: `lampretrain pretrain RECIPE`; sweep: `lampretrain sweep SWEEP`
    target: str  # the recipe or sweep file, as the nodes see it (relative paths: relative to the workdir)
    profile: ClusterProfile
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    overrides: list[str] = field(default_factory=list)  # the user's --set, applied after the profile's paths
    name: str | None = None  # job name; default: the recipe's name or the sweep file's stem

    @property
    def nodes(self) -> int:
        return self.profile.resources.nodes

    @property
    def gpus_per_node(self) -> int:
        return self.profile.resources.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def job_name(self) -> str:
        if self.name:
            return self.name
        if self.job == "pretrain":
            data = load_yaml(self.target)
            if isinstance(data.get("name"), str):
                return data["name"]
        return Path(self.target).stem

    def recipe_overrides(self) -> list[str]:
        """``--set`` values for the trainer: the profile's shared paths first, then the user's own."""
        sets = []
        paths = self.profile.paths
        if self.job == "pretrain":
            if paths.data:
                sets.append(f"data.store={paths.data}")
            if paths.output:
                sets.append(f"output={paths.output.rstrip('/')}/{self.job_name()}")
        return sets + list(self.overrides)

    def command_args(self) -> list[str]:
        """Arguments after ``lampretrain`` (``-m lampretrain.cli``); pretraining always resumes automatically."""
        sets = [a for s in self.recipe_overrides() for a in ("--set", s)]
        if self.job == "pretrain":
            return ["pretrain", self.target, "--resume", "auto", *sets]
        return ["sweep", self.target, *sets]


def k8s_name(name: str) -> str:
    """A DNS-1035 label (what Kubernetes needs for job and service names) made from ``name``."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"lam-{label}".rstrip("-")
    return label[:63].rstrip("-")


def shell_join(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
