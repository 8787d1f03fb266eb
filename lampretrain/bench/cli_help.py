"""How fast the command line answers: wall time of ``lampretrain [VERB] --help``, each run in a fresh interpreter.

    lampretrain bench cli                      every verb, 5 runs each
    lampretrain bench cli --verbs pretrain evaluate --repeat 9

Prints one JSON line per verb: ``bench, verb, repeat, median_s, min_s, max_s`` and the ``python_s`` of a bare
interpreter start measured the same way (the floor no lazy import can go under). A run is
``python -m lampretrain.cli VERB --help``, what the ``lampretrain`` console script runs; the first run of each
verb is timed too, so a cold file cache shows up in ``max_s``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from lampretrain.bench.common import emit

VERBS = ["", "demo", "prep", "inspect", "pretrain", "finetune", "change-bias", "sweep", "evaluate", "export",
         "launch", "bench"]


def wall_times(argv: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lampretrain bench cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbs", nargs="+", default=VERBS, metavar="VERB",
                   help="verbs to time ('' is `lampretrain --help`; default: all)")
    p.add_argument("--repeat", type=int, default=5, help="runs per verb (default: %(default)s)")
    args = p.parse_args(argv)
    python_s = statistics.median(wall_times([sys.executable, "-c", "pass"], args.repeat))
    for verb in args.verbs:
        times = wall_times([sys.executable, "-m", "lampretrain.cli", *([verb] if verb else []), "--help"], args.repeat)
        emit({"bench": "cli", "verb": verb or "lampretrain", "repeat": args.repeat,
              "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
              "max_s": round(max(times), 3), "python_s": round(python_s, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
