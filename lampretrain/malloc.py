"""glibc malloc's mmap threshold: the setting that decides whether dense MatRIS training fits in 4 GB on CPU.

PyTorch's CPU tensors come from ``malloc``. glibc serves a request above the
*mmap threshold* with a mapping of its own, returned to the system at
``free``; smaller requests come from heaps, which fragment and keep the
pages they have touched. By default the threshold is dynamic: every freed
mapping raises it to that mapping's size (up to 32 MiB). After one training
step of matris-10m on the 20-atom Cu cell (27,148 bond pairs) every
angle-sized tensor (27,148 × 128 × 4 B = 14 MB) therefore lives on a heap,
and fragmentation doubles the peak: 5.2 GB, against 2.67 GB with the
threshold fixed at 4 MiB (16 MiB, still above those tensors: 4.8 GB). A
fixed threshold costs a page fault per fresh page of every large tensor:
training steps of matris-4m on that cell took 1.3-1.7x as long at 4 MiB as
at 32 MiB, and dpa4-air inference on 214 Cu atoms 1.24x. So the recipes keep
glibc's default (``train.malloc_mmap_threshold_mb: null``) and a memory-bound
run sets 4, or ``auto``: 4 MiB where the model has a line graph (the
per-angle tensors that fragment), the default otherwise. (Releasing free heap
pages with ``malloc_trim`` at each block's backward instead: 4.4 GB at 1.35x.
The opposite, a threshold of 1 GiB that keeps every tensor on the heap, made dpa4-air
on 694 Cu atoms slower, not faster: 43 vs 68 atoms/s inference, 10 vs 16
training.)

Setting ``MALLOC_MMAP_THRESHOLD_`` in the environment does the same before
the process starts; an explicit environment setting is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
LINE_GRAPH_THRESHOLD_MB = 4.0


def resolve(setting: float | str | None, three_body_cutoff: float) -> float | None:
    """The threshold in MiB for a recipe's ``setting`` (``auto``, a number of MiB, or None for glibc's dynamic
    default) and a model whose three-body cutoff is ``three_body_cutoff`` (0: no line graph)."""
    if setting == "auto":
        return LINE_GRAPH_THRESHOLD_MB if three_body_cutoff > 0 else None
    if setting is None:
        return None
    return float(setting)


def set_mmap_threshold(mb: float | None) -> bool:
    """Fix glibc's mmap threshold at ``mb`` MiB for the rest of the process (None: leave malloc alone). Returns
    whether it was set: False where malloc is not glibc's or ``MALLOC_MMAP_THRESHOLD_`` is in the environment."""
    if mb is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, musl without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # the threshold is an int: < 2 GiB
    return mallopt(M_MMAP_THRESHOLD, int(mb * 2**20)) == 1
