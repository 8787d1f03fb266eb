"""Writing the rendered job and handing it to the scheduler (``sbatch`` or ``kubectl apply -f``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .plan import LaunchPlan
from .slurm import log_dir
from .validate import LaunchError

SUBMITTERS = {"slurm": "sbatch", "ray-slurm": "sbatch", "k8s": "kubectl"}


def default_path(plan: LaunchPlan) -> Path:
    suffix = ".yaml" if plan.cluster == "k8s" else ".sbatch"
    return Path(f"{plan.job_name()}-{plan.cluster}{suffix}")


def submit_command(plan: LaunchPlan, path: Path) -> list[str]:
    if plan.cluster == "k8s":
        return ["kubectl", "apply", "-f", str(path)]
    return ["sbatch", str(path)]


def write(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if path.suffix == ".sbatch":
        path.chmod(0o755)
    return path


def submit(plan: LaunchPlan, path: Path) -> int:
    """Run the submitter on the written file; a missing tool is a clear error, not a traceback."""
    tool = SUBMITTERS[plan.cluster]
    if shutil.which(tool) is None:
        raise LaunchError(
            f"--submit: '{tool}' is not on PATH here; the job is written to {path}: "
            f"copy it to a machine with {tool} and run `{' '.join(submit_command(plan, path))}`"
        )
    if plan.cluster != "k8s":
        logs = log_dir(plan)
        if "://" not in logs:
            Path(logs).mkdir(parents=True, exist_ok=True)  # Slurm does not create the log directory
    result = subprocess.run(submit_command(plan, path), capture_output=True, text=True)
    print((result.stdout + result.stderr).strip())
    return result.returncode
