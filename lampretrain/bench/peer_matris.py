"""The official MatRIS code (PyPI ``matris`` 0.1.0) as a peer of ``lampretrain bench model``.

The official model is built with the hyper-parameters of ours (spec §5: the released 10M uses
``three_body_expansion="fourier"``, ``norm_type="layer"``, GateMLP interactions, learnable bases) and
our weights copied into it (``models/matris/official.py``), checked to give the same energies and forces
before anything is timed, and run on the same frames: its own graph converter (pymatgen neighbor list, line
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


def build_official(model, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The official MatRIS with the hyper-parameters and the weights of our one-dataset ``model`` (published,
    ``smooth=False``: the function the official code computes), through the official-format weight map."""
    from matris.model import MatRIS

    from ..models.matris.official import REFERENCE, to_official

    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count; stdout carries JSON lines
        official = MatRIS(**official_kwargs(model.backbone.config)).to(device=device, dtype=dtype)
    state = to_official(model, 0)  # loaded after the cast: a float32 model would round float64 weights
    del state[REFERENCE]  # built without references (ours are zero): its energy is the heads' sum, as ours
    missing, unexpected = official.load_state_dict(state, strict=False)
    # a model without a magmom head leaves the official one's own weights (they do not enter E, F, σ)
    assert not unexpected and all(k.startswith("magmom_head.") for k in missing), (missing, unexpected)
    return official


def differs(model, official: torch.nn.Module, frames: list[Frame], device: str, dtype: torch.dtype) -> str | None:
    """Why ``official`` does not compute what ``model`` does on ``frames`` (energies and forces beyond float32
    rounding), or None when they agree: a timing of two different functions would mean nothing."""
    from ..graph.batch import collate
    from ..models import graph_cutoffs

    cutoff, three_body_cutoff = graph_cutoffs(model)
    batch = collate(frames, cutoff=cutoff, three_body_cutoff=three_body_cutoff, dtype=dtype).to(device)
    ours = model(batch, compute_stress=False)
    with contextlib.redirect_stdout(sys.stderr):
        theirs = official(official_graphs(official, frames, device), task="ef")
    de = (ours["energy"].detach() - theirs["e"].detach()).abs() / batch.n_atoms
    df = (ours["forces"].detach() - torch.cat(theirs["f"]).detach()).abs().max()
    tol_e, tol_f = (1e-5, 1e-4) if dtype != torch.float64 else (1e-9, 1e-8)
    if de.max() > tol_e or df > tol_f:
        return f"the official model with our weights differs: {de.max().item():.2e} eV/atom, {df.item():.2e} eV/Å"
    return None


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
