"""The official MatRIS code (PyPI ``matris`` 0.1.0) as a peer of ``lampretrain bench model``.

The official model is built with the hyper-parameters of ours (spec §5: the released 10M uses
``three_body_expansion="fourier"``, ``norm_type="layer"``, GateMLP interactions, learnable bases),
random weights, and run on the same frames: its own graph converter (pymatgen neighbor list, line
graph at the three-body cutoff) builds the graphs once, outside the timed step, as our collate does.
Forces and stress are conservative (autograd inside its forward), as ours.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch

from ..frames import Frame

EV_A3_TO_GPA = 160.21766208


def official_kwargs(config) -> dict:
    """Keyword arguments of ``matris.model.MatRIS`` matching a :class:`MatRISConfig`."""
    return {
        "num_layers": config.num_layers,
        "node_feat_dim": config.atom_dim,
        "edge_feat_dim": config.bond_dim,
        "three_body_feat_dim": config.angle_dim,
        "mlp_hidden_dims": list(config.readout_hidden),
        "three_body_expansion": "fourier",
        "num_radial": config.num_radial,
        "num_angular": config.num_angular,
        "envelope_exponent": config.envelope_exponent,
        "graph_conv_mlp": "GateMLP",
        "norm_type": config.norm,
        "use_bias": False,
        "learnable_basis": True,
        "pairwise_cutoff": config.cutoff,
        "three_body_cutoff": config.three_body_cutoff,
        "use_smoothed_for_delta_edge": config.smoothed_edge_delta,
        "is_intensive": False,  # total energies, as ours
        "is_conservation": True,
    }


def build_official(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from matris.model import MatRIS

    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count; stdout carries JSON lines
        model = MatRIS(**official_kwargs(config))
    return model.to(device=device, dtype=dtype)


def unsupported(frames: list[Frame]) -> str | None:
    """Why the official graph converter cannot take ``frames`` (it takes pymatgen Structures: periodic cells only),
    or None when it can."""
    for frame in frames:
        if frame.cell is None or not all(frame.pbc):
            return f"{frame.source}: the official MatRIS graph converter needs a periodic cell"
    return None


def official_graphs(model: torch.nn.Module, frames: list[Frame], device: str) -> list:
    """The official RadiusGraphs of ``frames`` (see :func:`unsupported`)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    reason = unsupported(frames)
    if reason is not None:
        raise ValueError(reason)
    graphs = []
    with contextlib.redirect_stdout(sys.stderr):
        for frame in frames:
            structure = AseAtomsAdaptor.get_structure(frame.to_atoms())
            graphs.append(model.graph_converter(structure).to(device))
    return graphs


def make_official_step(model: torch.nn.Module, frames: list[Frame], mode: str, device: str) -> Callable[[], float]:
    """One official step on all ``frames``: inference of E, F, σ, or the same MSE training step and AdamW as ours."""
    graphs = official_graphs(model, frames, device)
    if mode == "infer":
        model.eval()

        def infer():
            out = model(graphs, task="efs", is_training=False)
            return out["e"].sum().item()

        return infer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = next(model.parameters()).dtype
    energy = torch.tensor([f.energy for f in frames], dtype=dtype, device=device)
    forces = torch.cat([torch.as_tensor(f.forces, dtype=dtype) for f in frames]).to(device)
    n = torch.tensor([len(f.numbers) for f in frames], dtype=dtype, device=device)
    # its stress is in GPa; an absent label counts as zero, as it only has to shape the same graph
    stress_label = torch.stack(
        [torch.zeros(3, 3) if f.stress is None else torch.as_tensor(f.stress) * EV_A3_TO_GPA for f in frames]
    ).to(device=device, dtype=dtype)

    def train():
        optimizer.zero_grad(set_to_none=True)
        out = model(graphs, task="efs", is_training=True)
        loss = (
            (((out["e"] - energy) / n) ** 2).mean()
            + ((torch.cat(out["f"]) - forces) ** 2).mean()
            + ((torch.stack(out["s"]) - stress_label) ** 2).mean()
        )
        loss.backward()
        optimizer.step()
        return loss.item()

    return train


def _gated_mlp(ours: dict, src: str, dst: str, hidden: int) -> dict:
    """Our GatedMLP (first layer = core rows over gate rows) as the official ``mlp_core``/``mlp_gate`` pair."""
    out = {}
    for k, branch in enumerate(("core", "gate")):
        rows = slice(k * hidden, (k + 1) * hidden)
        out[f"{dst}.mlp_{branch}.layers.0.weight"] = ours[f"{src}.first.weight"][rows]
        out[f"{dst}.mlp_{branch}.layers.0.bias"] = ours[f"{src}.first.bias"][rows]
        out[f"{dst}.mlp_{branch}.layers.3.weight"] = ours[f"{src}.{branch}_out.weight"]
        out[f"{dst}.mlp_{branch}.layers.3.bias"] = ours[f"{src}.{branch}_out.bias"]
        for name in ("weight", "bias"):
            if f"{src}.{branch}_norm.{name}" in ours:  # RMSNorm has no bias
                out[f"{dst}.{branch}_norm.{name}"] = ours[f"{src}.{branch}_norm.{name}"]
    return out


def official_state_dict(model) -> dict:
    """The official MatRIS state dict (energy path: embeddings, blocks, readout norm, energy head) holding the
    weights of our one-dataset ``MultiTaskModel`` over a MatRIS backbone; magmom head left out (``strict=False``)."""
    cfg = model.backbone.config
    ours = {k: v.detach() for k, v in model.backbone.state_dict().items()}
    out = {
        "atom_embedding.embedding.weight": ours["atom_embedding.table.weight"],
        "atom_embedding.atom_swish_layer.linear.weight": ours["atom_embedding.linear.weight"],
        "edge_embedding.pairwise_rbf_expansion.frequencies": ours["bond_embedding.pair_basis.frequencies"],
        "edge_embedding.threebody_rbf_expansion.frequencies": ours["bond_embedding.three_body_basis.frequencies"],
        "edge_embedding.edge_linear1.weight": ours["bond_embedding.linear1.weight"],
        "edge_embedding.edge_linear2.weight": ours["bond_embedding.linear2.weight"],
        "edge_embedding.swish_layer.linear.weight": ours["bond_embedding.out.weight"],
        "three_body_embedding.expansion.frequencies": ours["angle_embedding.frequencies"],
        "three_body_embedding.angle_embedding.weight": ours["angle_embedding.linear1.weight"],
        "three_body_embedding.swish_layer.linear.weight": ours["angle_embedding.linear2.weight"],
    }
    for name in ("weight", "bias"):
        for src, dst in (("bond_embedding.norm", "edge_embedding.edge_init_norm"), ("readout_norm", "readout_norm")):
            if f"{src}.{name}" in ours:
                out[f"{dst}.{name}"] = ours[f"{src}.{name}"]
    layers = {
        "line_attention": ("attn_block_line_graph", cfg.bond_dim),
        "atom_attention": ("attn_block_atom_graph", cfg.atom_dim),
        "line_refinement": ("refine_block_line_graph", cfg.bond_dim),
        "atom_refinement": ("refine_block_atom_graph", cfg.atom_dim),
    }
    for b in range(cfg.num_layers):
        for ours_name, (official_name, hidden) in layers.items():
            src, dst = f"blocks.{b}.{ours_name}", f"interaction_block.{b}.{official_name}"
            out.update(_gated_mlp(ours, f"{src}.edge_mlp", f"{dst}.edge_nonlinear_update", hidden))
            out[f"{dst}.node_res_weight"] = ours[f"{src}.node_scale"][None]
            out[f"{dst}.edge_res_weight"] = ours[f"{src}.edge_scale"][None]
            if "attention" in ours_name:
                out.update(_gated_mlp(ours, f"{src}.node_mlp", f"{dst}.node_nonlinear_update", hidden))
                w_s, w_t = ours[f"{src}.logits.weight"].chunk(2)
                out[f"{dst}.source_weight_linear.weight"] = w_s
                out[f"{dst}.target_weight_linear.weight"] = w_t
            else:
                out[f"{dst}.learnable_envelope.weight"] = ours[f"{src}.envelope.weight"]
                for ffn in ("node", "edge"):
                    out[f"{dst}.{ffn}_FFN.layers.0.weight"] = ours[f"{src}.{ffn}_ffn.layers.0.weight"]
                    out[f"{dst}.{ffn}_FFN.layers.3.weight"] = ours[f"{src}.{ffn}_ffn.layers.1.weight"]
    # the first dataset's energy head: (1, in, out) stacked weights → the official MLP's Linear layers 0, 3, 6, …
    head = model.energy_heads.mlp
    for k, (w, bias) in enumerate(zip(head.weights, head.biases)):
        out[f"energy_head.energy_head.layers.{3 * k}.weight"] = w.detach()[0].t()
        out[f"energy_head.energy_head.layers.{3 * k}.bias"] = bias.detach()[0]
    return out


def official_energies(official: torch.nn.Module, frames: list[Frame]) -> torch.Tensor:
    """Total energies (G,) of the official model on ``frames``, graphs and coordinates in the model's dtype."""
    dtype = next(official.parameters()).dtype
    graphs = official_graphs(official, frames, "cpu")
    for graph, frame in zip(graphs, frames):
        # its converter stores float32 coordinates: rebuild them from the frame in the model's precision
        cell = torch.as_tensor(frame.cell, dtype=dtype)
        graph.lattice = cell
        graph.atom_frac_coord = torch.as_tensor(frame.positions, dtype=dtype) @ torch.linalg.inv(cell)
        graph.neighbor_image = graph.neighbor_image.to(dtype)
    return official(graphs, task="e")["e"].detach()
