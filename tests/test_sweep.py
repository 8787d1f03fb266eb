"""``lampretrain sweep``: fine-tuning trials on a 2-node Ray cluster started on loopback, then resumed on a local Ray.

The base recipe fine-tunes a tiny demo-pretrained MatRIS on the real FeO PBE+U relaxation (a new
head copied from the PBE+U one). The search space is a grid over the learning rate that forces
every outcome: two sane rates run to the end, a huge one (50) diverges and must be stopped by
ASHA once the sane ones have reported, and a negative one raises in the optimizer (a failed trial).
The sweep runs once, through the command line, on a head and a worker node that the test starts
on 127.0.0.1 with token authentication; the re-run (no ``--address``: a local Ray) must replay
every finished trial from its record instead of training it again.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from lampretrain.config import ConfigError, from_dict
from lampretrain.finetune.sweep import SweepSpec, load_sweep, run_sweep
from lampretrain.recipe import parse_recipe
from lampretrain.train import pretrain

from finetune_support import FEO, REPO, make_store, oxides_slice, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

LRS = [3e-3, 1e-3, 50.0, -1.0]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    address = f"127.0.0.1:{_free_port()}"
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


def lampretrain_sweep(root: Path, env: dict[str, str], *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "lampretrain.cli", "sweep", "sweep.yaml", "--quiet", *args],
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


def test_sweep_on_a_two_node_loopback_cluster_then_resumed_on_a_local_ray(base, tmp_path):
    root, output = base["root"], base["root"] / "sweep"
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    # every node and the driver share the mode and the token (Ray's token authentication), never ~/.ray/auth_token
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with loopback_cluster(env) as address:
        printed = lampretrain_sweep(root, env, "--address", address)
    rows = summary(output)
    assert set(rows) == set(LRS), printed
    assert rows[50.0]["status"] == "stopped early" and int(rows[50.0]["reports"]) < 3, printed  # ASHA at rung 1
    assert rows[-1.0]["status"] == "error" and "Invalid learning rate" in rows[-1.0]["error"], printed
    # ASHA may also stop the second sane trial at rung 1 when the first one reported a lower error there
    assert any(rows[lr]["status"] == "completed" and int(rows[lr]["reports"]) == 3 for lr in (3e-3, 1e-3)), printed
    trained = [r for r in rows.values() if r["status"] != "error"]
    assert len({r["node_id"] for r in trained}) == 2  # one CPU per node, two trials at once: both nodes trained
    best = json.loads((output / "best" / "trial.json").read_text())
    assert best["optim.lr"] in (3e-3, 1e-3) and (output / "best" / "checkpoint" / "meta.json").exists()
    from lampretrain.models.multitask import MultiTaskModel

    assert MultiTaskModel.load(output / "best" / "model.pt").dataset_names[-1] == "feo"

    parent, children = child_runs(output)
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in trained}
    assert {c.info.run_id: c.info.status for c in children}[rows[50.0]["mlflow_run_id"]] == "KILLED"
    logs = {p: p.stat().st_mtime_ns for p in (output / "trials").glob("*/trial.log")}
    assert len(logs) == 4

    # the re-run on a local Ray replays the finished trials: no training, no new child run; the failed trial runs
    # (and fails) again. A process of its own: Ray reads RAY_AUTH_MODE once per process, at import
    lampretrain_sweep(root, env)
    again = summary(output)
    for lr in (3e-3, 1e-3, 50.0):
        assert again[lr]["status"].startswith("cached") and again[lr]["mlflow_run_id"] == rows[lr]["mlflow_run_id"]
    assert again[50.0]["status"] == "cached (stopped early)" and again[-1.0]["status"] == "error"
    changed = {p for p, t in logs.items() if p.stat().st_mtime_ns != t}
    assert changed == {Path(rows[-1.0]["trial_dir"]) / "trial.log"}
    again_parent, again_children = child_runs(output)
    assert again_parent == parent and len(again_children) == len(children)
