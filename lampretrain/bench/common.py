"""What every benchmark shares: one JSON line per result, optional copy to a file, peak memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict[str, Any], json_out: str | None = None) -> None:
    line = json.dumps(result, sort_keys=False)
    print(line, file=sys.stdout, flush=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(json_out, "a") as fh:
            fh.write(line + "\n")
