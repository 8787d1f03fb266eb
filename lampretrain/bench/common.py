"""What every benchmark shares: one JSON line per result, the dated results file, peak memory, skipped peers.

Every line a benchmark emits is printed and, when a results file is set (``lampretrain bench`` sets
``benchmarks/results/<date>-<machine>.jsonl`` unless ``--no-save``), appended to it with the
machine, date and one-minute load average, so that a number can always be traced to where and
when it was measured.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any

_results_file: Path | None = None


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss` (MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count (Linux ``clear_refs`` 5), so that phases of one process are measured apart.

    Freed objects are collected and glibc's free heap handed back first (``malloc_trim``), so the new count
    starts from what is really in use rather than from an earlier phase's high-water heap.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    """The CPU model name of /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_slug(name: str) -> str:
    """``Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz`` → ``xeon-platinum-8375c``: trademarks, clock and filler dropped."""
    name = re.sub(r"\((R|TM|C)\)|@.*$|\b(CPU|Processor|Intel|AMD|\d+-Core)\b", " ", name, flags=re.IGNORECASE)
    return _slug(name) or "unknown"


@functools.lru_cache(maxsize=1)
def machine_descriptor() -> str:
    """A short, hostname-independent name of the hardware: ``h200`` (first CUDA device) or ``cpu<cores>-<model>``."""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = re.sub(r"\b(NVIDIA|GeForce|Tesla)\b|-?\d+GB\b|\bSXM\d?\b|\bPCIe\b|\bHBM\w*\b", " ",
                         torch.cuda.get_device_name(0), flags=re.IGNORECASE)
            count = torch.cuda.device_count()
            return (f"{count}x" if count > 1 else "") + (_slug(gpu) or "gpu")
    except Exception:  # a broken CUDA install still benchmarks on the CPU
        pass
    return f"cpu{os.cpu_count()}-{_cpu_slug(cpu_model())}"


def today() -> str:
    return datetime.date.today().isoformat()


def default_results_path(root: Path | None = None) -> Path:
    """``benchmarks/results/<YYYY-MM-DD>-<machine>.jsonl`` under the working directory (or ``root``)."""
    return (root or Path.cwd()) / "benchmarks" / "results" / f"{today()}-{machine_descriptor()}.jsonl"


def set_results_file(path: str | Path | None) -> Path | None:
    """Append every later :func:`emit` to ``path`` (None: print only). Returns the previous setting."""
    global _results_file
    previous, _results_file = _results_file, (Path(path) if path else None)
    return previous


def results_file() -> Path | None:
    return _results_file


def pop_save_options(argv: list[str]) -> tuple[list[str], Path | None]:
    """Take ``--results PATH`` / ``--no-save`` out of a benchmark's arguments; returns (rest, results file or None)."""
    rest, path, save = [], default_results_path(), True
    it = iter(argv)
    for arg in it:
        if arg == "--no-save":
            save = False
        elif arg == "--results":
            try:
                path = Path(next(it))
            except StopIteration:
                raise SystemExit("--results expects a file path") from None
        elif arg.startswith("--results="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, (path if save else None)


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def emit(result: dict[str, Any], json_out: str | None = None) -> dict[str, Any]:
    """Print ``result`` as one JSON line; append it to ``json_out`` and to the results file when set."""
    if _results_file is not None:
        result = {**result, "machine": machine_descriptor(), "date": today(), "load1": _load1()}
    line = json.dumps(result, sort_keys=False)
    print(line, file=sys.stdout, flush=True)
    targets = {Path(p).resolve() for p in (json_out, _results_file) if p}
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as fh:
            fh.write(line + "\n")
    return result


def skipped(bench: str, peer: str, reason: str, **case: Any) -> dict[str, Any]:
    """The line reported for a peer that could not run here: never a made-up number."""
    return {"bench": bench, "peer": peer, "skipped": reason, **case}
