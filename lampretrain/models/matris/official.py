"""The official MatRIS checkpoint format (PyPI ``matris`` 0.1.0 and 1.0.0), read and written.

An official checkpoint is a ``torch.save`` dict ``{"config": <MatRIS.__init__ keyword arguments>,
"state_dict": ...}``, possibly nested under ``"model"`` (what ``MatRIS.from_dict`` reads in both
releases). Its fitted element references are ``reference_energy.fc.weight`` (1, 94), eV per atom of
element Z at column Z − 1; trainer checkpoints of 0.1.0 name them ``composition_model.fc.weight``.
``is_intensive`` only changes what the official forward returns (E/N instead of E): the function, and so
the weights, are the same.

The weights map one to one (:func:`correspondence`, documented in ``docs/interop.md``); an imported
model is the published MatRIS (``smooth=False``) with one dataset head, ``output_scale: none``.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from ...model_files import read_model_file
from ..foreign import ForeignFormat, ForeignFormatError, Imported, register_format
from ..multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
from .config import MATRIS_4M, MATRIS_10M, MatRISConfig

OFFICIAL_ELEMENTS = 94  # rows of its atom embedding and reference table (H … Pu)
# official keyword → the only value our MatRIS implements (the released models all use these)
REQUIRED = {
    "three_body_expansion": "fourier",
    "distance_expansion": "bessel",
    "graph_conv_mlp": "gatemlp",
    "activation_type": "silu",
    "use_bias": False,
    "learnable_basis": True,
    "is_conservation": True,
}
# official keyword → our MatRISConfig field (the rest of its keywords: REQUIRED, or no effect on the function)
SIZES = {
    "num_layers": "num_layers",
    "node_feat_dim": "atom_dim",
    "edge_feat_dim": "bond_dim",
    "three_body_feat_dim": "angle_dim",
    "mlp_hidden_dims": "readout_hidden",
    "num_radial": "num_radial",
    "num_angular": "num_angular",
    "envelope_exponent": "envelope_exponent",
    "norm_type": "norm",
    "pairwise_cutoff": "cutoff",
    "three_body_cutoff": "three_body_cutoff",
    "use_smoothed_for_delta_edge": "smoothed_edge_delta",
}
# dropout (training only), max_l / max_n (spherical-harmonics expansion, unused with fourier), is_intensive
# and reference_energy (output convention and a preset name) are kept in the model's origin and written back
KEPT = ("dropout", "max_l", "max_n", "is_intensive", "reference_energy")
# the release files of the official loader (identical in 0.1.0 and 1.0.0) and the data each was fitted to
RELEASE_URL = "https://github.com/HPC-AI-Team/MatRIS/releases/download/v1.0.0/"
RELEASES = {
    "matris_10m_omat": ("MatRIS_10M_OMAT.pth.tar", "omat"),
    "matris_10m_oam": ("MatRIS_10M_OAM.pth.tar", "oam"),
    "matris_10m_mp": ("MatRIS_10M_MP.pth.tar", "mptrj"),
    "matris_4m_matpes_r2scanv1": ("MatRIS_4M_MatPES_r2SCANv1.pth.tar", "matpes_r2scan"),
    "matris_4m_matpes_pbev1": ("MatRIS_4M_MatPES_PBEv1.pth.tar", "matpes_pbe"),
    "matris_4m_matpes_r2scanv2": ("MatRIS_4M_MatPES_r2SCANv2.pth.tar", "matpes_r2scan"),
    "matris_4m_matpes_pbev2": ("MatRIS_4M_MatPES_PBEv2.pth.tar", "matpes_pbe"),
}
# reference_energy names 0.1.0's loader accepts (it builds the reference module only from a preset name, then
# loads the fitted weights over it; 1.0.0 builds it whenever the weights are there)
PRESETS = ("mptrj", "omat", "mpa")
REFERENCE = "reference_energy.fc.weight"
LEGACY_REFERENCE = "composition_model.fc.weight"


class Rule(NamedTuple):
    """Our tensor ``ours`` is the official tensors ``official`` joined by ``how``:
    "=" the same tensor; "cat" official tensors stacked along rows (our fused first layers, attention
    logits); "row" the official (1, C) as our (C,)."""

    ours: str
    official: tuple[str, ...]
    how: str


def _gated(ours: str, official: str) -> Iterator[Rule]:
    """Our GatedMLP (``first`` = core rows over gate rows) ↔ the official ``mlp_core`` / ``mlp_gate`` pair."""
    for name in ("weight", "bias"):
        yield Rule(f"{ours}.first.{name}", tuple(f"{official}.mlp_{b}.layers.0.{name}" for b in ("core", "gate")), "cat")
    for branch in ("core", "gate"):
        for name in ("weight", "bias"):
            yield Rule(f"{ours}.{branch}_out.{name}", (f"{official}.mlp_{branch}.layers.3.{name}",), "=")
            yield Rule(f"{ours}.{branch}_norm.{name}", (f"{official}.{branch}_norm.{name}",), "=")


def backbone_rules(cfg: MatRISConfig) -> Iterator[Rule]:
    """Every backbone tensor (our name relative to the backbone) and the official tensors it is."""
    pairs = {
        "atom_embedding.table.weight": "atom_embedding.embedding.weight",
        "atom_embedding.linear.weight": "atom_embedding.atom_swish_layer.linear.weight",
        "bond_embedding.pair_basis.frequencies": "edge_embedding.pairwise_rbf_expansion.frequencies",
        "bond_embedding.three_body_basis.frequencies": "edge_embedding.threebody_rbf_expansion.frequencies",
        "bond_embedding.linear1.weight": "edge_embedding.edge_linear1.weight",
        "bond_embedding.linear2.weight": "edge_embedding.edge_linear2.weight",
        "bond_embedding.out.weight": "edge_embedding.swish_layer.linear.weight",
        "bond_embedding.norm.weight": "edge_embedding.edge_init_norm.weight",
        "bond_embedding.norm.bias": "edge_embedding.edge_init_norm.bias",
        "angle_embedding.frequencies": "three_body_embedding.expansion.frequencies",
        "angle_embedding.linear1.weight": "three_body_embedding.angle_embedding.weight",
        "angle_embedding.linear2.weight": "three_body_embedding.swish_layer.linear.weight",
        "readout_norm.weight": "readout_norm.weight",
        "readout_norm.bias": "readout_norm.bias",
    }
    for ours, official in pairs.items():
        yield Rule(ours, (official,), "=")
    layers = {
        "line_attention": "attn_block_line_graph",
        "atom_attention": "attn_block_atom_graph",
        "line_refinement": "refine_block_line_graph",
        "atom_refinement": "refine_block_atom_graph",
    }
    for b in range(cfg.num_layers):
        for ours_name, official_name in layers.items():
            src, dst = f"blocks.{b}.{ours_name}", f"interaction_block.{b}.{official_name}"
            yield from _gated(f"{src}.edge_mlp", f"{dst}.edge_nonlinear_update")
            yield Rule(f"{src}.node_scale", (f"{dst}.node_res_weight",), "row")
            yield Rule(f"{src}.edge_scale", (f"{dst}.edge_res_weight",), "row")
            if "attention" in ours_name:
                yield from _gated(f"{src}.node_mlp", f"{dst}.node_nonlinear_update")
                yield Rule(f"{src}.logits.weight", (f"{dst}.source_weight_linear.weight", f"{dst}.target_weight_linear.weight"), "cat")
            else:
                yield Rule(f"{src}.envelope.weight", (f"{dst}.learnable_envelope.weight",), "=")
                for ffn in ("node", "edge"):
                    for k, official_k in ((0, 0), (1, 3)):
                        yield Rule(f"{src}.{ffn}_ffn.layers.{k}.weight", (f"{dst}.{ffn}_FFN.layers.{official_k}.weight",), "=")


def head_rules(cfg: MatRISConfig) -> Iterator[tuple[str, str, str]]:
    """(our head tensor, official tensor, "stacked" | "=") for the energy and magmom heads. "stacked": our
    (K, in, out) weights / (K, out) biases hold dataset k's layer at row k, the official Linear (out, in) / (out,)."""
    for k in range(len(cfg.readout_hidden) + 1):  # its MLP: Linear, SiLU, Dropout per hidden layer
        yield f"energy_heads.mlp.weights.{k}", f"energy_head.energy_head.layers.{3 * k}.weight", "stacked"
        yield f"energy_heads.mlp.biases.{k}", f"energy_head.energy_head.layers.{3 * k}.bias", "stacked"
    for k, official_k in ((0, 0), (1, 3)):
        for name in ("weight", "bias"):
            yield f"magmom_head.layers.{k}.{name}", f"magmom_head.magmom_head.layers.{official_k}.{name}", "="


def _present(rules: Iterator[Rule], have: set[str], side: str) -> list[Rule]:
    """LayerNorm has biases, RMSNorm not: the rules of tensors the model has."""
    return [r for r in rules if (r.ours if side == "ours" else r.official[0]) in have]


def to_official(model: MultiTaskModel, dataset: int) -> dict[str, torch.Tensor]:
    """The official state dict of our ``model``, its head ``dataset``: backbone, heads, references."""
    cfg = model.backbone.config
    ours = {k: v.detach() for k, v in model.backbone.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for rule in _present(backbone_rules(cfg), set(ours), "ours"):
        value = ours[rule.ours]
        if rule.how == "cat":
            parts = value.chunk(len(rule.official))
        else:
            parts = (value[None] if rule.how == "row" else value,)
        out.update({name: part.clone() for name, part in zip(rule.official, parts)})
    heads = model.state_dict()
    per_dataset = model.config.heads.per_dataset
    for ours_name, official, how in head_rules(cfg):
        if ours_name not in heads:
            continue  # no magmom head
        value = heads[ours_name].detach()
        if how == "stacked":
            value = value[dataset if per_dataset else 0]
            value = value.t() if value.dim() == 2 else value
        out[official] = value.clone()
    refs = model.references.table.detach()[dataset, 1 : OFFICIAL_ELEMENTS + 1]
    out[REFERENCE] = refs.to(torch.float32)[None].clone()
    return out


def from_official(state: dict[str, torch.Tensor], model: MultiTaskModel, where: Path) -> None:
    """Fill ``model`` (built by :func:`model_config`) from the official ``state``; every tensor of both used."""
    cfg = model.backbone.config
    target = model.state_dict()
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ForeignFormatError(f"{where}: state_dict has no '{name}' (not a MatRIS checkpoint of this configuration)")
        used.add(name)
        return state[name]

    filled = {}
    for rule in _present(backbone_rules(cfg), {k.removeprefix("backbone.") for k in target}, "ours"):
        parts = [take(name) for name in rule.official]
        value = torch.cat(parts) if rule.how == "cat" else parts[0][0] if rule.how == "row" else parts[0]
        filled[f"backbone.{rule.ours}"] = value
    for ours_name, official, how in head_rules(cfg):
        value = take(official)
        filled[ours_name] = (value.t() if value.dim() == 2 else value)[None] if how == "stacked" else value
    for name, value in filled.items():
        if value.shape != target[name].shape:
            raise ForeignFormatError(f"{where}: '{name}' has shape {tuple(value.shape)}, this configuration needs {tuple(target[name].shape)}")
    target.update(filled)
    model.load_state_dict(target)
    used.add(REFERENCE)
    left = sorted(set(state) - used)
    if left:
        raise ForeignFormatError(f"{where}: state_dict has tensors no MatRIS layer takes: {', '.join(left[:5])}")


def read_official(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) of an official checkpoint, read without running code (``weights_only``)."""
    data = read_model_file(path, ())
    data = data.get("model", data)
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("state_dict"), dict):
        raise ForeignFormatError(f"{path}: not an official MatRIS checkpoint (needs a dict with 'config' and 'state_dict', as MatRIS.from_dict reads)")
    state = dict(data["state_dict"])
    if LEGACY_REFERENCE in state:
        legacy = state.pop(LEGACY_REFERENCE)
        if not torch.equal(state.setdefault(REFERENCE, legacy), legacy):
            raise ForeignFormatError(f"{path}: '{LEGACY_REFERENCE}' and '{REFERENCE}' differ (two reference-energy tables)")
    return dict(data["config"]), state


def model_config(official: dict[str, Any], dataset: str, where: Path) -> MultiTaskConfig:
    """Our config of the official keyword arguments ``official`` (the published MatRIS: ``smooth=False``)."""
    for key, value in REQUIRED.items():
        have = official.get(key, value)
        if (have.lower() if isinstance(have, str) else have) != value:
            raise ForeignFormatError(f"{where}: config {key}={have!r}; lampretrain's MatRIS implements {key}={value!r} only (the released models)")
    unknown = sorted(set(official) - set(REQUIRED) - set(SIZES) - set(KEPT))
    if unknown:
        raise ForeignFormatError(f"{where}: config has keys this importer does not know: {', '.join(unknown)}")
    sizes = {ours: official[key] for key, ours in SIZES.items() if key in official}
    if isinstance(sizes.get("readout_hidden"), int):
        sizes["readout_hidden"] = [sizes["readout_hidden"]]
    sizes["readout_hidden"] = tuple(sizes.get("readout_hidden", (128, 128)))
    sizes["magmom_hidden"] = 2 * sizes.get("atom_dim", 128)  # its magmom head's width
    sizes["num_elements"] = OFFICIAL_ELEMENTS
    sizes["smooth"] = False
    name, base = ("matris-4m", MATRIS_4M) if sizes.get("num_layers") == MATRIS_4M.num_layers else ("matris-10m", MATRIS_10M)
    try:
        cfg = base.with_overrides(**sizes)
    except ValueError as err:
        raise ForeignFormatError(f"{where}: config does not give a MatRIS ({err})") from None
    options = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
    heads = HeadsConfig(hidden=cfg.readout_hidden, output_scale="none", magmoms=True, vector_hidden=cfg.magmom_hidden)
    return MultiTaskConfig(name, [DatasetSpec(dataset)], heads, options)


def dataset_name(path: Path, official: dict[str, Any]) -> str:
    """The head's name: the data of a release file (``MatRIS_10M_OAM.pth.tar`` → ``oam``), else the
    checkpoint's reference preset, else ``matris``."""
    for file, data in RELEASES.values():
        if path.name.lower() == file.lower():
            return data
    preset = official.get("reference_energy")
    return str(preset).lower() if preset else "matris"


def read(path: Path) -> Imported:
    official, state = read_official(path)
    config = model_config(official, dataset_name(path, official), path)
    reference = state.get(REFERENCE)
    if reference is not None:
        if reference.shape != (1, OFFICIAL_ELEMENTS):
            raise ForeignFormatError(f"{path}: '{REFERENCE}' has shape {tuple(reference.shape)}, expected (1, {OFFICIAL_ELEMENTS})")
        values = reference[0].to(torch.float64).tolist()
        config.datasets[0].element_references = {z + 1: v for z, v in enumerate(values) if v != 0.0}
    kept = {key: official[key] for key in KEPT if key in official}
    config.origin = {"format": "matris", "config": {**kept, **{k: official[k] for k in REQUIRED if k in official}}}
    model = MultiTaskModel(config)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model.to(dtype if dtype.is_floating_point else torch.float32)
    from_official(state, model, path)
    return Imported(model.eval(), {"config": official, "parameters": sum(p.numel() for p in model.parameters())})


def official_config(model: MultiTaskModel, dataset: str) -> dict[str, Any]:
    """The official ``MatRIS(**config)`` keyword arguments of our model: its sizes, the implemented choices,
    and what an imported model kept of its source (``is_intensive``, the reference preset, dropout)."""
    cfg = model.backbone.config
    values = asdict(cfg)
    out: dict[str, Any] = {key: values[ours] for key, ours in SIZES.items()}
    out["mlp_hidden_dims"] = list(cfg.readout_hidden)
    out.update({"three_body_expansion": "fourier", "distance_expansion": "Bessel", "graph_conv_mlp": "GateMLP",
                "activation_type": "silu", "use_bias": False, "learnable_basis": True, "is_conservation": True,
                "dropout": 0.0, "max_l": 4, "max_n": 4, "is_intensive": True})
    source = model.config.origin.get("config", {}) if model.config.origin.get("format") == "matris" else {}
    out.update({key: source[key] for key in KEPT if key in source})
    if "reference_energy" not in source:
        # 0.1.0 builds its reference module only from a preset name; the fitted table in the state dict replaces it
        out["reference_energy"] = dataset.lower() if dataset.lower() in PRESETS else "mptrj"
    return out


def check_exportable(model: MultiTaskModel) -> None:
    cfg = model.backbone.config
    problems = []
    if cfg.smooth:
        problems.append("it is the smooth MatRIS (model.options.smooth: true), which the official code does not compute")
    if cfg.num_elements != OFFICIAL_ELEMENTS:
        problems.append(f"it embeds {cfg.num_elements} elements, the official model {OFFICIAL_ELEMENTS}")
    if model.magmom_head is None or model.config.heads.vector_hidden != 2 * cfg.atom_dim:
        problems.append(f"its magmom head is not the official one (heads.magmoms: true, heads.vector_hidden: {2 * cfg.atom_dim})")
    if tuple(model.config.heads.hidden) != tuple(cfg.readout_hidden):
        problems.append(f"its energy head has hidden {list(model.config.heads.hidden)}, the official one {list(cfg.readout_hidden)}")
    if model.force_mode != "conservative":
        problems.append("its forces are direct, the official ones conservative")
    if problems:
        raise ForeignFormatError("cannot write the official MatRIS format: " + "; ".join(problems))


def write(model: MultiTaskModel, path: Path, dataset: str | None) -> None:
    """``{"config", "state_dict"}`` as ``MatRIS.from_dict`` reads it (0.1.0 and 1.0.0) for head ``dataset``."""
    check_exportable(model)
    names = model.dataset_names
    if dataset is None and len(names) > 1:
        raise ForeignFormatError(f"the model has {len(names)} heads ({', '.join(names)}); name one with --dataset")
    name = dataset or names[0]
    k = model.dataset_index(name)
    scale = float(model.energy_heads.scale[k])
    state = to_official(model, k)
    if scale != 1.0:  # our head output × s_k: the official head has no scale, so fold it into the last layer
        last = len(model.config.heads.hidden)
        for part in ("weight", "bias"):
            key = f"energy_head.energy_head.layers.{3 * last}.{part}"
            state[key] = state[key] * scale
    torch.save({"config": official_config(model, name), "state_dict": state}, path)


FORMAT = register_format(
    ForeignFormat(
        name="matris",
        description="official MatRIS checkpoint (PyPI matris 0.1.0 / 1.0.0: {config, state_dict}, release .pth.tar)",
        read=read,
        write=write,
        releases={name: (file, RELEASE_URL + file) for name, (file, _) in RELEASES.items()},
        extra_cache="~/.cache/matris",
    )
)
