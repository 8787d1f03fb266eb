"""`lampretrain bench model` as a script; the implementation lives in lampretrain/bench/model_step.py."""

import sys

from lampretrain.bench.model_step import main

if __name__ == "__main__":
    sys.exit(main())
