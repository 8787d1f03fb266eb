"""`lampretrain bench scaling` as a script; the implementation lives in lampretrain/bench/scaling.py."""

import sys

from lampretrain.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
