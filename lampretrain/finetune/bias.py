"""Change-bias: refit one head's element references on new data before step 0, and energy errors per store.

δ = argmin_δ Σ_f (E_f − Ê_f − Σ_z n_fz δ_z)² in float64 (``prep.stats.element_references``
on the residuals label − prediction), then ref_k[z] += δ_z. δ = 0 is a candidate, so
the squared error of the head on these frames can only go down; the backbone and
the head's MLP are untouched (deepmd-kit's ``change-bias`` in its "delta" mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..graph.batch import GraphBatch
from ..graph.datasets import GraphCollate, LmdbFrameDataset
from ..models.multitask import MultiTaskModel
from ..prep.stats import element_references
from ..store.index import StoreIndex


def store_batches(
    store: str, heads: dict[str, int], split: str = "train", max_natoms: int | None = None, graphs: int = 16
) -> Iterator[GraphBatch]:
    """Batches of every labelled frame of ``split`` whose store dataset is a key of ``heads`` (name → head index)."""
    index = StoreIndex.open(store)
    unknown = sorted(set(heads) - set(index.datasets))
    if unknown:
        raise ValueError(f"{store}: no dataset(s) {unknown} (has {index.datasets})")
    rows = index.rows(split)
    wanted = [index.datasets.index(n) for n in heads]
    keep = np.isin(index.dataset[rows], wanted)
    if max_natoms is not None:
        keep &= index.natoms[rows] <= max_natoms
    frames = LmdbFrameDataset.from_index(index, split)
    collate = GraphCollate(index.cutoff, index.three_body_cutoff, dict(heads))
    positions = np.nonzero(keep)[0]
    for start in range(0, positions.size, graphs):
        yield collate([frames[int(i)] for i in positions[start : start + graphs]])


@dataclass
class EnergyErrors:
    label: np.ndarray  # (F,) eV
    prediction: np.ndarray  # (F,) eV
    natoms: np.ndarray  # (F,)
    numbers: list[np.ndarray]  # atomic numbers per frame

    @property
    def mae_per_atom(self) -> float:
        """Mean |E − Ê| / N over the frames, eV/atom."""
        return float(np.mean(np.abs(self.label - self.prediction) / self.natoms))


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
        raise ValueError("no frames with an energy label to evaluate")
    return EnergyErrors(np.concatenate(label), np.concatenate(pred), np.concatenate(natoms).astype(np.float64), numbers)


def reference_shift(errors: EnergyErrors) -> dict[int, float]:
    """δ_z (eV per atom of z) minimising Σ_f (E_f − Ê_f − Σ_z n_fz δ_z)², float64 least squares."""
    elements = np.unique(np.concatenate(errors.numbers))
    counts = np.stack([np.bincount(np.searchsorted(elements, z), minlength=elements.size) for z in errors.numbers])
    delta = element_references(counts, errors.label - errors.prediction)
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
