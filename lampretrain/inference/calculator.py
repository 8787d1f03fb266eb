"""An ASE calculator around a lampretrain model.

Energies in eV, forces in eV/Å, stress in eV/Å³ with ASE's sign in Voigt order
(xx, yy, zz, yz, xz, xy). Every call rebuilds the neighbor and angle lists with
the model's own cutoffs. A multi-task model is evaluated with one dataset's
head and element references, chosen by name.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from ..config import ConfigError
from ..frames import Frame
from ..graph.batch import collate
from ..models import graph_cutoffs
from .loading import load_model


def voigt(stress: np.ndarray) -> np.ndarray:
    """3×3 stress → ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])


def atoms_to_frame(atoms: Atoms, dataset: str = "") -> Frame:
    periodic = bool(atoms.pbc.any())
    return Frame(
        positions=atoms.positions,
        numbers=atoms.numbers,
        cell=atoms.cell.array if periodic else None,
        pbc=atoms.pbc,
        dataset=dataset,
    ).validate()


def head_dataset(model: torch.nn.Module, dataset: str | None) -> str | None:
    """The dataset whose head and references evaluate ``model``: ``dataset`` (checked against the model's), the
    only one when the model has one head and none was named, None for a plain backbone (no heads to pick)."""
    names = list(getattr(model, "dataset_names", []))
    if not names:
        return None
    if dataset is None:
        if len(names) == 1:
            return names[0]
        raise ConfigError(f"this model has one head per dataset; pass dataset= one of: {', '.join(names)}")
    model.dataset_index(dataset)  # raises naming the datasets
    return dataset


def evaluate_frames(
    model: torch.nn.Module,
    frames: Sequence[Frame],
    dataset: str | None,
    cutoffs: tuple[float, float],
    dtype: torch.dtype,
    device: str | torch.device,
    compute_forces: bool = True,
    compute_stress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """The model's outputs for ``frames`` as one batch (graphs built on the CPU with ``cutoffs``, the pair and
    three-body cutoffs of :func:`graph_cutoffs`), on ``device``, not detached. ``compute_stress=None``: when any
    frame is periodic."""
    batch = collate(frames, cutoff=cutoffs[0], three_body_cutoff=cutoffs[1], dtype=dtype).to(device)
    if compute_stress is None:
        compute_stress = any(bool(f.pbc.any()) for f in frames)
    kwargs: dict[str, Any] = {"dataset": dataset} if dataset is not None else {}
    return model(batch, compute_forces=compute_forces, compute_stress=compute_stress, **kwargs)


class Calculator(AseCalculator):
    """ASE calculator: energy, free_energy, forces, stress and, where the model has them, magmoms.

    ``model_or_checkpoint``: a model module, or a path (trainer checkpoint
    directory, run directory, or :meth:`MultiTaskModel.save` file) loaded by
    :meth:`from_checkpoint`. ``dataset`` picks the head of a multi-task model
    (required when it has more than one); plain backbones ignore it.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "magmoms"]

    def __init__(
        self,
        model_or_checkpoint: torch.nn.Module | str | os.PathLike,
        dataset: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        model = model_or_checkpoint
        if not isinstance(model, torch.nn.Module):
            model = load_model(model)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.dataset = self._check_dataset(dataset)
        self.cutoff, self.three_body_cutoff = graph_cutoffs(self.model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        dataset: str | None = "mptrj",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: str = "ema",
        **kwargs,
    ) -> "Calculator":
        """Load a trained model (EMA weights when the run kept them; ``weights="model"`` for the raw ones)."""
        return cls(load_model(path, weights), dataset=dataset, device=device, dtype=dtype, **kwargs)

    @property
    def datasets(self) -> list[str]:
        return list(getattr(self.model, "dataset_names", []))

    def _check_dataset(self, dataset: str | None) -> str | None:
        return head_dataset(self.model, dataset)

    def _forward(self, atoms_list: Sequence[Atoms]) -> dict[str, torch.Tensor]:
        frames = [atoms_to_frame(a) for a in atoms_list]
        out = evaluate_frames(
            self.model, frames, self.dataset, (self.cutoff, self.three_body_cutoff), self.dtype, self.device
        )
        return {k: v.detach().cpu().double() for k, v in out.items()}

    def calculate_batch(self, atoms_list: Sequence[Atoms], batch_size: int = 32) -> list[dict[str, Any]]:
        """Results (as ``self.results`` would hold them) for many structures, ``batch_size`` per forward pass."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(atoms_list), batch_size):
            chunk = atoms_list[start : start + batch_size]
            out = self._forward(chunk)
            ends = np.cumsum([len(a) for a in chunk])
            for g, (atoms, end) in enumerate(zip(chunk, ends)):
                results.append(self._unpack(out, g, end - len(atoms), end, bool(atoms.pbc.any())))
        return results

    @staticmethod
    def _unpack(out: dict[str, torch.Tensor], g: int, a: int, b: int, periodic: bool) -> dict[str, Any]:
        energy = float(out["energy"][g])
        res: dict[str, Any] = {"energy": energy, "free_energy": energy, "forces": out["forces"][a:b].numpy()}
        if periodic:
            res["stress"] = voigt(out["stress"][g].numpy())
        if "magmoms" in out:
            res["magmoms"] = out["magmoms"][a:b].numpy()
        return res

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        out = self._forward([self.atoms])
        self.results = self._unpack(out, 0, 0, len(self.atoms), bool(self.atoms.pbc.any()))
