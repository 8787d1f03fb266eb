"""Slurm batch scripts: multi-node torchrun or the DeepSpeed launcher, and a Ray cluster for sweeps."""

from __future__ import annotations

import shlex

from .plan import LaunchPlan, shell_join
from .templates import fill_text, template_path

TEMPLATE_FOR = {"torchrun": "slurm/torchrun.sbatch", "deepspeed": "slurm/deepspeed.sbatch"}


def log_dir(plan: LaunchPlan) -> str:
    """Where Slurm writes the job log (it must exist before sbatch; submission creates it)."""
    s, paths = plan.profile.slurm, plan.profile.paths
    if s.log_dir:
        return s.log_dir
    return f"{paths.output.rstrip('/')}/slurm" if paths.output else "slurm-logs"


def sbatch_lines(plan: LaunchPlan) -> list[str]:
    """The ``#SBATCH`` options the profile sets (nodes, tasks and the log are in the template)."""
    s, r = plan.profile.slurm, plan.profile.resources
    opts = [f"--partition={s.partition}"]
    opts += [f"--{key}={value}" for key, value in (("account", s.account), ("qos", s.qos)) if value]
    opts.append(f"--time={s.time}")
    if s.constraint:
        opts.append(f"--constraint={s.constraint}")
    if s.gres:
        opts.append(f"--gres={s.gres}")
    elif r.gpu:
        opts.append(f"--gpus-per-node={r.gpus_per_node}")
    if r.cpus_per_task:
        opts.append(f"--cpus-per-task={r.cpus_per_task}")
    if r.memory:
        opts.append(f"--mem={r.memory}")
    # USR1 some time before the time limit lets the trainer checkpoint; requeue continues the run
    opts += ["--requeue" if s.requeue else "--no-requeue", f"--signal=B:USR1@{s.signal_grace_s}"]
    opts += s.extra
    return [f"#SBATCH {o}" for o in opts]


def environment_lines(plan: LaunchPlan) -> list[str]:
    env = plan.profile.environment
    lines = [f"module load {shlex.quote(m)}" for m in env.modules]
    lines += env.setup
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.variables.items()]
    return lines or ["# (no environment setup in the profile)"]


def srun_args(plan: LaunchPlan) -> str:
    """Extra srun options; a container image goes through pyxis (``--container-image``) with the shared paths mounted."""
    env, paths = plan.profile.environment, plan.profile.paths
    args = list(plan.profile.slurm.srun_args)
    if env.image and not any(a.startswith("--container-image") for a in args):
        args.append(f"--container-image={env.image}")
        mounts = [p for p in (paths.data, paths.output) if p]
        if mounts:
            args.append("--container-mounts=" + ",".join(mounts))
    return "".join(f"{shlex.quote(a)} " for a in args)


def _common(plan: LaunchPlan, origin: str) -> dict[str, str]:
    s = plan.profile.slurm
    workdir = plan.profile.paths.workdir
    requeue = '  scontrol requeue "$SLURM_JOB_ID"' if s.requeue else "  : # requeue disabled (slurm.requeue: false)"
    return {
        "origin": origin,
        "job_name": plan.job_name(),
        "nodes": str(plan.nodes),
        "gpus": str(plan.gpus_per_node),
        "grace": str(s.signal_grace_s),
        "sbatch": "\n".join(sbatch_lines(plan)),
        "log_dir": log_dir(plan),
        "environment": "\n".join(environment_lines(plan)),
        "workdir": shlex.quote(workdir) if workdir else '"$SLURM_SUBMIT_DIR"',
        "srun_args": srun_args(plan),
        "requeue": requeue,
        "python": shlex.quote(plan.profile.environment.python),
    }


def render_pretrain(plan: LaunchPlan, origin: str) -> str:
    """The sbatch script for ``plan`` (torchrun or DeepSpeed launcher, one task per node)."""
    values = _common(plan, origin)
    s = plan.profile.slurm
    values["port"] = str(s.port)
    values["shutdown_timeout"] = str(max(s.signal_grace_s - 20, 10))
    args = plan.command_args()
    values["trainer"] = "-m lampretrain.cli " + shell_join(args)
    inner = (
        'exec deepspeed --hostfile "$1" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$2" --master_port "$3" '
        "--no_local_rank --module lampretrain.cli " + shell_join(args)
    )
    values["deepspeed"] = shlex.quote(inner)
    path = template_path(TEMPLATE_FOR[plan.launcher])
    return fill_text(path.read_text(), values, str(path))


def render_ray(plan: LaunchPlan, origin: str) -> str:
    """The sbatch script that starts Ray on the allocation and runs the sweep against it."""
    values = _common(plan, origin)
    r, ray = plan.profile.resources, plan.profile.ray
    values.update(
        ray_port=str(ray.port),
        dashboard="true" if ray.dashboard else "false",
        dashboard_host=shlex.quote(ray.dashboard_host),
        gpus=str(r.gpus_per_node if r.gpu else 0),
        num_cpus=f"--num-cpus={r.cpus_per_task} " if r.cpus_per_task else "",
        wait_s=str(ray.worker_wait_s),
        sweep=f"{values['python']} -m lampretrain.cli " + shell_join(plan.command_args()),
    )
    path = template_path("slurm/ray.sbatch")
    return fill_text(path.read_text(), values, str(path))
