"""glibc mmap threshold (lampretrain/malloc.py): the auto rule, and that a fixed threshold really keeps a freed
mid-sized tensor's memory out of the heap (checked with glibc's own counters, in a fresh process)."""

import os
import subprocess
import sys

import pytest

from lampretrain import malloc

PROBE = """
import ctypes, sys
import torch
from lampretrain import malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "fixed":
    assert malloc.set_mmap_threshold(4.0)
torch.empty(20 * 2**20, dtype=torch.uint8)  # freed at once: glibc's dynamic threshold rises to 20 MB
before = libc.mallinfo2().hblks
x = torch.empty(8 * 2**20, dtype=torch.uint8)
print(libc.mallinfo2().hblks - before)
"""


def test_auto_fixes_the_threshold_only_for_line_graph_models():
    assert malloc.resolve("auto", 3.2) == malloc.LINE_GRAPH_THRESHOLD_MB
    assert malloc.resolve("auto", 0.0) is None
    assert malloc.resolve(None, 3.2) is None
    assert malloc.resolve(2, 0.0) == 2.0
    assert malloc.set_mmap_threshold(None) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("mode, mapped", [("fixed", 1), ("default", 0)])
def test_fixed_threshold_maps_tensors_the_dynamic_one_would_put_on_the_heap(mode, mapped):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout.strip()) == mapped


def test_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert malloc.set_mmap_threshold(4.0) is False
