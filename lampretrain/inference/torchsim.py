"""A TorchSim model around a lampretrain model: batched MD and relaxation with TorchSim's integrators and optimizers.

:class:`LampretrainModel` is a ``torch_sim.models.interface.ModelInterface``. Each call evaluates every system of
the ``SimState`` as one graph batch, built as the ASE :class:`~lampretrain.inference.Calculator` builds it (the
model's own cutoffs, graphs on the CPU, then moved to the model's device), with the same head choice. Outputs
in TorchSim's layout and lampretrain's units: energy (n_systems,) eV, forces (n_atoms, 3) eV/Å, stress
(n_systems, 3, 3) eV/Å³ with ASE's sign (positive = tensile, as TorchSim's cell optimizers and barostats
expect), and magmoms (n_atoms,) where the model has them; all detached, in the model's dtype on its device.

A ``SimState`` has one ``pbc`` flag for all its systems: a non-periodic state (molecules) gets NaN stress when
stress is asked for, as TorchSim marks a stress a model does not give, never zeros.

Needs the ``torchsim`` extra (``pip install "lampretrain[torchsim]"``, TorchSim 0.3).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import UserError, one_line
from ..frames import Frame
from ..models import graph_cutoffs
from .calculator import evaluate_frames, head_dataset
from .loading import load_model

EXTRA = 'pip install "lampretrain[torchsim]"'


class TorchSimMissingError(UserError, ImportError):
    """TorchSim is not installed (the ``torchsim`` extra)."""


try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as err:
    raise TorchSimMissingError(
        f"lampretrain.inference.torchsim needs TorchSim (torch-sim-atomistic), which did not import "
        f"({one_line(str(err))}): {EXTRA}"
    ) from None


def state_frames(state: "ts.SimState") -> list[Frame]:
    """One :class:`Frame` per system of ``state`` (positions in Å; ASE's row-vector cell when periodic)."""
    positions = state.positions.detach().cpu().double().numpy()
    numbers = state.atomic_numbers.detach().cpu().numpy().astype(np.int64)
    cells = state.row_vector_cell.detach().cpu().double().numpy()
    ends = np.cumsum(state.n_atoms_per_system.cpu().numpy())
    periodic = bool(state.pbc)
    pbc = np.full(3, periodic)
    frames = []
    for g, end in enumerate(ends):
        start = 0 if g == 0 else ends[g - 1]
        frames.append(Frame(
            positions=positions[start:end],
            numbers=numbers[start:end],
            cell=cells[g] if periodic else None,
            pbc=pbc,
        ).validate())
    return frames


class LampretrainModel(ModelInterface):
    """TorchSim model: energy, forces, stress (and magmoms where the model has them) for a batch of systems.

    ``model_or_checkpoint``: a model module, or a path that :func:`~lampretrain.inference.load_model` reads
    (model file, trainer checkpoint directory, run directory, directory ``lampretrain import`` wrote; ``weights``
    picks EMA or raw weights). ``dataset`` picks the head of a multi-task model as for the ASE calculator
    (required when it has more than one). ``compute_forces``/``compute_stress`` may be switched after
    construction.
    """

    def __init__(
        self,
        model_or_checkpoint: torch.nn.Module | str | os.PathLike,
        dataset: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: str = "ema",
        compute_forces: bool = True,
        compute_stress: bool = True,
    ):
        super().__init__()
        model = model_or_checkpoint
        if not isinstance(model, torch.nn.Module):
            model = load_model(model, weights)
        self._device = torch.device(device)
        self._dtype = dtype
        self.model = model.to(device=self._device, dtype=dtype).eval()
        self.dataset = head_dataset(self.model, dataset)
        self.cutoffs = graph_cutoffs(self.model)
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"  # radial cutoffs: edges grow with density

    @property
    def compute_forces(self) -> bool:
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def compute_stress(self) -> bool:
        return self._compute_stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    @property
    def datasets(self) -> list[str]:
        return list(getattr(self.model, "dataset_names", []))

    def forward(self, state: "ts.SimState | dict[str, torch.Tensor]", **kwargs) -> dict[str, torch.Tensor]:
        """energy (n_systems,), forces (n_atoms, 3) and stress (n_systems, 3, 3) as switched on, magmoms (n_atoms,)
        where the model has them. ``state`` is not changed."""
        if isinstance(state, dict):
            state = ts.SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        periodic = bool(state.pbc)
        stress = self._compute_stress and periodic
        with torch.enable_grad():  # forces and stress are autograd derivatives of the energy
            out = evaluate_frames(
                self.model, state_frames(state), self.dataset, self.cutoffs, self._dtype, self._device,
                compute_forces=self._compute_forces, compute_stress=stress,
            )
        results = {"energy": out["energy"].detach()}
        if self._compute_forces:
            results["forces"] = out["forces"].detach()
        if self._compute_stress:
            results["stress"] = out["stress"].detach() if periodic else torch.full(
                (state.n_systems, 3, 3), float("nan"), dtype=self._dtype, device=self._device
            )
        if "magmoms" in out:
            results["magmoms"] = out["magmoms"].detach()
        return results
