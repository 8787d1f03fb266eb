"""Preemption as clusters deliver it: SIGTERM or SIGUSR1 to the whole process group of a training run.

Slurm (time limit, scancel, preemption) and Kubernetes signal every process of a job, so the DataLoader worker
processes get the signal too. The trainer must still finish its step, write a checkpoint at the step it reached,
exit with the documented code, and a resume from that checkpoint must end bitwise where an uninterrupted run ends.
Real processes: a plain ``lampretrain pretrain`` and ``torchrun --nproc_per_node 2`` (gloo), loader workers on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lampretrain.train import checkpoint as ckpt

from finetune_support import training_store
from test_train import ENV, REPO, pretrain_cmd, run, saved_tensors, write_recipe

FINAL = 10  # train.steps of every run here; the signal lands a few steps after the step-2 checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return training_store(tmp_path_factory.mktemp("store"))


SECTIONS = {"data": {"workers": 1}, "train": {"steps": FINAL, "eval_every": 3}, "checkpoint": {"every": 2, "keep": 10},
            "tracking": {"enabled": False}}
# torchrun forwards only TERM/INT/HUP/QUIT unless told (SIGUSR1 would kill it at once); the Slurm template tells it
# the same way. torchrun 2.13 overwrites TORCHELASTIC_SIGNALS_TO_HANDLE from its --signals-to-handle option, whose
# environment form is PET_SIGNALS_TO_HANDLE.
TORCHRUN_ENV = {**ENV, "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


def single_cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lampretrain.cli", "pretrain", str(recipe), *extra]


def preempt(cmd: list[str], root: Path, sig: signal.Signals, log: Path, env: dict) -> tuple[int, str]:
    """Start ``cmd`` in a session of its own, signal its process group once the step-2 checkpoint exists, and
    return (exit code, output). The step-2 checkpoint means the signal handlers and the loader workers are up."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        deadline = time.time() + 240
        while not (root / "step-000000002").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        try:
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return code, log.read_text()


def assert_bitwise(a_dir: Path, b_dir: Path, tmp_path: Path) -> None:
    a, b = saved_tensors(a_dir, tmp_path), saved_tensors(b_dir, tmp_path)
    assert a.keys() == b.keys()
    compared = [k for k in a if k.startswith(("/model", "/optim", "/ema"))]
    assert len(compared) > 50
    for k in compared:
        assert torch.equal(a[k], b[k]), k


def check_preempted_then_resume(tmp_path: Path, store: Path, sig: signal.Signals, nproc: int) -> None:
    launch = (lambda r, *x: pretrain_cmd(r, *x, nproc=nproc)) if nproc > 1 else single_cmd
    env = TORCHRUN_ENV if nproc > 1 else ENV
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    reference = write_recipe(tmp_path / "ref", store, **SECTIONS)
    recipe = write_recipe(tmp_path / "cut", store, **SECTIONS)
    root = tmp_path / "cut" / "run" / "checkpoints"

    code, out = preempt(launch(recipe), root, sig, tmp_path / "preempted.log", env)
    # a plain process exits 0; torchrun exits 1 after its own SignalException, once its ranks have exited
    assert code == (1 if nproc > 1 else 0), out[-4000:]
    assert "killed by signal" not in out, out[-4000:]
    # the write time and the time since the signal size the grace a cluster must give (docs/clusters/slurm.md)
    reached = re.search(r"\[lampretrain\] preempted: checkpoint (\S+) at step (\d+) \(written in [0-9.]+ s, "
                        r"[0-9.]+ s after the signal\)", out)
    assert reached, out[-4000:]
    step = int(reached.group(2))
    assert 2 < step < FINAL  # the step it was in when the signal came, not a periodic checkpoint
    newest = ckpt.checkpoint_dirs(root)[-1]
    assert newest == (step, Path(reached.group(1)))
    ckpt.verify(newest[1])
    assert ckpt.read_meta(newest[1])["step"] == step
    if nproc > 1:  # torchrun itself got the signal and passed it on (the ranks are in sessions of their own)
        assert f"Received {sig!s} death signal, shutting down workers" in out, out[-4000:]

    resumed = run(launch(recipe, "--resume", "auto"))
    assert f"resumed from {newest[1]} at step {step}" in resumed.stdout
    run(launch(reference))
    assert_bitwise(tmp_path / "ref" / "run" / "checkpoints" / f"step-{FINAL:09d}", root / f"step-{FINAL:09d}", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_group_signal_single_process_checkpoints_and_resumes_bitwise(store, tmp_path, sig):
    check_preempted_then_resume(tmp_path, store, sig, nproc=1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_group_signal_torchrun_two_ranks_checkpoints_and_resumes_bitwise(store, tmp_path, sig):
    check_preempted_then_resume(tmp_path, store, sig, nproc=2)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_ends_every_process_of_the_run(store, tmp_path):
    """Ctrl-C (SIGINT to the process group) is a preemption: the step finishes, a checkpoint is written, the
    run exits 0, and its loader workers end with it (before, the exit waited forever for a worker that ignored
    the SIGTERM multiprocessing sends its children at exit)."""
    (tmp_path / "cut").mkdir()
    recipe = write_recipe(tmp_path / "cut", store, **SECTIONS)
    root = tmp_path / "cut" / "run" / "checkpoints"
    code, out = preempt(single_cmd(recipe), root, signal.SIGINT, tmp_path / "interrupted.log", ENV)
    assert code == 0, out[-4000:]
    reached = re.search(r"\[lampretrain\] preempted: checkpoint (\S+) at step (\d+)", out)
    assert reached and 2 < int(reached.group(2)) < FINAL, out[-4000:]
    ckpt.verify(Path(reached.group(1)))
    assert "Traceback" not in out and "killed by signal" not in out, out[-4000:]
    leftover = subprocess.run(["pgrep", "-f", str(recipe)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the run still alive: {leftover}"
