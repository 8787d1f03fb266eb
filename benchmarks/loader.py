"""`lampretrain bench loader` as a script; the implementation lives in lampretrain/bench/loader.py."""

import sys

from lampretrain.bench.loader import main

if __name__ == "__main__":
    sys.exit(main())
