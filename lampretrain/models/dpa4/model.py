"""The DPA4 backbone: equivariant node features (N, (L+1)², C) after the interaction blocks."""

from __future__ import annotations

import contextlib
from types import MappingProxyType

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ...graph.batch import GraphBatch, edge_vectors
from ..backbone import NodeFeatures
from .block import InteractionBlock
from .config import DPA4Config
from .embedding import EnvironmentSeed, RadialMLP, geometric_embedding
from .ffn import ScalarReadoutFFN
from .geometry import EdgeGeometry


class DPA4(nn.Module):
    """SE(3)-equivariant backbone (a :class:`~lampretrain.models.backbone.Backbone`): its heads read the
    degree-0 block as scalars and the degree-1 block as Cartesian vectors."""

    three_body_cutoff = 0.0
    default_heads = MappingProxyType({})  # HeadsConfig's defaults
    # the single-task energy readout of checkpoints written before the multi-task heads took its place
    retired_keys = ("readout",)

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        self.config = cfg
        c = cfg.channels
        self.geometry = EdgeGeometry(cfg)
        self.type_embedding = nn.Embedding(cfg.n_elements, c)
        nn.init.normal_(self.type_embedding.weight, std=(cfg.n_elements + c) ** -0.5)
        self.radial = RadialMLP(cfg)
        self.env_seed = EnvironmentSeed(cfg) if cfg.env_seed else None
        self.blocks = nn.ModuleList(InteractionBlock(cfg) for _ in range(cfg.n_blocks))
        # not "readout": that name is retired (checkpoints of the old single-task readout drop it)
        self.output_ffn = ScalarReadoutFFN(cfg) if cfg.readout_ffn else None

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    @property
    def node_channels(self) -> int:
        return self.config.channels

    @property
    def vector_channels(self) -> int:
        return self.config.channels

    def layers(self) -> list[nn.Module]:
        embeddings = [self.geometry, self.type_embedding, self.radial, *([self.env_seed] if self.env_seed else [])]
        return [nn.ModuleList(embeddings), *self.blocks, *([self.output_ffn] if self.output_ffn is not None else [])]

    def node_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> NodeFeatures:
        """Degree 0 of :meth:`equivariant_features` (N, C) and degree 1 as Cartesian (x, y, z) vectors (N, 3, C)."""
        x = self.equivariant_features(batch, positions, cell)
        scalar = x[:, 0] if self.output_ffn is None else self.output_ffn(x[:, 0])
        # packing ι(l, m) = l² + l + m puts (m = −1, 0, 1) ↦ (y, z, x) at indices 1, 2, 3
        return NodeFeatures(scalar, x[:, [3, 1, 2]])

    def equivariant_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Equivariant node features (N, (L+1)², C) after the last block; degree l ≥ 1 turns with D^l."""
        cfg = self.config
        # eager inference only: the check reads the numbers on the host, which a training step must not wait
        # for and a traced (export, compile) program cannot do
        if not (self.training or torch.compiler.is_compiling() or is_fake(batch.numbers)) and batch.numbers.numel():
            low, high = int(batch.numbers.min()), int(batch.numbers.max())
            if low < 1 or high > cfg.n_elements:
                raise ValueError(f"DPA4: atomic numbers must lie in 1..{cfg.n_elements}, got {low}..{high}")
        species = batch.numbers - 1
        n = positions.shape[0]
        geo = self.geometry(
            edge_vectors(positions, cell, batch), batch.edge_index, n, roll=self.training and cfg.random_roll
        )
        radial = self.radial(geo)  # (E, L+1, C)
        t = self.type_embedding(species)  # (N, C)
        scalar = self.env_seed(t, species, geo) if self.env_seed is not None else t
        x = torch.cat([scalar[:, None], geometric_embedding(radial, geo, cfg.lmax)[:, 1:]], dim=1)  # (N, D, C)
        radial = radial + (t[geo.dst] + t[geo.src])[:, None]
        autocast = (
            torch.autocast(positions.device.type, dtype=torch.bfloat16)
            if cfg.autocast_bf16
            else contextlib.nullcontext()
        )
        with autocast:
            for block in self.blocks:
                x = block(x, geo, radial)
        return x.to(positions.dtype)
