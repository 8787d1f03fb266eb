"""`lampretrain bench balance` as a script; the implementation lives in lampretrain/bench/balance.py."""

import sys

from lampretrain.bench.balance import main

if __name__ == "__main__":
    sys.exit(main())
