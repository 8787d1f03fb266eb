"""MatRIS hyper-parameters and the released sizes."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import override
from ..layers.norms import NORMS


@dataclass(frozen=True)
class MatRISConfig:
    """Sizes of a MatRIS backbone; defaults are the released 10M model (spec §5)."""

    num_layers: int = 10
    atom_dim: int = 128
    bond_dim: int = 128
    angle_dim: int = 128
    # the released energy and magmom heads: build(name)'s default heads (multi-task recipes set model.heads)
    readout_hidden: tuple[int, ...] = (128, 256, 128)
    magmom_hidden: int = 256
    num_radial: int = 7
    num_angular: int = 7  # 2K + 1 Fourier functions
    cutoff: float = 6.0
    three_body_cutoff: float = 4.5
    envelope_exponent: int = 8
    norm: str = "layer"
    num_elements: int = 94
    smoothed_edge_delta: bool = True  # atom-graph refinement updates bonds from envelope-weighted messages
    # True: both attentions weight each edge's softmax share and message by its bond's envelope (each angle's by
    # both bonds'), so the energy is C¹ where a distance crosses either cutoff (attention.py); same parameters.
    # False: the published MatRIS, whose attention terms jump there (released weights reproduce it exactly)
    smooth: bool = True
    # training only: recompute line-graph layers (also in the force graph, layers/recompute.py) when a batch
    # has more angles; None: never. Otherwise each block keeps ~55 kB per angle for the double backward:
    # 4096 keeps a 10-layer step within ~4 GB (27k angles recomputed: ~2.5 GB; not: ~15 GB). Recomputing
    # costs ~1.6x the step time; the official threshold, 60000, suits an 80 GB GPU.
    checkpoint_angles: int | None = 4096

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm: unknown norm '{self.norm}'; allowed: {', '.join(NORMS)}")
        if self.num_angular % 2 != 1:
            raise ValueError(f"num_angular: must be odd (1 + 2K Fourier terms), got {self.num_angular}")
        if self.three_body_cutoff > self.cutoff:
            raise ValueError(f"three_body_cutoff: {self.three_body_cutoff} exceeds cutoff {self.cutoff}")

    def with_overrides(self, **overrides) -> "MatRISConfig":
        """A copy with the given fields changed, validated by the one config validator (key, type, range)."""
        return override(self, overrides)


MATRIS_10M = MatRISConfig()
MATRIS_4M = MatRISConfig(num_layers=4)
