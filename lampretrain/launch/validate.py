"""Checks before anything is submitted: profile fields, node and GPU counts, shared paths, world size.

Rules (each failure names the field):
- ``resources.nodes`` >= 1 and ``resources.gpus_per_node`` >= 1 (ranks per node; on a GPU cluster, GPUs);
- Slurm kinds need ``slurm.partition``; Kubernetes needs an image and puts ``paths.*`` under a volume mount;
- ``paths.data`` exists and ``paths.output`` (or its parent) exists when they are local paths; ``--remote-paths``
  skips this for paths that exist only on the cluster;
- pretraining: the recipe validates; world size = nodes × gpus_per_node must not exceed the training frames
  the sampler can deal (each rank needs a structure every step); NCCL needs a GPU per rank (``resources.gpu:
  false``, or ``--cluster local`` without enough GPUs, has none).
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, load_yaml
from .plan import LaunchPlan


class LaunchError(ConfigError):
    """The plan cannot run as given; the message lists every problem with the field it concerns."""


def _is_remote(path: str) -> bool:
    return "://" in path


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def problems(plan: LaunchPlan, check_paths: bool = True) -> list[str]:
    """Everything wrong with ``plan`` (an empty list when it can be submitted)."""
    out: list[str] = []
    p, r = plan.profile, plan.profile.resources
    if r.nodes < 1:
        out.append(f"resources.nodes: must be >= 1, got {r.nodes}")
    if r.gpus_per_node < 1:
        what = "GPUs per node on a GPU cluster" if r.gpu and plan.cluster != "local" else "ranks per node"
        out.append(f"resources.gpus_per_node: must be >= 1 ({what}), got {r.gpus_per_node}")
    if plan.cluster in ("slurm", "ray-slurm") and not p.slurm.partition:
        out.append(f"slurm.partition: required for --cluster {plan.cluster}")
    if plan.cluster == "ray-slurm" and plan.job != "sweep":
        out.append("job: --cluster ray-slurm runs sweeps (--job sweep); pretrain with --cluster slurm")
    if plan.cluster == "local" and plan.job != "pretrain":
        out.append("job: --cluster local rehearses pretraining; run sweeps with `lampretrain sweep` directly")
    if plan.cluster == "k8s":
        if not (p.kubernetes.image or p.environment.image):
            out.append("kubernetes.image: required for --cluster k8s (or environment.image)")
        mounts = [v.mount_path for v in p.kubernetes.volumes]
        for key in ("data", "output"):
            value = getattr(p.paths, key)
            if value and not _is_remote(value) and not _under(value, mounts):
                out.append(f"paths.{key}: '{value}' is not under any kubernetes.volumes mount_path ({mounts or 'none'})")
    elif check_paths:
        out += _path_problems(plan)
    target = Path(plan.target)
    if not target.exists():
        out.append(f"{plan.job} file: {plan.target} does not exist")
    elif plan.job == "pretrain":
        out += _recipe_problems(plan)
    else:
        try:
            load_yaml(target)
        except ConfigError as err:
            out.append(f"sweep file: {err}")
    return out


def _path_problems(plan: LaunchPlan) -> list[str]:
    out = []
    hint = " (pass --remote-paths if it exists only on the cluster)"
    data, output = plan.profile.paths.data, plan.profile.paths.output
    if data and not _is_remote(data) and not Path(data).exists():
        out.append(f"paths.data: {data} does not exist{hint}")
    if output and not _is_remote(output):
        if not (Path(output).exists() or Path(output).parent.exists()):
            out.append(f"paths.output: neither {output} nor its parent exists{hint}")
    return out


def _recipe_problems(plan: LaunchPlan) -> list[str]:
    from ..recipe import load_recipe

    try:
        recipe = load_recipe(plan.target, plan.recipe_overrides())
    except ConfigError as err:
        return [f"recipe: {err}"]
    out = []
    r, world = plan.profile.resources, plan.world_size
    gpu_ranks = r.gpu if plan.cluster != "local" else local_gpus() >= world and recipe.train.device != "cpu"
    if plan.cluster == "local" and recipe.train.device == "cuda" and local_gpus() < world:
        out.append(f"train.device: cuda for {world} local ranks, but this machine has {local_gpus()} GPU(s)")
    if recipe.engine.backend == "nccl" and not gpu_ranks:
        out.append("engine.backend: nccl needs a GPU per rank; use gloo or auto")
    if world >= 1:
        try:
            frames = _training_frames(recipe)
        except ConfigError as err:  # a dataset the store lacks, which the trainer refuses too
            out.append(f"recipe: {err}")
            frames = None
        if frames is not None and frames < world:
            out.append(
                f"world size {world} (resources.nodes {r.nodes} x resources.gpus_per_node {r.gpus_per_node}) "
                f"exceeds the {frames} '{recipe.data.split}' frames of data.store {recipe.data.store}: "
                "every rank needs a structure each step"
            )
    return out


def _training_frames(recipe) -> int | None:
    """Frames the sampler deals from (datasets and max_natoms applied); None when the store is not readable here."""
    from ..store.index import StoreIndex

    data = recipe.data
    if _is_remote(data.store) or not (Path(data.store) / "manifest.json").exists():
        return None
    return len(StoreIndex.open(data.store).select(data.split, data.datasets, data.max_natoms, required=False))


def validate(plan: LaunchPlan, check_paths: bool = True) -> None:
    """Raise :class:`LaunchError` listing every problem, before anything is rendered or submitted."""
    found = problems(plan, check_paths)
    if found:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(found))
