"""The peer codes the benchmarks run side by side, how to install each, and why one is skipped here.

A peer runs in the same process as lampretrain on the same inputs when it imports; otherwise the
benchmark emits ``{"bench": ..., "peer": ..., "skipped": reason}`` (see :func:`common.skipped`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Peer:
    name: str  # as reported in the JSON lines
    module: str  # what must import for the peer to run
    install: str  # the command that installs it
    note: str = ""  # why it may be unusable even when installed


PEERS = {
    "matris": Peer("matris-official", "matris", "pip install 'lampretrain[peer-matris]'  (matris==0.1.0)"),
    "deepmd-kit": Peer(
        "deepmd-kit", "deepmd.pt.model.model", "pip install 'lampretrain[peer-deepmd]'  (deepmd-kit==3.2.0)",
        note="the PyPI wheel's PyTorch ops are built for torch 2.11.0 (deepmd-kit[torch] pins torch==2.11.0)",
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
