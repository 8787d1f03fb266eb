"""Multi-task ablation (heads, balancing, denoising) as a script; the implementation lives in lampretrain/bench/ablation.py."""

import sys

from lampretrain.bench.ablation import main

if __name__ == "__main__":
    sys.exit(main())
