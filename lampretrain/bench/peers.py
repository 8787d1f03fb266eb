"""The peer codes the benchmarks run side by side, how to install each, and why one is skipped here.

A peer runs in the same process as lampretrain on the same inputs when it imports; otherwise the
benchmark emits ``{"bench": ..., "peer": ..., "skipped": reason}`` (see :func:`common.skipped`).

deepmd-kit is the exception: its 3.2.0 wheel's PyTorch ops are built for torch 2.11.0 and refuse other
torch releases, so it gets a virtual environment of its own, outside the repository::

    python3.11 -m venv ~/.cache/lampretrain/deepmd-venv
    ~/.cache/lampretrain/deepmd-venv/bin/pip install 'torch==2.11.0' 'deepmd-kit==3.2.0' mpich e3nn vesin-torch ase

(``mpich``: ``deepmd.pt`` locates MPI through that wheel; ``e3nn``: the DPA4 descriptor imports it;
``vesin-torch``: its CPU neighbor list). ``lampretrain bench model --model dpa4-*`` then runs
``bench/peer_deepmd.py`` under that interpreter in a subprocess (see :func:`deepmd_python` for how the
interpreter is found) and reports the peer's own JSON line, its memory measured in its own process.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class Peer:
    name: str  # as reported in the JSON lines
    module: str  # what must import for the peer to run
    install: str  # the command that installs it
    note: str = ""  # why it may be unusable even when installed


PEERS = {
    "matris": Peer("matris-official", "matris", "pip install 'lampretrain[peers]'  (matris==0.1.0)"),
    "deepmd-kit": Peer(
        "deepmd-kit", "deepmd.pt.model.model",
        "python3.11 -m venv ~/.cache/lampretrain/deepmd-venv && ~/.cache/lampretrain/deepmd-venv/bin/pip install 'torch==2.11.0' "
        "'deepmd-kit==3.2.0' mpich e3nn vesin-torch ase",
        note="the PyPI wheel's PyTorch ops are built for torch 2.11.0, so it runs in a venv of its own: build it "
        "with the command above, then pass --peer-python ~/.cache/lampretrain/deepmd-venv/bin/python or set LAMPRETRAIN_DEEPMD_PYTHON "
        "(the default location is found by itself)",
    ),
    "fairchem": Peer(
        "fairchem-core", "fairchem.core.datasets", "pip install 'lampretrain[peer-fairchem]'  (fairchem-core==2.24.0)",
        note="fairchem-core 2.24 pins lmdb<=1.7.3 and pulls cuda-python, nvidia-cutlass-dsl, warp-lang and "
        "nvalchemi-toolkit-ops",
    ),
    "ase-db": Peer("ase-db", "ase.db", "pip install ase ase-db-backends"),
}


def load(key: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when peer ``key`` imports, else (None, the reason it is skipped)."""
    peer = PEERS[key]
    try:
        return importlib.import_module(peer.module), None
    except ImportError as err:
        reason = f"not installed ({err.name or err}): {peer.install}"
        return None, reason + (f"; {peer.note}" if peer.note else "")
    except Exception as err:  # e.g. deepmd-kit refusing a torch it was not built for
        reason = f"installed but unusable here: {type(err).__name__}: {str(err).splitlines()[0]}"
        return None, reason + (f"; {peer.note}" if peer.note else "")


DEEPMD_VENV_PYTHON = Path.home() / ".cache" / "lampretrain" / "deepmd-venv" / "bin" / "python"  # where the install command above puts it
DEEPMD_PYTHON_ENV = "LAMPRETRAIN_DEEPMD_PYTHON"
DEEPMD_SCRIPT = Path(__file__).with_name("peer_deepmd.py")


def deepmd_python(explicit: str | None = None) -> tuple[str | None, str | None]:
    """(the interpreter that runs ``peer_deepmd.py``, None), or (None, why deepmd-kit is skipped).

    In order: ``explicit`` (``--peer-python``), ``$LAMPRETRAIN_DEEPMD_PYTHON``, the venv the install command
    builds, and this interpreter when deepmd-kit imports here.
    """
    given = explicit or os.environ.get(DEEPMD_PYTHON_ENV)
    if given:
        if not os.access(given, os.X_OK):
            return None, f"peer interpreter {given} is not an executable file; build it with: {PEERS['deepmd-kit'].install}"
        return given, None
    if os.access(DEEPMD_VENV_PYTHON, os.X_OK):
        return str(DEEPMD_VENV_PYTHON), None
    module, reason = load("deepmd-kit")
    return (sys.executable, None) if module is not None else (None, reason)


def deepmd_descriptor(config) -> dict:
    """deepmd-kit 3.2.0 ``DescrptSeZM`` arguments matching a :class:`~lampretrain.models.dpa4.config.DPA4Config`."""
    return {
        "channels": config.channels, "lmax": config.lmax, "mmax": config.mmax, "n_blocks": config.n_blocks,
        "mixing_layers": config.so2_layers, "n_focus": config.n_focus, "focus_dim": config.focus_dim,
        "radial_so2_rank": config.rank, "n_radial": config.n_radial, "rcut": config.cutoff,
        "env_exp": [config.rbf_exponent, config.edge_exponent], "ffn_neurons": config.ffn_hidden,
        "use_env_seed": config.env_seed, "random_gamma": config.random_roll,
    }


def run_deepmd(python: str, structures: str, config, *, model: str, mode: str, device: str, threads: int,
               repeat: int, warmup: int, amp: bool) -> tuple[dict | None, str | None]:
    """(deepmd-kit's JSON line from ``peer_deepmd.py`` run under ``python``, None) or (None, why it failed)."""
    cmd = [python, str(DEEPMD_SCRIPT), "--structures", str(structures), "--mode", mode, "--device", device,
           "--threads", str(threads), "--repeat", str(repeat), "--warmup", str(warmup), "--model", model,
           "--descriptor", json.dumps(deepmd_descriptor(config))] + (["--amp"] if amp else [])
    # deepmd applies these when it is imported (and warns without them); inter-op threads idle in eager mode
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DP_INTRA_OP_PARALLELISM_THREADS": str(threads),
           "DP_INTER_OP_PARALLELISM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the peer's interpreter must not see this environment's packages
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} {DEEPMD_SCRIPT.name} exited with {proc.returncode}: {tail}"
    return json.loads(lines[-1]), None
