"""Relax a structure (positions and cell) with a trained checkpoint.

    python examples/relax.py CHECKPOINT STRUCTURE [--dataset mptrj] [--fmax 0.05] [--out relaxed.extxyz]
"""

from __future__ import annotations

import argparse

from ase.io import read, write

from lampretrain.inference import Calculator
from lampretrain.inference.stability import relax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("structure", help="any file ASE reads")
    parser.add_argument("--dataset", default="mptrj", help="dataset head (default: %(default)s)")
    parser.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="relaxed.extxyz")
    args = parser.parse_args()
    calc = Calculator.from_checkpoint(args.checkpoint, dataset=args.dataset, device=args.device)
    result = relax(read(args.structure), calc, fmax=args.fmax, steps=args.steps)
    print(f"E {result.initial_energy:.4f} → {result.energy:.4f} eV in {result.steps} steps, "
          f"max force {result.fmax:.4f} eV/Å, converged: {result.converged}")
    write(args.out, result.atoms)


if __name__ == "__main__":
    main()
