"""Per-dataset sampling weights and the frames an epoch draws from each dataset.

Strategies (the same semantics as fairchem's ConcatDataset options and JMP's
temperature default):

- ``proportional``: p_i ∝ n_i, every frame once per epoch;
- ``temperature``: p_i ∝ n_i^(1/T) (T = 1 is proportional, T → ∞ uniform; JMP uses T ≈ 2);
- ``uniform``: p_i = 1/K;
- ``explicit``: p_i ∝ the user's ratios.

An epoch holds ``epoch_size`` frames (default: all frames); dataset i
contributes round(p_i · epoch_size) of them: a prefix of a fresh permutation
of its frames when under-sampled, whole permutations repeated when
over-sampled (no frame repeats before all of its dataset was seen).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

STRATEGIES = ("proportional", "temperature", "uniform", "explicit")


def dataset_weights(
    sizes: Sequence[int] | np.ndarray,
    strategy: str = "proportional",
    temperature: float = 1.0,
    ratios: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Sampling probability of each dataset, (K,) summing to 1 (p_i ∝ n_i^(1/T) for ``temperature``)."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 0).any():
        raise ValueError(f"dataset sizes must be a non-empty list of counts >= 0, got {list(n)}")
    if strategy == "proportional":
        w = n.copy()
    elif strategy == "temperature":
        if not temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        w = np.where(n > 0, n ** (1.0 / temperature), 0.0)
    elif strategy == "uniform":
        w = (n > 0).astype(np.float64)
    elif strategy == "explicit":
        if ratios is None or len(ratios) != n.size:
            raise ValueError(f"explicit sampling needs one ratio per dataset ({n.size}), got {ratios}")
        w = np.asarray(ratios, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all():
            raise ValueError(f"sampling ratios must be finite and >= 0, got {list(w)}")
        bad = np.nonzero((w > 0) & (n == 0))[0]
        if bad.size:
            raise ValueError(f"dataset {int(bad[0])} has ratio {w[bad[0]]} but no frames")
    else:
        raise ValueError(f"unknown sampling strategy '{strategy}', allowed: {', '.join(STRATEGIES)}")
    if w.sum() <= 0:
        raise ValueError("all sampling weights are zero")
    return w / w.sum()


def epoch_counts(sizes: Sequence[int] | np.ndarray, weights: np.ndarray, epoch_size: int | None = None) -> np.ndarray:
    """Frames drawn from each dataset in one epoch: round(p_i · epoch_size) by largest remainder (sums exactly)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum()) if epoch_size is None else int(epoch_size)
    exact = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(exact + 1e-9).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def effective_mix(
    indices: np.ndarray,
    dataset: np.ndarray,
    natoms: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    weights: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Share of frames (and atoms) each dataset actually has among ``indices``, next to its target weight.

    The trainer logs this once per epoch: it is the mix the model sees, after
    rounding, over-sampling and any cap on the epoch size.
    """
    dataset = np.asarray(dataset, dtype=np.int64)
    k = int(dataset.max()) + 1 if dataset.size else 0
    if weights is not None:
        k = max(k, len(weights))
    drawn = dataset[indices]
    frames = np.bincount(drawn, minlength=k)
    atoms = None
    if natoms is not None:
        atoms = np.bincount(drawn, weights=np.asarray(natoms, dtype=np.float64)[indices], minlength=k)
    return mix_table(frames, atoms, names, weights)


def mix_table(
    frames: np.ndarray,
    atoms: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    weights: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`effective_mix` from per-dataset counts of frames (and atoms) drawn: shares next to the targets."""
    k = len(frames) if weights is None else max(len(frames), len(weights))
    frames = np.pad(np.asarray(frames, dtype=np.float64), (0, k - len(frames)))
    names = list(names) if names is not None else [str(i) for i in range(k)]
    share = frames / max(frames.sum(), 1.0)
    if atoms is not None:
        atoms = np.pad(np.asarray(atoms, dtype=np.float64), (0, k - len(atoms)))
        atoms = atoms / max(atoms.sum(), 1.0)
    out: dict[str, dict[str, float]] = {}
    for i in range(k):
        entry = {"frames": float(share[i])}
        if atoms is not None:
            entry["atoms"] = float(atoms[i])
        if weights is not None:
            entry["target"] = float(weights[i])
        out[names[i]] = entry
    return out


def weights_from_mapping(names: Sequence[str], ratios: Mapping[str, float]) -> np.ndarray:
    """Explicit ratios given by dataset name (a recipe's ``{name: ratio}``) in ``names`` order; unknown names raise."""
    unknown = sorted(set(ratios) - set(names))
    if unknown:
        raise ValueError(f"sampling ratios name unknown datasets {unknown}; datasets are {list(names)}")
    return np.array([float(ratios.get(n, 0.0)) for n in names])
