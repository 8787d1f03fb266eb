"""An ASE calculator around a lampretrain model.

Energies in eV, forces in eV/Å, stress in eV/Å³ with ASE's sign in Voigt order
(xx, yy, zz, yz, xz, xy). Every call rebuilds the neighbor and angle lists.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from ..frames import Frame
from ..graph.batch import collate


class Calculator(AseCalculator):
    """ASE calculator: energy, free_energy, forces, stress and, where the model has them, magmoms.

    ``model_or_checkpoint`` must be a model module for now; loading checkpoint
    files waits for the trainer's checkpoint format. ``dataset`` selects the
    per-dataset head by name once models have them (index 0 until then).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "magmoms"]

    def __init__(
        self,
        model_or_checkpoint: torch.nn.Module | str,
        dataset: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model_or_checkpoint, torch.nn.Module):
            raise NotImplementedError(
                f"Calculator: loading a checkpoint ({model_or_checkpoint!r}) is not supported yet; pass a model module"
            )
        self.model = model_or_checkpoint.to(device=device, dtype=dtype).eval()
        self.dataset = dataset
        self.device = torch.device(device)
        self.dtype = dtype
        config = getattr(self.model, "config", None)
        self.cutoff = float(getattr(config, "cutoff", 6.0))
        self.three_body_cutoff = float(getattr(config, "three_body_cutoff", 0.0))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.any())
        frame = Frame(
            positions=self.atoms.positions,
            numbers=self.atoms.numbers,
            cell=self.atoms.cell.array if periodic else None,
            pbc=self.atoms.pbc,
            dataset=self.dataset or "",
        ).validate()
        dataset_ids = {self.dataset: 0} if self.dataset else None
        batch = collate(
            [frame], dataset_ids=dataset_ids, cutoff=self.cutoff, three_body_cutoff=self.three_body_cutoff, dtype=self.dtype
        ).to(self.device)
        out = self.model(batch, compute_forces=True, compute_stress=periodic)
        energy = float(out["energy"].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if periodic:
            s = out["stress"][0].detach().cpu().double().numpy()
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        if "magmoms" in out:
            self.results["magmoms"] = out["magmoms"].detach().cpu().double().numpy()
