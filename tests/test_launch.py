"""lampretrain launch: Slurm/K8s rendering, validation before submission, and a 2-node loopback run.

The Slurm scripts are not only parsed (``bash -n``): they are executed with stand-ins for ``srun``,
``scontrol`` and the launchers on PATH, so the rendezvous arguments, the hostfile and the preemption
path (USR1 → trainer → requeue) are checked as bash actually runs them.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lampretrain.config import ConfigError
from lampretrain.launch import cli as launch_cli
from lampretrain.launch.manifests import check_manifest
from lampretrain.launch.profile import parse_profile

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "demo-matris.yaml"
SLURM = {"name": "t", "resources": {"nodes": 2, "gpus_per_node": 4}, "slurm": {"partition": "gpu", "account": "a1"}}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lampretrain")
    launch_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def launch(argv: list[str]) -> int:
    return launch_cli.run(_parser().parse_args(["launch", *argv]))


def _profile(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _render(tmp_path: Path, profile: dict, *extra: str, target: Path = RECIPE) -> str:
    out = tmp_path / "job.out"
    assert launch([str(target), "--profile", _profile(tmp_path, profile), "--output", str(out), *extra]) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    from lampretrain.prep.pipeline import prepare
    from lampretrain.prep.spec import load_spec

    store = tmp_path_factory.mktemp("launch") / "store"
    spec = load_spec(REPO_ROOT / "data_prep" / "demo.yaml", {"output": str(store)})
    prepare(spec, workers=1, progress=False)
    return store


def _stubs(tmp_path: Path) -> Path:
    """srun (runs its command), scontrol (two nodes; records requeue) and launchers that record their
    arguments and, on USR1 or TERM, record the signal and exit like a trainer that checkpointed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n',
        "scontrol": 'if [[ "$1 $2" == "show hostnames" ]]; then printf "node1\\nnode2\\n"; '
        'else echo "$@" $([[ -e "$STUB_LOG/checkpointed" ]] && echo after-checkpoint) >> "$STUB_LOG/scontrol"; fi\n',
        "launcher": 'printf "%s\\n" "$(basename "$0")" "$@" > "$STUB_LOG/args"\n'
        'echo "${PET_SIGNALS_TO_HANDLE:-}" > "$STUB_LOG/signals-to-handle"\n'
        '[[ "$*" == *--hostfile* ]] && cp "$2" "$STUB_LOG/hostfile"\n'
        'checkpoint() { echo "$1" >> "$STUB_LOG/signal"; sleep "${STUB_CHECKPOINT_S:-0}"; '
        'touch "$STUB_LOG/checkpointed"; exit 0; }\n'
        'trap "checkpoint USR1" USR1\ntrap "checkpoint TERM" TERM\n'
        'touch "$STUB_LOG/started"\nwhile true; do sleep 0.05; done\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    for name in ("torchrun", "deepspeed"):
        (bin_dir / name).symlink_to(bin_dir / "launcher")
    return bin_dir


def _run_preempted(tmp_path: Path, script: str, term_after_s: float | None = None) -> tuple[int, Path]:
    """Run the batch script with the stubs, send it USR1 like Slurm does, return its exit code and logs.

    ``term_after_s``: also send TERM that long after USR1 (the time limit, or scancel, during the checkpoint);
    the stub trainer then takes 1 s to checkpoint."""
    logs = tmp_path / "stub-logs"
    logs.mkdir()
    (tmp_path / "job.sbatch").write_text(script)
    env = {
        **os.environ, "PATH": f"{_stubs(tmp_path)}:{os.environ['PATH']}", "STUB_LOG": str(logs),
        "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(tmp_path), "STUB_CHECKPOINT_S": "0" if term_after_s is None else "1",
    }
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 20
    while not (logs / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the launcher never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    if term_after_s is not None:
        time.sleep(term_after_s)
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20), logs


def test_slurm_torchrun_script_rendezvous_and_requeue(tmp_path):
    script = _render(tmp_path, SLURM | {"paths": {"output": str(tmp_path / "runs")}}, "--cluster", "slurm")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    lines = [line.strip() for line in script.splitlines()]
    for expected in (
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --account=a1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")', 'HEAD=${NODES[0]}',
        "torchrun --nnodes \"$SLURM_NNODES\" --nproc_per_node 4 \\",
        '--rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \\',
        "trap 'on_preempt USR1' USR1", 'scontrol requeue "$SLURM_JOB_ID"',
        "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    ):
        assert expected in lines, expected
    code, logs = _run_preempted(tmp_path, script)
    assert code == 0
    args = (logs / "args").read_text().split("\n")
    assert args[:7] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "4242"]
    assert args[args.index("--rdzv_endpoint") + 1] == "node1:29500"
    assert args[args.index("pretrain") + 2 : args.index("pretrain") + 4] == ["--resume", "auto"]
    assert f"output={tmp_path / 'runs'}/demo-matris" in args
    assert (logs / "signal").read_text().strip() == "USR1"  # forwarded to the trainer
    assert (logs / "scontrol").read_text().strip() == "requeue 4242 after-checkpoint"  # then requeued
    # torchrun 2.13 forwards USR1 only when told through PET_SIGNALS_TO_HANDLE (else USR1 kills it at once)
    assert "SIGUSR1" in (logs / "signals-to-handle").read_text().strip().split(",")


def test_slurm_script_outlives_a_second_signal_until_the_checkpoint(tmp_path):
    """TERM during the USR1 checkpoint (time limit, scancel) must not end the job before the trainer has exited:
    the batch script is what keeps the allocation, and the requeue must follow the checkpoint, once."""
    script = _render(tmp_path, SLURM | {"paths": {"output": str(tmp_path / "runs")}}, "--cluster", "slurm")
    code, logs = _run_preempted(tmp_path, script, term_after_s=0.3)
    assert code == 0
    assert (logs / "signal").read_text().split() == ["USR1"]  # the trainer was asked once
    assert (logs / "scontrol").read_text().splitlines() == ["requeue 4242 after-checkpoint"]


def test_slurm_deepspeed_script_hostfile_and_node_rank(tmp_path):
    profile = SLURM | {"slurm": {"partition": "gpu", "log_dir": str(tmp_path / "logs"), "port": 29611}}
    (tmp_path / "logs").mkdir()
    script = _render(tmp_path, profile, "--cluster", "slurm", "--launcher", "deepspeed", "--set", "train.steps=7")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    code, logs = _run_preempted(tmp_path, script)
    assert code == 0
    assert (logs / "hostfile").read_text() == "node1 slots=4\nnode2 slots=4\n"
    args = (logs / "args").read_text().split("\n")
    head = ["deepspeed", "--hostfile", str(tmp_path / "logs" / "hostfile-4242"), "--no_ssh", "--node_rank", "0",
            "--master_addr", "node1", "--master_port", "29611", "--no_local_rank", "--module", "lampretrain.cli",
            "pretrain", str(RECIPE), "--resume", "auto", "--set", "train.steps=7"]
    assert args[: len(head)] == head
    assert (logs / "signal").read_text().strip() == "TERM"  # the DeepSpeed launcher forwards TERM only
    assert (logs / "scontrol").read_text().strip() == "requeue 4242 after-checkpoint"


def test_ray_on_slurm_script(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("trials: 4\n")
    script = _render(tmp_path, SLURM, "--cluster", "ray-slurm", target=sweep)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    lines = [line.strip() for line in script.splitlines()]
    for expected in (
        'HEAD=${NODES[0]}',
        'srun --nodes=1 --ntasks=1 -w "$HEAD" \\',
        'ray start --head --node-ip-address="$HEAD_IP" --port=6379 --dashboard-host=127.0.0.1 \\',
        "--include-dashboard=false --num-gpus=4 --block &",
        'srun --nodes=1 --ntasks=1 -w "$node" \\',
        'ray start --address="$ADDRESS" --num-gpus=4 --block &',
        f'python -m lampretrain.cli sweep {sweep} --address "$ADDRESS" &',
        "export RAY_AUTH_MODE=token",  # every ray start, the readiness check and the sweep inherit it
        "export RAY_AUTH_TOKEN_PATH=$RAY_JOB_DIR/auth_token",
    ):
        assert expected in lines, expected
    assert "0.0.0.0" not in script
    # the token step itself, run by bash: a fresh 256-bit token in a file only its owner can read
    token_step = next(line for line in lines if "secrets.token_hex" in line)
    job = tmp_path / "jobdir"
    env = {**os.environ, "RAY_JOB_DIR": str(job)}
    assert subprocess.run(["bash", "-c", f"set -euo pipefail; {token_step}"], env=env).returncode == 0
    token = job / "auth_token"
    assert len(token.read_text().strip()) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(job.stat().st_mode) == 0o700
    assert lines.index('for node in "${NODES[@]:1}"; do') < lines.index("deadline=$((SECONDS + 300))")


K8S = {
    "name": "k",
    "resources": {"nodes": 3, "gpus_per_node": 8, "cpus_per_task": 32, "memory": "200Gi"},
    "kubernetes": {"image": "reg/lam:1", "volumes": [{"name": "shared", "claim": "pvc1", "mount_path": "/shared"}]},
    "paths": {"data": "/shared/store", "output": "/shared/runs"},
}


def test_pytorchjob_manifest(tmp_path):
    doc = yaml.safe_load(_render(tmp_path, K8S, "--cluster", "k8s"))
    assert check_manifest(doc) == []
    specs = doc["spec"]["pytorchReplicaSpecs"]
    assert doc["spec"]["nprocPerNode"] == "8"
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    for rtype in ("Master", "Worker"):
        (container,) = specs[rtype]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"name": "shared", "mountPath": "/shared", "readOnly": False} in container["volumeMounts"]
        cmd = container["command"]
        assert cmd[:5] == ["torchrun", "--nnodes", "3", "--nproc_per_node", "8"]
        assert cmd[cmd.index("pretrain") + 2 : cmd.index("pretrain") + 4] == ["--resume", "auto"]
        assert "data.store=/shared/store" in cmd and "output=/shared/runs/demo-matris" in cmd
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["nprocPerNode"] = 8
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    del broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["image"]
    found = check_manifest(broken)
    assert any(p.startswith("spec.nprocPerNode") for p in found)
    assert any(p.startswith("spec.pytorchReplicaSpecs.Master.replicas") for p in found)
    assert any(p.endswith("containers[0].image: required") for p in found)


def test_rayjob_manifest(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("trials: 4\n")
    doc = yaml.safe_load(_render(tmp_path, K8S, "--cluster", "k8s", "--job", "sweep", target=sweep))
    assert check_manifest(doc) == []
    assert doc["spec"]["entrypoint"] == f"python -m lampretrain.cli sweep {sweep} --address auto"
    cluster = doc["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    # the head's job API listens on the pod address (KubeRay's submitter and status polls come from other pods),
    # so it must be behind Ray token authentication, which needs Ray >= 2.52
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == "2.60.0"
    unauthenticated = yaml.safe_load(yaml.safe_dump(doc))
    del unauthenticated["spec"]["rayClusterSpec"]["authOptions"]
    assert check_manifest(unauthenticated) == [
        "spec.rayClusterSpec.authOptions.mode: 'token' required, the dashboard listens on 0.0.0.0"]
    unauthenticated["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "127.0.0.1"
    assert check_manifest(unauthenticated) == []
    old_ray = yaml.safe_load(yaml.safe_dump(doc))
    old_ray["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.0"
    assert check_manifest(old_ray) == [
        "spec.rayClusterSpec.rayVersion: '2.9.0'; token authentication needs Ray >= 2.52"]
    del cluster["headGroupSpec"]["rayStartParams"]
    group["minReplicas"] = 5
    found = check_manifest(doc)
    assert "spec.rayClusterSpec.headGroupSpec.rayStartParams: required, a mapping of strings" in found
    assert any("minReplicas <= replicas <= maxReplicas" in p for p in found)


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An sbatch on PATH that records the scripts it is given."""
    bin_dir = tmp_path / "sbin"
    bin_dir.mkdir()
    record = tmp_path / "submitted"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$1" >> {record}\necho "Submitted batch job 7"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return record


def test_submit_runs_sbatch_after_validation(tmp_path, fake_sbatch, capsys):
    out = tmp_path / "job.sbatch"
    profile = SLURM | {"slurm": {"partition": "gpu", "log_dir": str(tmp_path / "logs")}}
    assert launch([str(RECIPE), "--cluster", "slurm", "--profile", _profile(tmp_path, profile), "--output", str(out),
                   "--submit"]) == 0
    assert fake_sbatch.read_text().split() == [str(out)]
    assert (tmp_path / "logs").is_dir()  # Slurm would not create the log directory itself
    assert "Submitted batch job 7" in capsys.readouterr().out


@pytest.mark.parametrize(
    "profile, extra, field",
    [
        ({"resources": {"nodes": 2, "gpus_per_node": 4}}, [], "slurm.partition: required for --cluster slurm"),
        (SLURM, ["--gpus-per-node", "0"], "resources.gpus_per_node: must be >= 1 (GPUs per node on a GPU cluster)"),
        (SLURM, ["--nodes", "0"], "resources.nodes: must be >= 1, got 0"),
        (SLURM | {"paths": {"data": "/nonexistent/lam/store"}}, [], "paths.data: /nonexistent/lam/store does not exist"),
        (SLURM, ["--set", "engine.backend=nccl", "--profile-set", "resources.gpu=false"],
         "engine.backend: nccl needs a GPU per rank"),
    ],
)
def test_bad_profile_fails_before_submission(tmp_path, fake_sbatch, capsys, profile, extra, field):
    out = tmp_path / "job.sbatch"
    code = launch([str(RECIPE), "--cluster", "slurm", "--profile", _profile(tmp_path, profile), "--output", str(out),
                   "--submit", *extra])
    assert code == 2
    assert field in capsys.readouterr().err
    assert not out.exists() and not fake_sbatch.exists()


def test_remote_paths_skip_the_existence_check(tmp_path):
    profile = SLURM | {"paths": {"data": "/nonexistent/lam/store", "output": "/nonexistent/lam/runs"}}
    assert "data.store=/nonexistent/lam/store" in _render(tmp_path, profile, "--cluster", "slurm", "--remote-paths")


def test_profile_schema_names_the_key():
    with pytest.raises(ConfigError, match="profile: slurm: unknown key 'partion'; allowed keys: partition"):
        parse_profile({"slurm": {"partion": "gpu"}})
    with pytest.raises(ConfigError, match="profile: slurm.time: '1 day'"):
        parse_profile({"slurm": {"time": "1 day"}})
    with pytest.raises(ConfigError, match="volume 'v': give exactly one of claim, host_path"):
        parse_profile({"kubernetes": {"volumes": [{"name": "v", "mount_path": "/v"}]}})


def test_k8s_paths_must_be_on_a_mounted_volume(tmp_path, capsys):
    profile = K8S | {"paths": {"data": "/elsewhere/store"}}
    assert launch([str(RECIPE), "--cluster", "k8s", "--profile", _profile(tmp_path, profile)]) == 2
    assert "paths.data: '/elsewhere/store' is not under any kubernetes.volumes mount_path" in capsys.readouterr().err


def test_world_size_must_fit_the_training_frames(tmp_path, demo_store, capsys):
    from lampretrain.launch.validate import _training_frames
    from lampretrain.recipe import load_recipe

    frames = _training_frames(load_recipe(RECIPE, [f"data.store={demo_store}"]))
    assert frames and frames > 1
    profile = SLURM | {"paths": {"data": str(demo_store)}, "resources": {"nodes": frames + 1, "gpus_per_node": 1}}
    assert launch([str(RECIPE), "--cluster", "slurm", "--profile", _profile(tmp_path, profile)]) == 2
    assert f"world size {frames + 1} (resources.nodes {frames + 1} x resources.gpus_per_node 1) exceeds the " \
           f"{frames} 'train' frames" in capsys.readouterr().err


def test_local_node_commands_share_one_rendezvous(tmp_path, demo_store, capsys):
    assert launch([str(RECIPE), "--cluster", "local", "--nodes", "2", "--gpus-per-node", "1", "--dry-run",
                   "--port", "29777", "--set", f"data.store={demo_store}"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2
    for k, cmd in enumerate(commands):
        assert f"--nnodes 2 --node_rank {k} --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:29777" in cmd
        assert cmd.endswith(f"pretrain {RECIPE} --resume auto --set data.store={demo_store}")


@pytest.mark.slow
def test_local_two_nodes_train_and_checkpoint(tmp_path, demo_store):
    """Two torchrun "nodes" on loopback join one rendezvous, train the demo recipe and checkpoint."""
    from lampretrain.train.checkpoint import checkpoint_dirs, read_meta

    run_dir = tmp_path / "run"
    code = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_launch import launch; sys.exit(launch(sys.argv[1:]))",
         str(RECIPE), "--cluster", "local", "--nodes", "2", "--gpus-per-node", "1",
         "--set", f"data.store={demo_store}", "--set", f"output={run_dir}", "--set", "train.steps=2",
         "--set", "checkpoint.every=1", "--set", "train.progress=false", "--set", "train.device=cpu",
         "--set", "train.eval_every=null",
         "--set", "tracking.enabled=false"],
        cwd=REPO_ROOT, timeout=600,
    ).returncode
    assert code == 0
    steps = [step for step, _ in checkpoint_dirs(run_dir / "checkpoints")]
    assert steps and max(steps) == 2
    meta = read_meta(checkpoint_dirs(run_dir / "checkpoints")[-1][1])
    assert meta["world_size"] == 2 and meta["step"] == 2
