"""A short Langevin molecular-dynamics run with a trained checkpoint.

    python examples/md.py CHECKPOINT STRUCTURE [--dataset mptrj] [--temperature 300] [--steps 200]
"""

from __future__ import annotations

import argparse

from ase import units
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from lampretrain.inference import Calculator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("structure", help="any file ASE reads")
    parser.add_argument("--dataset", default="mptrj", help="dataset head (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=300.0, help="K (default: %(default)s)")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    atoms = read(args.structure)
    atoms.calc = Calculator.from_checkpoint(args.checkpoint, dataset=args.dataset, device=args.device)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature)
    dyn = Langevin(atoms, args.timestep * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs)

    def report() -> None:
        e_pot, e_kin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        print(f"step {dyn.nsteps:5d}  E_pot {e_pot:12.4f}  E_kin {e_kin:8.4f}  T {e_kin / (1.5 * units.kB * len(atoms)):7.1f} K")

    dyn.attach(report, interval=20)
    dyn.run(args.steps)


if __name__ == "__main__":
    main()
