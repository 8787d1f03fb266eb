"""`lampretrain bench nve` as a script (same options, results saved the same way); see lampretrain/bench/."""

import sys

from lampretrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "balance", *sys.argv[1:]]))
