"""``lampretrain sweep``: fine-tuning trials on a 2-node Ray cluster started on loopback, then resumed on a local Ray.

The base recipe fine-tunes a tiny demo-pretrained MatRIS on the real FeO PBE+U relaxation (a new
head copied from the PBE+U one). The search space is a grid over the learning rate that forces
every outcome: two sane rates run to the end, a huge one (50) diverges and must be stopped by
ASHA once the sane ones have reported, and one (2e-3) has its process SIGKILLed by the test as
it starts (a failed trial).
The sweep runs once, through the command line, on a head and a worker node that the test starts
on 127.0.0.1 with token authentication; the re-run (no ``--address``: a local Ray) must replay
every finished trial from its record instead of training it again, and run the failed one again.

Faults: trials of one sweep are SIGKILLed from outside, as the OOM killer does: one trial's fine-tuning process
once it has reported, one trial's Ray worker once it has reported and another's before it has; each must be a
``failed`` row with its one-line reason and a ``FAILED`` MLflow child run, while the sane trial completes; a trial
that raises (its new head copied from a head the checkpoint lacks) likewise. And the shipped ``recipes/sweep-demo.yaml`` runs (shortened) against a tiny checkpoint laid out as ``make demo`` leaves it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from lampretrain.config import ConfigError, from_dict
from lampretrain.finetune.sweep import SweepSpec, load_sweep, run_sweep
from lampretrain.recipe import parse_recipe
from lampretrain.train import pretrain

from finetune_support import FEO, REAL, REPO, free_port, make_store, oxides_slice, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

LRS = [3e-3, 1e-3, 50.0, 2e-3]
KILLED = 2e-3
DIED = "trial process died (killed by signal 9 SIGKILL; out of memory?)"  # the summary's reasons
WORKER_DIED = "the trial's Ray worker process died (killed by a signal, out of memory, or its node was lost)"
SWEEP = {
    "name": "t", "recipe": "ft.yaml", "output": "sweep",
    "space": {"optim.lr": {"grid": LRS}},
    "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 2}, "ray": {"num_cpus": 2},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    oxides = oxides_slice(root, 8)
    store = make_store(root / "pre_store", [{"path": str(FEO), "dataset": "mp_pbeu"},
                                            {"path": str(oxides), "dataset": "oxides_pbe"}])
    recipe = tiny_recipe(store, root / "pre", 2)
    recipe["tracking"] = {"enabled": False}
    checkpoint = pretrain(parse_recipe(recipe)).checkpoint
    make_store(root / "feo_store", [{"path": str(FEO), "dataset": "feo"}])
    (root / "ft.yaml").write_text(yaml.safe_dump({
        "name": "ft-feo", "data": {"store": "feo_store", "budget": 32, "max_natoms": 32},
        "finetune": {"head": "feo", "init_from": "mp_pbeu"},
        "optim": {"lr": 1e-3}, "schedule": {"kind": "constant"},
        "train": {"steps": 6, "log_every": 2}, "checkpoint": {"every": 6, "keep": 1},
    }))
    (root / "sweep.yaml").write_text(yaml.safe_dump({**SWEEP, "checkpoint": str(checkpoint)}))
    return {"root": root, "checkpoint": str(checkpoint)}


def test_sweep_spec_is_validated(base):
    with pytest.raises(ConfigError, match="give exactly one of grid"):
        from_dict(SweepSpec, {"name": "t", "recipe": "r", "space": {"optim.lr": {"grid": [1], "choice": [2]}}})
    with pytest.raises(ConfigError, match="loguniform: low must be > 0"):
        from_dict(SweepSpec, {"name": "t", "recipe": "r", "space": {"optim.lr": {"loguniform": [0, 1]}}})
    spec = load_sweep(base["root"] / "sweep.yaml", ["output=bad"])
    spec.space = {"finetune.freez": spec.space["optim.lr"]}
    with pytest.raises(ConfigError, match="space.finetune.freez: .*unknown key 'freez'"):
        run_sweep(spec, root=base["root"], verbose=0)
    shipped = load_sweep(REPO / "recipes" / "sweep-demo.yaml")
    assert shipped.scheduler.kind == "asha" and len(shipped.space) >= 3


def _processes_under(temp: Path) -> list[int]:
    """Processes whose command line names ``temp`` (the nodes' session dir): this test's Ray processes only."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(temp) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def loopback_cluster(env: dict[str, str]) -> Iterator[str]:
    """A Ray head and one worker node on 127.0.0.1, one CPU each; yields the head's address; always torn down.

    ``ray start`` returns once its node is up (the worker's: registered with the head); each is started in its own
    process group, which its node's processes keep, so the teardown kills those groups and nothing else.
    """
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    temp = Path("/tmp") / f"ray-lt-{os.getpid()}"  # short: Ray's socket paths have a length limit
    address = f"127.0.0.1:{free_port()}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    groups = []
    try:
        for args in (["--head", "--port", address.split(":")[1], "--include-dashboard", "false",
                      "--temp-dir", str(temp)], ["--address", address]):
            node = subprocess.Popen([ray, "start", *args, *common], env=env, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            groups.append(node.pid)
            out, _ = node.communicate(timeout=120)
            assert node.returncode == 0, out[-3000:]
        yield address
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (left := _processes_under(temp)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _processes_under(temp), "Ray processes of the test cluster outlived it"


def sweep_env() -> dict[str, str]:
    """The command's environment: one thread per trial (2 shared cores), this checkout importable in Ray workers."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def lampretrain_sweep(root: Path, env: dict[str, str], *args: str, sweep: str = "sweep.yaml") -> str:
    run = subprocess.run([sys.executable, "-m", "lampretrain.cli", "sweep", sweep, "--quiet", *args],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout


def summary(output: Path) -> dict[float, dict]:
    with open(output / "summary.csv") as fh:
        return {float(r["optim.lr"]): r for r in csv.DictReader(fh)}


def child_runs(output: Path) -> tuple[str, list]:
    from mlflow.tracking import MlflowClient

    state = json.loads((output / "sweep.json").read_text())
    client = MlflowClient(state["uri"])
    experiment = client.get_experiment_by_name("lampretrain-sweep")
    runs = client.search_runs([experiment.experiment_id])
    return state["parent_run_id"], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]


def _trial_processes(output: Path) -> dict[str, tuple[int, int]]:
    """The running trial processes of the sweep writing to ``output``, by trial key (their trial directory's name):
    (their pid, their Ray worker's pid)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "lampretrain.finetune.trial" in args and not fields["State"].strip().startswith("Z"):  # a zombie is dead
            recipe = Path(next(a for a in args if a.endswith("trial.json")))
            if recipe.parent.parent == output / "trials":
                found[recipe.parent.name] = (int(proc.name), int(fields["PPid"]))
    return found


class Killer(threading.Thread):
    """SIGKILLs, from outside as the OOM killer would, the trial process or the Ray worker of the trials of given
    learning rates, once their MLflow child run exists (``when="started"``) or has logged two val_mae windows
    (``"reported"``: the first one's report has reached Tune, a window of training ago): ``plan`` maps lr → (what,
    when), ``killed`` records lr → (trial key, pid killed, trial pid)."""

    def __init__(self, output: Path, plan: dict[float, tuple[str, str]]):
        super().__init__(daemon=True)
        self.output, self.plan, self.killed, self.done = output, plan, {}, threading.Event()

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def run(self):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import OperationalError

        while not (self.output / "sweep.json").exists():  # the sweep made its store: reading it now creates none
            if self.done.wait(0.2):
                return
        client = MlflowClient(json.loads((self.output / "sweep.json").read_text())["uri"])
        while len(self.killed) < len(self.plan) and not self.done.wait(0.2):
            for key, (pid, worker) in _trial_processes(self.output).items():
                lr = json.loads((self.output / "trials" / key / "trial.json").read_text())["optim"]["lr"]
                if lr not in self.plan or lr in self.killed:
                    continue
                what, when = self.plan[lr]
                try:  # the trials write the same sqlite store
                    runs = client.search_runs(
                        [client.get_experiment_by_name("lampretrain-sweep").experiment_id],
                        f"tags.`lampretrain.trial_key` = '{key}' and attributes.status = 'RUNNING'")
                    reported = runs and len(client.get_metric_history(runs[0].info.run_id, "val_mae")) >= 2
                except (MlflowException, OperationalError):
                    continue
                if runs and (when == "started" or reported):
                    victim = pid if what == "trial" else worker
                    os.kill(victim, signal.SIGKILL)
                    self.killed[lr] = (key, victim, pid)


def test_sweep_on_a_two_node_loopback_cluster_then_resumed_on_a_local_ray(base, tmp_path):
    root, output = base["root"], base["root"] / "sweep"
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    # every node and the driver share the mode and the token (Ray's token authentication), never ~/.ray/auth_token
    env = {**sweep_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    killer = Killer(output, {KILLED: ("trial", "started")})
    with killer, loopback_cluster(env) as address:
        printed = lampretrain_sweep(root, env, "--address", address)
    assert set(killer.killed) == {KILLED}, printed
    rows = summary(output)
    assert set(rows) == set(LRS), printed
    assert rows[50.0]["status"] == "stopped early" and int(rows[50.0]["reports"]) < 3, printed  # ASHA at rung 1
    assert rows[KILLED]["status"] == "failed" and rows[KILLED]["error"].startswith(DIED + " (log: "), printed
    # ASHA may also stop the second sane trial at rung 1 when the first one reported a lower error there
    assert any(rows[lr]["status"] == "completed" and int(rows[lr]["reports"]) == 3 for lr in (3e-3, 1e-3)), printed
    trained = [r for r in rows.values() if r["status"] != "failed"]
    assert len({r["node_id"] for r in trained}) == 2  # one CPU per node, two trials at once: both nodes trained
    best = json.loads((output / "best" / "trial.json").read_text())
    assert best["optim.lr"] in (3e-3, 1e-3) and (output / "best" / "checkpoint" / "meta.json").exists()
    from lampretrain.models.multitask import MultiTaskModel

    assert MultiTaskModel.load(output / "best" / "model.pt").dataset_names[-1] == "feo"

    parent, children = child_runs(output)
    # the failed trial too: its run exists from the trial's start, and ends FAILED
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows.values()}
    status = {c.info.run_id: c.info.status for c in children}
    assert status[rows[50.0]["mlflow_run_id"]] == "KILLED" and status[rows[KILLED]["mlflow_run_id"]] == "FAILED"
    logs = {p: p.stat().st_mtime_ns for p in (output / "trials").glob("*/trial.log")}
    assert len(logs) == 4

    # the re-run on a local Ray replays the finished trials: no training, no new child run; the failed trial runs
    # again, unharmed this time. A process of its own: Ray reads RAY_AUTH_MODE once per process, at import
    lampretrain_sweep(root, env)
    again = summary(output)
    for lr in (3e-3, 1e-3, 50.0):
        assert again[lr]["status"].startswith("cached") and again[lr]["mlflow_run_id"] == rows[lr]["mlflow_run_id"]
    # ASHA may stop it at rung 1 against the replayed reports of the others
    assert again[50.0]["status"] == "cached (stopped early)" and again[KILLED]["status"] in ("completed", "stopped early")
    changed = {p for p, t in logs.items() if p.stat().st_mtime_ns != t}
    assert changed == {Path(rows[KILLED]["trial_dir"]) / "trial.log"}
    again_parent, again_children = child_runs(output)
    # one new child run: the failed trial's second attempt, ended as its trial did
    again_status = {c.info.run_id: c.info.status for c in again_children}
    assert again_parent == parent and again_status.keys() - status.keys() == {again[KILLED]["mlflow_run_id"]}
    assert again_status[again[KILLED]["mlflow_run_id"]] in ("FINISHED", "KILLED")


def test_killed_trials_and_workers_are_failed_rows_and_failed_runs(base):
    """The OOM killer's SIGKILL of a trial's process or of its Ray worker, before or after it reported: each such trial
    is a ``failed`` row with a one-line reason and a FAILED MLflow run with it; the sane trial completes, the parent
    run finishes and the command exits 0 (a trial completed)."""
    root, output = base["root"], base["root"] / "faults"
    plan = {2e-3: ("trial", "reported"), 3e-3: ("worker", "reported"), 4e-3: ("worker", "started")}
    lrs = [1e-3, *plan]
    (root / "faults.yaml").write_text(yaml.safe_dump({
        **SWEEP, "output": "faults", "checkpoint": base["checkpoint"], "space": {"optim.lr": {"grid": lrs}},
        "set": ["train.steps=16", "checkpoint.every=16"],  # long enough that a trial outlives its first report
        "scheduler": {"kind": "none"}}))
    env = sweep_env()
    with Killer(output, plan) as killer:
        printed = lampretrain_sweep(root, env, sweep="faults.yaml")
    assert set(killer.killed) == set(plan), printed
    rows = summary(output)
    assert set(rows) == set(lrs), printed
    assert rows[1e-3]["status"] == "completed" and float(rows[1e-3]["val_mae"]) > 0, printed
    assert rows[2e-3]["error"].startswith(DIED + " (log: "), printed
    assert rows[3e-3]["error"] == WORKER_DIED and rows[4e-3]["error"] == WORKER_DIED, printed
    assert int(rows[3e-3]["reports"]) >= 1 and rows[3e-3]["val_mae"] and int(rows[4e-3]["reports"]) == 0
    for lr in plan:
        assert rows[lr]["status"] == "failed" and rows[lr]["trial"] == killer.killed[lr][0][:8], printed
        # a dead worker takes its trial process with it (the process's parent-death signal): no orphan trains on
        assert killer.killed[lr][2] not in {pid for pid, _ in _trial_processes(output).values()}

    from mlflow.tracking import MlflowClient

    parent, children = child_runs(output)
    client = MlflowClient(json.loads((output / "sweep.json").read_text())["uri"])
    assert client.get_run(parent).info.status == "FINISHED"
    runs = {c.info.run_id: c for c in children}
    assert set(runs) == {r["mlflow_run_id"] for r in rows.values()}
    assert runs[rows[1e-3]["mlflow_run_id"]].info.status == "FINISHED"
    for lr in plan:
        run = runs[rows[lr]["mlflow_run_id"]]
        assert run.info.status == "FAILED" and run.data.tags["error"] == rows[lr]["error"], lr
        assert run.data.tags["lampretrain.trial_key"] == killer.killed[lr][0]


def test_a_trial_that_raises_is_a_failed_row_and_a_failed_run(base):
    """A genuine error inside a trial's process (a new head copied from a head the checkpoint lacks: the recipe
    validates, the model refuses): a ``failed`` row with the error's last line, its MLflow run (created before the
    error) FAILED with the error; the other trial completes and the parent run finishes."""
    root, output = base["root"], base["root"] / "raises"
    (root / "raises.yaml").write_text(yaml.safe_dump({
        **SWEEP, "output": "raises", "checkpoint": base["checkpoint"], "set": ["train.steps=2"],
        "space": {"finetune.init_from": {"grid": ["mp_pbeu", "no_such_head"]}}, "scheduler": {"kind": "none"}}))
    env = sweep_env()
    printed = lampretrain_sweep(root, env, sweep="raises.yaml")
    with open(output / "summary.csv") as fh:
        rows = {r["finetune.init_from"]: r for r in csv.DictReader(fh)}
    assert rows["mp_pbeu"]["status"] == "completed", printed
    bad = rows["no_such_head"]
    assert bad["status"] == "failed" and "unknown dataset 'no_such_head'" in bad["error"], printed
    assert "Traceback" not in bad["error"] and bad["error"].endswith(f"(log: {bad['trial_dir']}/trial.log)")

    from mlflow.tracking import MlflowClient

    parent, children = child_runs(output)
    client = MlflowClient(json.loads((output / "sweep.json").read_text())["uri"])
    assert client.get_run(parent).info.status == "FINISHED"
    runs = {c.info.run_id: c for c in children}
    assert runs[rows["mp_pbeu"]["mlflow_run_id"]].info.status == "FINISHED"
    failed = runs[bad["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and "unknown dataset 'no_such_head'" in failed.data.tags["error"]


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory) -> Path:
    """A directory laid out as ``make demo`` leaves one (outputs/demo/store, outputs/demo/matris), at test scale: the
    demo store's datasets that the shipped sweep names (a slice of cho_mn15, SPICE, the replayed crystals) and a
    MatRIS pretrained on them for 2 steps, so it has a head per dataset as the demo model has."""
    from ase.io import write

    from lampretrain.io import read_frames

    root = tmp_path_factory.mktemp("demo")
    cho = root / "cho_first40.extxyz"
    write(cho, [f.to_atoms() for _, f in zip(range(40), read_frames(REAL / "deepmd_nopbc_cho" / "C1H4O2"))],
          format="extxyz")
    store = make_store(root / "outputs" / "demo" / "store", [
        {"path": str(FEO), "dataset": "mp_pbeu"}, {"path": str(oxides_slice(root, 8)), "dataset": "oxides_pbe"},
        {"path": str(cho), "dataset": "cho_mn15"},
        {"path": str(REAL / "spice_hdf5" / "SPICE-1.1.4_n2.hdf5"), "dataset": "spice"}])
    recipe = tiny_recipe(store, root / "outputs" / "demo" / "matris", 2)
    recipe["tracking"] = {"enabled": False}
    pretrain(parse_recipe(recipe))
    return root


def test_the_shipped_sweep_runs_against_the_demo_layout(demo_layout):
    """recipes/sweep-demo.yaml and its base recipe as shipped, run from a demo layout: only shortened (2 steps, one
    draw per dataset); every trial trains its dataset's head and reports a validation MAE."""
    shipped = yaml.safe_load((REPO / "recipes" / "sweep-demo.yaml").read_text())
    shipped["recipe"] = str(REPO / shipped["recipe"])
    shipped["set"] += ["train.steps=2", "train.log_every=1", "checkpoint.every=2"]
    shipped.update(num_samples=1, ray={"num_cpus": 2})
    (demo_layout / "sweep-demo.yaml").write_text(yaml.safe_dump(shipped))
    env = sweep_env()
    printed = lampretrain_sweep(demo_layout, env, sweep="sweep-demo.yaml")
    with open(demo_layout / "outputs" / "sweep-demo" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["data.datasets"] for r in rows) == ["['cho_mn15']", "['spice']"], printed
    # ASHA (the shipped scheduler) may stop the worse one at its rung: trained, not failed
    assert all(r["status"] in ("completed", "stopped early") and float(r["val_mae"]) > 0 for r in rows), printed
    assert any(r["status"] == "completed" for r in rows), printed
