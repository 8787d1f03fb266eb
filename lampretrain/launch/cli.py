"""``lampretrain launch``: from a recipe (or sweep) to a multi-node job on Slurm, Ray on Slurm, Kubernetes or locally."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..config import ConfigError
from .plan import CLUSTERS, LaunchPlan, shell_join
from .profile import load_profile
from .validate import LaunchError, validate

DESCRIPTION = """\
Render the job for RECIPE (or a sweep file with --job sweep) from a cluster profile, validate it, and print it,
write it (--output) or submit it (--submit: sbatch or kubectl apply -f).

  --cluster slurm      sbatch script: one task per node running torchrun (c10d rendezvous on the first node),
                       or the DeepSpeed launcher (--launcher deepspeed); requeue on preemption, --resume auto
  --cluster ray-slurm  sbatch script: Ray head on the first node, workers on the others, then the sweep
  --cluster k8s        Kubeflow PyTorchJob (pretrain) or KubeRay RayJob (--job sweep) manifest
  --cluster local      runs the same multi-node shape here: N torchrun processes on 127.0.0.1 (CPU/gloo
                       without GPUs), waits, fails if any node fails

The profile (cluster/profiles/*.yaml) holds partition, account, time, image or modules, environment and the
data/checkpoint paths on the shared filesystem; --nodes/--gpus-per-node/--profile-set override it.
Validation runs before anything is written or submitted and names the failing field.

examples:
  lampretrain launch recipes/demo-matris.yaml --cluster local --nodes 2 --set train.steps=20
  lampretrain launch recipes/matris-10m-omat24-salex-mptrj.yaml --cluster slurm \\
      --profile cluster/profiles/slurm-example.yaml --nodes 4 --gpus-per-node 8 --submit
  lampretrain launch recipes/sweep-demo.yaml --cluster k8s --job sweep --profile cluster/profiles/k8s-example.yaml
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``launch`` on the top-level subparsers."""
    p = subparsers.add_parser(
        "launch",
        help="run a recipe on Slurm, Ray on Slurm, Kubernetes or locally (multi-node)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # its option table and examples are laid out by hand
    )
    p.add_argument("target", metavar="RECIPE", help="recipe YAML (pretrain) or sweep YAML (--job sweep)")
    p.add_argument("--cluster", required=True, choices=CLUSTERS, help="where to run")
    p.add_argument("--job", choices=["pretrain", "sweep"],
                   help="pretrain (`lampretrain pretrain`) or sweep (`lampretrain sweep`); "
                        "default: sweep for ray-slurm, pretrain otherwise")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun",
                   help="Slurm pretraining: torchrun or the DeepSpeed launcher (default: %(default)s)")
    p.add_argument("--profile", metavar="PROFILE.yaml", help="cluster profile (default: built-in defaults)")
    p.add_argument("--profile-set", action="append", default=[], metavar="KEY=VALUE",
                   help="profile override, e.g. slurm.partition=gpu or paths.data=/shared/store")
    p.add_argument("--nodes", type=int, help="nodes (overrides resources.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (overrides resources.gpus_per_node)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override passed to the job, e.g. train.steps=1000")
    p.add_argument("--name", help="job name (default: the recipe's name or the sweep file's stem)")
    p.add_argument("--output", metavar="FILE", help="write the script/manifest here instead of printing it")
    p.add_argument("--submit", action="store_true", help="write it and run sbatch / kubectl apply -f")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and render, print what --submit would run (or the local node commands); run nothing")
    p.add_argument("--remote-paths", action="store_true",
                   help="do not check that paths.data/paths.output exist here (they exist only on the cluster)")
    p.add_argument("--port", type=int, help="--cluster local: rendezvous port (default: a free one)")
    return p


def build_plan(args: argparse.Namespace) -> LaunchPlan:
    sets = list(args.profile_set)
    if args.nodes is not None:
        sets.append(f"resources.nodes={args.nodes}")
    if args.gpus_per_node is not None:
        sets.append(f"resources.gpus_per_node={args.gpus_per_node}")
    profile = load_profile(args.profile, sets)
    job = args.job or ("sweep" if args.cluster == "ray-slurm" else "pretrain")
    return LaunchPlan(args.cluster, job, args.target, profile, args.launcher, list(args.set), args.name)


def render(plan: LaunchPlan, origin: str) -> str:
    """The script or manifest text for a non-local plan (manifests are checked structurally first)."""
    from . import kubernetes, slurm
    from .manifests import check_manifest

    if plan.cluster == "slurm":
        return slurm.render_pretrain(plan, origin)
    if plan.cluster == "ray-slurm":
        return slurm.render_ray(plan, origin)
    text = kubernetes.render(plan, origin)
    found = check_manifest(yaml.safe_load(text))
    if found:
        raise LaunchError("rendered manifest is not valid:\n  " + "\n  ".join(found))
    return text


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .local import node_commands, run_local
    from .submit import default_path, submit, submit_command, write

    plan = build_plan(args)
    validate(plan, check_paths=not args.remote_paths)
    if plan.cluster == "local":
        if args.dry_run:
            for cmd in node_commands(plan, args.port or 29500, "lampretrain-local"):
                print(shell_join(cmd))
            return 0
        return run_local(plan, args.port)
    origin = f"{plan.target}, profile {args.profile or 'defaults'}"
    text = render(plan, origin)
    if not (args.output or args.submit):
        print(text, end="")
        return 0
    path = Path(args.output) if args.output else default_path(plan)
    if args.dry_run:
        print(text, end="")
        print(f"# --dry-run: would write {path} and run: {shell_join(submit_command(plan, path))}", file=sys.stderr)
        return 0
    write(text, path)
    print(f"[lampretrain] wrote {path}", file=sys.stderr)
    return submit(plan, path) if args.submit else 0
