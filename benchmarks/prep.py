"""`lampretrain bench prep` as a script; the implementation lives in lampretrain/bench/prep.py."""

import sys

from lampretrain.bench.prep import main

if __name__ == "__main__":
    sys.exit(main())
