"""Change-bias: refit a head's element references on a store's frames, and energy errors per store.

Three users: the trainer after its last step (``train.refit_references``), fine-tuning before
step 0, and ``lampretrain change-bias`` on a saved model.

δ = argmin_δ Σ_f |E_f − Ê_f − Σ_z n_fz δ_z| / N_f in float64 (a weighted least-absolute-deviations
fit, solved exactly as a linear program), then ref_k[z] += δ_z. δ = 0 is a candidate, so the
per-atom energy MAE of the head on these frames can only go down (a least-squares fit, as
deepmd-kit's ``change-bias`` "delta" mode uses, lowers the squared error but can raise the MAE
when the residuals are skewed); the backbone and the head's MLP are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from ..config import ConfigError
from ..graph.batch import GraphBatch
from ..graph.datasets import GraphCollate, LmdbFrameDataset
from ..models import graph_cutoffs
from ..models.multitask import MultiTaskModel
from ..objectives.metrics import energy_per_atom_mae
from ..store.index import StoreIndex


def store_batches(
    store: str, heads: dict[str, int], split: str = "train", max_natoms: int | None = None, graphs: int = 16, *,
    cutoffs: tuple[float, float], max_frames: int | None = None,
) -> Iterator[GraphBatch]:
    """Batches of every labelled frame of ``split`` whose store dataset is a key of ``heads`` (name → head index),
    with graphs at ``cutoffs`` (pair, three-body; Å: the model's); with ``max_frames`` that many evenly spaced
    ones (a trajectory keeps its early and late frames)."""
    index = StoreIndex.open(store)
    sel = index.select(split, list(heads), max_natoms, required=False)
    rows = sel.rows
    if max_frames is not None and rows.size > max_frames:
        rows = rows[np.unique(np.linspace(0, rows.size - 1, max_frames).round().astype(int))]
    frames = LmdbFrameDataset.from_rows(index, split, rows)
    collate = GraphCollate(*cutoffs, dict(heads))
    for start in range(0, len(frames), graphs):
        yield collate([frames[i] for i in range(start, min(start + graphs, len(frames)))])


class NoEnergyLabels(ValueError):
    """The frames to evaluate carry no energy label."""


@dataclass
class EnergyErrors:
    label: np.ndarray  # (F,) eV
    prediction: np.ndarray  # (F,) eV
    natoms: np.ndarray  # (F,)
    numbers: list[np.ndarray]  # atomic numbers per frame

    @property
    def energy_per_atom_mae(self) -> float:
        """:data:`~lampretrain.objectives.metrics.energy_per_atom_mae` over the frames, eV/atom."""
        pred, label, natoms = (torch.from_numpy(a) for a in (self.prediction, self.label, self.natoms))
        return float(energy_per_atom_mae(pred, label, n_atoms=natoms))

    def shifted(self, delta: dict[int, float]) -> "EnergyErrors":
        """The same frames after ref[z] += δ_z: each prediction moves by Σ_z n_z δ_z (backbone and heads unchanged)."""
        moved = np.array([sum(delta.get(int(z), 0.0) for z in numbers) for numbers in self.numbers])
        return replace(self, prediction=self.prediction + moved)


def energy_errors(model: MultiTaskModel, batches: Iterator[GraphBatch], device: torch.device | str = "cpu") -> EnergyErrors:
    """Energies of the labelled frames of ``batches``, each on the head its dataset id names."""
    was_training = model.training
    model.eval()
    label, pred, natoms, numbers = [], [], [], []
    try:
        for batch in batches:
            batch = batch.to(device)
            with torch.no_grad():
                energy = model(batch, compute_forces=False, compute_stress=False)["energy"]
            mask = batch.energy_mask.cpu().numpy()
            counts = batch.n_atoms.cpu().numpy()
            split = np.split(batch.numbers.cpu().numpy(), np.cumsum(counts)[:-1])
            label.append(batch.energy.double().cpu().numpy()[mask])
            pred.append(energy.double().cpu().numpy()[mask])
            natoms.append(counts[mask])
            numbers.extend(z for z, m in zip(split, mask) if m)
    finally:
        model.train(was_training)
    if not numbers:
        raise NoEnergyLabels("no frames with an energy label to evaluate")
    return EnergyErrors(np.concatenate(label), np.concatenate(pred), np.concatenate(natoms).astype(np.float64), numbers)


def least_absolute_shift(counts: np.ndarray, residual: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """argmin_δ Σ_f w_f |r_f − C_f·δ| as the LP min Σ w_f u_f s.t. −u ≤ r − Cδ ≤ u (HiGHS, exact)."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity, vstack

    n_frames, n_elements = counts.shape
    c_mat = csr_matrix(counts.astype(np.float64))
    eye = identity(n_frames, format="csr")
    a_ub = vstack([hstack([c_mat, -eye]), hstack([-c_mat, -eye])])
    b_ub = np.concatenate([residual, -residual])
    cost = np.concatenate([np.zeros(n_elements), weight])
    bounds = [(None, None)] * n_elements + [(0, None)] * n_frames
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if not result.success:
        raise RuntimeError(f"reference refit did not converge: {result.message}")
    return result.x[:n_elements]


def reference_shift(errors: EnergyErrors) -> dict[int, float]:
    """δ_z (eV per atom of z) minimising the per-atom energy MAE Σ_f |E_f − Ê_f − Σ_z n_fz δ_z| / N_f."""
    elements = np.unique(np.concatenate(errors.numbers))
    counts = np.stack([np.bincount(np.searchsorted(elements, z), minlength=elements.size) for z in errors.numbers])
    delta = least_absolute_shift(counts, errors.label - errors.prediction, 1.0 / errors.natoms)
    return {int(z): float(d) for z, d in zip(elements, delta)}


@torch.no_grad()
def apply_shift(model: MultiTaskModel, head: str, delta: dict[int, float]) -> None:
    """ref_head[z] += δ_z in the model and in its config (so an exported model carries the refit)."""
    k = model.dataset_index(head)
    table = model.references.table
    for z, d in delta.items():
        table[k, z] += d
    spec = model.config.datasets[k]
    refs = dict(spec.element_references)
    for z, d in delta.items():
        refs[z] = refs.get(z, 0.0) + d
    spec.element_references = refs


def change_bias(model: MultiTaskModel, head: str, batches: Iterator[GraphBatch]) -> dict[int, float]:
    """Refit head ``head``'s references on ``batches`` (every graph evaluated on that head); returns δ."""
    delta = reference_shift(energy_errors(model, (model.for_dataset(b, head) for b in batches)))
    apply_shift(model, head, delta)
    return delta


@dataclass
class Refit:
    dataset: str
    frames: int
    mae_before: float  # eV/atom on the refit frames
    mae_after: float
    delta: dict[int, float]  # eV per atom of element z; empty when the split has no energy labels (refs kept)


def refit_store_references(
    model: MultiTaskModel, store: str, datasets: list[str] | None = None, split: str = "train",
    max_frames: int | None = None, device: torch.device | str = "cpu",
) -> list[Refit]:
    """Change-bias of every head named by a dataset of ``store`` (or of ``datasets``) on that dataset's ``split``
    frames (at most ``max_frames`` each), graphs at the model's cutoffs; deepmd-kit's ``dp change-bias``. A dataset
    without energy-labelled frames there keeps its references (a Refit with 0 frames)."""
    names = datasets or [n for n in StoreIndex.open(store).datasets if n in model.dataset_names]
    if not names:
        raise ConfigError(f"{store}: none of its datasets is a head of this model ({', '.join(model.dataset_names)})")
    refits = []
    for name in names:
        model.dataset_index(name)  # names the heads when it is not one of them

        batches = store_batches(store, {name: 0}, split, cutoffs=graph_cutoffs(model), max_frames=max_frames)
        try:
            before = energy_errors(model, (model.for_dataset(b, name) for b in batches), device)
        except NoEnergyLabels:
            refits.append(Refit(name, 0, float("nan"), float("nan"), {}))
            continue
        delta = reference_shift(before)
        apply_shift(model, name, delta)
        after = before.shifted(delta)
        refits.append(Refit(name, before.label.size, before.energy_per_atom_mae, after.energy_per_atom_mae, delta))
    return refits

