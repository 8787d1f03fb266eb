"""deepmd-kit 3.x DPA4 (SeZM) trainer checkpoints ↔ lampretrain DPA4 models (``lampretrain import deepmd``).

A deepmd-kit checkpoint (``model.ckpt*.pt``, written by ``Trainer.save_model``) is ``{"model": state, "optimizer":
...}`` where ``state`` is the ``ModelWrapper`` state dict: ``model.<branch>.<parameter>`` tensors (``Default`` for a
single-task run, the ``model_dict`` keys for a multi-task one) and ``_extra_state = {"model_params", "train_infos"}``.
It loads with ``torch.load(weights_only=True)``: ``_extra_state`` holds only dicts, lists, strings, numbers and None.

Each branch becomes a head of one :class:`~lampretrain.models.multitask.MultiTaskModel`: its type map gives the
elements, ``out_bias + bias_atom_e`` the element references, its GLU fitting net the head (``heads.glu``); the
branches must share the descriptor (deepmd-kit's ``shared_dict`` at level 0). What differs from our own layout:

- deepmd-kit stores linear maps as (in, out) ``matrix`` tensors; nn.Linear holds (out, in);
- its type tables have one padding row after the types of the type map; ours are indexed by Z − 1;
- its real spherical harmonics differ from ours in the sign of the m ≠ 0 components (Condon–Shortley phase and
  y → −y): features agree up to a fixed ±1 per component, which maps every layer onto itself except the SO(2)
  linear layers, whose W_v (the ±m coupling) changes sign;
- its low-rank degree kernel is stored (l_in, l_out, rank) within each |m| block, ours (rank, l_out, l_in);
- the two RMSNorms of the attention input (``attention_norms: split``), the descriptor's scalar readout FFN
  (``readout_ffn``) and ε = 1e-7 (``rms_eps``, ``null_eps``) are options of our DPA4.

Settings our DPA4 cannot express are refused by name (:data:`REQUIRED`). ``write`` puts a model back in the trainer
layout; deepmd-kit's non-learned buffers (index tables, statistics) come from the import it started from.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..foreign import ForeignFormat, ForeignFormatError, Imported, register_format

DESCRIPTOR_TYPES = ("dpa4", "sezm", "DPA4", "SeZM")
FITTING_TYPES = ("dpa4_ener", "sezm_ener")
# deepmd-kit descriptor settings our DPA4 reproduces only at these values (the paper-era defaults of deepmd-kit 3.2.0)
REQUIRED: dict[str, Any] = {
    "basis_type": "bessel", "radial_mlp": [0], "radial_so2_mode": "degree_channel", "edge_cartesian": False,
    "node_cartesian": "none", "l_schedule": None, "m_schedule": None, "extra_node_l": 0, "so2_norm": False,
    "so2_attn_res": "none", "n_atten_head": 1, "atten_f_mix": False, "atten_v_proj": False, "atten_o_proj": False,
    "ffn_so3_grid": False, "grid_mlp": False, "grid_branch": 0, "ffn_blocks": 1, "sandwich_norm": [False, True, True, False],
    "mlp_bias": False, "layer_scale": False, "full_attn_res": "none", "block_attn_res": "none",
    "s2_activation": [False, True], "lebedev_quadrature": True, "node_wise_s2": False, "node_wise_so3": False,
    "message_node_s2": False, "message_node_so3": False, "so3_readout": "none", "readout_layers": 1,
    "activation_function": "silu", "glu_activation": True, "add_chg_spin_ebd": False, "exclude_types": [],
    "edge_norm": True, "use_env_seed": True,
}
# settings that change nothing we compute (precision, seeds, neighbour capacity, autocast, kmax of an unused grid)
IGNORED = {"type", "sel", "precision", "seed", "trainable", "use_amp", "kmax", "default_chg_spin", "random_gamma"}
MAPPED = {"rcut", "env_exp", "channels", "n_radial", "lmax", "mmax", "n_blocks", "mixing_layers", "n_focus",
          "focus_dim", "radial_so2_rank", "ffn_neurons", "eps"}
MODEL_REQUIRED = {"pair_exclude_types": [], "atom_exclude_types": [], "bridging_method": "None", "lora": None,
                  "preset_out_bias": None}
FITTING_REQUIRED = {"numb_fparam": 0, "numb_aparam": 0, "dim_case_embd": 0, "activation_function": "silu",
                    "atom_ener": [], "case_film_embd": False}
Z_OF = {s: z for z, s in enumerate(
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr Y Zr Nb "
    "Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au "
    "Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts "
    "Og".split())}
DESC = "atomic_model.descriptor."
FIT = "atomic_model.fitting_net."
NET = FIT + "filter_layers.networks.0."


def _fail(path: Path, msg: str) -> ForeignFormatError:
    return ForeignFormatError(f"{path}: {msg}")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The wrapper state dict of a deepmd-kit checkpoint, read with ``weights_only=True`` (no code runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(path, f"not a deepmd-kit checkpoint that loads without running code (torch.load weights_only: "
                          f"{first[:200]}); give a model.ckpt*.pt written by dp --pt train") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("_extra_state"), dict):
        raise _fail(path, "no 'model' state dict with '_extra_state' (a deepmd-kit PyTorch trainer checkpoint "
                          "model.ckpt*.pt has them; a frozen .pth/.pt2 model cannot be imported)")
    if not isinstance(state["_extra_state"].get("model_params"), dict):
        raise _fail(path, "'_extra_state' has no 'model_params' dict")
    return state


def _branches(path: Path, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if "model_dict" in params:
        return dict(params["model_dict"])
    return {"Default": params}


def _check(path: Path, where: str, params: dict[str, Any], required: dict[str, Any]) -> None:
    for key, value in required.items():
        got = params.get(key, value)
        if got != value and not (value == [] and not got) and not (value is None and got in ("None", None)):
            raise _fail(path, f"{where}.{key} = {got!r}: lampretrain's DPA4 reproduces only {value!r}")


def dpa4_options(path: Path, desc: dict[str, Any], state: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Our DPA4 options of a deepmd-kit descriptor; refuses a setting we cannot express."""
    kind = desc.get("type")
    if kind not in DESCRIPTOR_TYPES:
        raise _fail(path, f"descriptor.type = {kind!r}: only DPA4 (dpa4/sezm) checkpoints can be imported")
    _check(path, "descriptor", desc, REQUIRED)
    unknown = set(desc) - set(REQUIRED) - IGNORED - MAPPED
    if unknown:
        raise _fail(path, f"descriptor has settings lampretrain does not know: {', '.join(sorted(unknown))}")
    c = int(desc["channels"])
    n_focus = int(desc.get("n_focus", 1))
    focus_dim = int(desc.get("focus_dim", 0)) or c
    if n_focus * focus_dim != c:
        raise _fail(path, f"descriptor n_focus·focus_dim = {n_focus * focus_dim} != channels {c}: deepmd-kit's attention "
                          "logits then read the lifted radial features, ours the channels ones")
    lmax = int(desc["lmax"])
    ffn_hidden = state[f"{prefix}{DESC}blocks.0.ffns.0.so3_linear_2.weight"].shape[1]
    readout_hidden = state[f"{prefix}{DESC}output_ffn.so3_linear_2.weight"].shape[1]
    eps = float(desc.get("eps", 1e-7))
    return {
        "channels": c, "lmax": lmax, "mmax": int(desc["mmax"]), "n_blocks": int(desc["n_blocks"]),
        "so2_layers": int(desc["mixing_layers"]), "n_focus": n_focus, "focus_dim": int(desc.get("focus_dim", 0)),
        "rank": int(desc["radial_so2_rank"]), "n_radial": int(desc["n_radial"]), "cutoff": float(desc["rcut"]),
        "rbf_exponent": int(desc["env_exp"][0]), "edge_exponent": int(desc["env_exp"][1]),
        "ffn_hidden": int(ffn_hidden), "degree_floor": 0.25, "radial_norm": True, "env_seed": True,
        "rms_eps": eps, "null_eps": eps, "attention_norms": "split",
        "readout_ffn": True, "readout_ffn_hidden": int(readout_hidden),
    }


def kernel_permutation(lmax: int, mmax: int, rank: int) -> torch.Tensor:
    """perm with ours[:, j] = deepmd's[:, perm[j]] for the low-rank degree kernel columns."""
    perm, offset = [], 0
    for m in range(mmax + 1):
        n = lmax - m + 1
        for r in range(rank):
            for i in range(n):  # output degree
                for j in range(n):  # input degree
                    perm.append((offset + j * n + i) * rank + r)
        offset += n * n
    return torch.tensor(perm)


def _map_descriptor(theirs: dict[str, torch.Tensor], cfg, types: list[int]) -> dict[str, torch.Tensor]:
    """Our backbone state (``backbone.`` keys) from deepmd-kit descriptor tensors (keys without the branch prefix)."""
    d = lambda key: theirs[DESC + key]  # noqa: E731
    f, cf, lmax = cfg.n_focus, cfg.focus_channels, cfg.lmax
    out: dict[str, torch.Tensor] = {}

    def table(key: str, n_rows: int) -> torch.Tensor:
        src = d(key)
        t = src.new_zeros(n_rows, src.shape[1])
        t[torch.tensor(types) - 1] = src[: len(types)]  # the last row is deepmd-kit's padding slot
        return t

    b = "backbone."
    out[b + "type_embedding.weight"] = table("type_embedding.adam_type_embedding", cfg.n_elements)
    out[b + "geometry.adam_freqs"] = d("radial_basis.adam_freqs").reshape(-1)
    out[b + "radial.net.0.weight"] = d("radial_embedding.net.0.matrix").T
    out[b + "radial.net.1.weight"] = d("radial_embedding.net.1.adam_scale")
    out[b + "radial.net.3.weight"] = d("radial_embedding.net.3.matrix").T
    e = b + "env_seed."
    out[e + "type_table.weight"] = table("env_seed_embedding.env_type_embed.adam_type_embedding", cfg.n_elements)
    out[e + "radial.0.weight"] = d("env_seed_embedding.rbf_proj_layer1.matrix").T
    out[e + "radial.2.weight"] = d("env_seed_embedding.rbf_proj_layer2.matrix").T
    out[e + "mix.0.weight"] = d("env_seed_embedding.g_layer1.matrix").T
    out[e + "mix.2.weight"] = d("env_seed_embedding.g_layer2.matrix").T
    out[e + "film.weight"] = d("env_seed_embedding.output_proj.matrix").T
    out[e + "norm_scale.weight"] = d("film_scale_norm.adam_scale").reshape(-1)
    out[e + "norm_shift.weight"] = d("film_shift_norm.adam_scale").reshape(-1)
    out[e + "log_strength"] = torch.cat([d("film_scale_strength_log"), d("film_shift_strength_log")])
    perm = kernel_permutation(lmax, cfg.mmax, cfg.rank)
    for i in range(cfg.n_blocks):
        k, o = f"blocks.{i}.", f"{b}blocks.{i}."
        for ours, their in (("conv_norm", "post_so2_norm"), ("ffn_norm", "pre_ffn_norms.0")):
            out[o + ours + ".weight"] = d(k + their + ".adam_scale")[:, 0, :]
            out[o + ours + ".bias"] = d(k + their + ".bias").reshape(-1)
        c = k + "so2_conv."
        oc = o + "conv."
        out[oc + "pre_mix.weight"] = d(c + "pre_focus_mix.weight")
        out[oc + "post_mix.weight"] = d(c + "post_focus_mix.weight")
        out[oc + "edge_product.kernel"] = d(c + "radial_degree_mixer.weight")[:, perm]
        out[oc + "edge_product.channel_mix"] = d(c + "radial_degree_mixer.channel_basis")
        for s in range(cfg.so2_layers):
            w0 = d(f"{c}so2_linears.{s}.weight_m0")
            n0 = w0.shape[0]
            out[f"{oc}so2.{s}.weight_m0"] = w0.view(n0, f, n0).permute(1, 0, 2)
            for m in range(cfg.mmax):
                w = d(f"{c}so2_linears.{s}.weight_m.{m}")
                ib = w.shape[0]
                w = w.view(ib, f, 2 * ib)
                out[f"{oc}so2.{s}.weight_u.{m}"] = w[:, :, :ib].permute(1, 0, 2)
                out[f"{oc}so2.{s}.weight_v.{m}"] = -w[:, :, ib:].permute(1, 0, 2)  # the m ≠ 0 SH sign convention
        for s in range(cfg.so2_layers - 1):
            out[f"{oc}gates.{s}.weight"] = d(f"{c}non_linearities.{s}.gate_linear.weight").view(cf, f, lmax * cf).permute(1, 0, 2)
        out[oc + "att_norm.weight"] = d(c + "attn_qk_norm.adam_scale").reshape(-1)
        out[oc + "gate_norm.weight"] = d(c + "attn_output_gate_norm.adam_scale").reshape(-1)
        out[oc + "query"] = d(c + "attn_q_proj.weight").view(cf, f, cf).permute(1, 0, 2)
        out[oc + "key"] = d(c + "attn_k_proj.weight").view(cf, f, cf).permute(1, 0, 2)
        out[oc + "radial_logit"] = d(c + "adamw_attn_logit_w")[:, :, 0]
        out[oc + "out_gate"] = d(c + "adamw_attn_gate_w")[:, :, 0].T
        out[oc + "null_logit"] = d(c + "adamw_attn_z_bias_raw")[:, 0]
        ff = k + "ffns.0."
        out[o + "ffn.up.weight"] = d(ff + "so3_linear_1.weight")
        out[o + "ffn.gate.weight"] = d(ff + "act.scalar_gate.weight").T
        out[o + "ffn.down.weight"] = d(ff + "so3_linear_2.weight")
    out[b + "output_ffn.up.weight"] = d("output_ffn.so3_linear_1.weight")[0].T
    out[b + "output_ffn.down.weight"] = d("output_ffn.so3_linear_2.weight")[0].T
    return {k: v.contiguous().clone() for k, v in out.items()}


def _buffers(theirs: dict[str, torch.Tensor], learned: set[str]) -> dict[str, Any]:
    """deepmd-kit's tensors we do not learn (index tables, statistics), JSON-able, for ``write``."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "data": v.reshape(-1).tolist()}
            for k, v in theirs.items() if k not in learned}


def _learned_keys(theirs: dict[str, torch.Tensor]) -> set[str]:
    """Every deepmd-kit key whose value ``read`` maps into our model (the rest are buffers)."""
    out = set()
    for k, v in theirs.items():
        if not k.startswith((DESC, FIT)):
            continue
        leaf = k.rsplit(".", 1)[-1]
        if v.dtype.is_floating_point and (leaf in ("matrix", "bias", "weight", "adam_scale", "adam_freqs", "channel_basis",
                                                   "adam_type_embedding") or "strength_log" in leaf or leaf.startswith("adamw_")
                                          or k.startswith(NET) or ".weight_m" in k) and "balance_weight" not in k:
            out.add(k)
    out.add(FIT + "bias_atom_e")
    out.add("atomic_model.out_bias")
    return out


def read(path: Path) -> Imported:
    from ..multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
    from .config import SIZES, configure

    path = Path(path)
    state = load_checkpoint(path)
    params = state["_extra_state"]["model_params"]
    branches = _branches(path, params)
    first_options = first_desc = None
    datasets, fits, buffers = [], {}, {}
    for name, bp in branches.items():
        prefix = f"model.{name}."
        theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not theirs:
            raise _fail(path, f"branch '{name}' of model_params has no tensors model.{name}.*")
        if bp.get("type") not in DESCRIPTOR_TYPES:
            raise _fail(path, f"model type {bp.get('type')!r} (branch '{name}'): only DPA4 (dpa4/sezm) models import")
        _check(path, f"model.{name}" if name != "Default" else "model", bp, MODEL_REQUIRED)
        fitting = bp.get("fitting_net") or {}
        if fitting.get("type", "dpa4_ener") not in FITTING_TYPES:
            raise _fail(path, f"fitting_net.type = {fitting.get('type')!r}: only the DPA4 energy fitting (dpa4_ener) imports")
        _check(path, "fitting_net", fitting, FITTING_REQUIRED)
        if any(k.startswith(FIT + "filter_layers.networks.1.") for k in theirs):
            raise _fail(path, "fitting_net has one network per type (mixed_types false); ours is one head per dataset")
        type_map = list(bp.get("type_map") or params.get("type_map") or [])
        unknown = [t for t in type_map if t not in Z_OF or Z_OF[t] == 0]
        if not type_map or unknown:
            raise _fail(path, f"type_map {type_map}: every type must be an element symbol (not {unknown})")
        types = [Z_OF[t] for t in type_map]
        options = dpa4_options(path, bp.get("descriptor") or {}, state, prefix)
        desc_tensors = {k: v for k, v in theirs.items() if k.startswith(DESC)}
        if first_options is None:
            first_options, first_desc, first_types = options, desc_tensors, types
        elif options != first_options or types != first_types or any(
            not torch.equal(v, first_desc[k]) for k, v in desc_tensors.items()
        ):
            raise _fail(path, f"branch '{name}' has its own descriptor (shared_level > 0): one lampretrain backbone "
                              "serves every head, so branches must share the descriptor")
        bias = theirs["atomic_model.out_bias"].reshape(-1, theirs["atomic_model.out_bias"].shape[-1])[:, 0]
        bias = bias.double() + theirs[FIT + "bias_atom_e"].double().reshape(-1)
        datasets.append(DatasetSpec(name, element_references={z: float(bias[t]) for t, z in enumerate(types)}))
        n_hidden = sum(1 for k in theirs if k.startswith(NET + "hidden_layers.") and k.endswith(".linear.matrix"))
        layers = [(theirs[f"{NET}hidden_layers.{i}.linear.matrix"], theirs.get(f"{NET}hidden_layers.{i}.linear.bias"))
                  for i in range(n_hidden)]
        layers.append((theirs[NET + "output_layer.matrix"], theirs.get(NET + "output_layer.bias")))
        fits[name] = layers
        buffers[name] = _buffers(theirs, _learned_keys(theirs))
    hidden = tuple(int(w.shape[1]) // 2 for w, _ in fits[datasets[0].name][:-1])
    if any(tuple(int(w.shape[1]) // 2 for w, _ in layers[:-1]) != hidden for layers in fits.values()):
        raise _fail(path, "the branches' fitting nets have different widths; our heads share one width")
    heads = HeadsConfig(hidden=hidden, glu=True, output_scale="none")
    origin = {"format": "deepmd", "model_params": params, "buffers": buffers, "types": first_types}
    cfg_options = first_options
    config = MultiTaskConfig("dpa4-air", datasets, heads, cfg_options, origin=origin)
    cfg = configure(SIZES["dpa4-air"], **cfg_options)
    ours = _map_descriptor(first_desc, cfg, first_types)
    first_name = datasets[0].name
    dtype = first_desc[DESC + "type_embedding.adam_type_embedding"].dtype
    with torch.device("cpu"):
        model = MultiTaskModel(config)
    if dtype == torch.float64:  # never .to(float32): that would round the float64 constant buffers (κ, grids)
        model = model.double()
    target = model.state_dict()
    for k, layers in enumerate(fits[d.name] for d in datasets):
        for i, (w, b) in enumerate(layers):
            ours.setdefault(f"energy_heads.mlp.weights.{i}", target[f"energy_heads.mlp.weights.{i}"].clone())
            ours.setdefault(f"energy_heads.mlp.biases.{i}", torch.zeros_like(target[f"energy_heads.mlp.biases.{i}"]))
            ours[f"energy_heads.mlp.weights.{i}"][k] = w
            ours[f"energy_heads.mlp.biases.{i}"][k] = 0.0 if b is None else b
    missing = sorted(set(k for k in target if not k.startswith(("references.", "energy_heads.scale"))) - set(ours))
    if missing:
        raise _fail(path, f"internal: no deepmd-kit source for {missing[:5]}")
    for k, v in ours.items():
        if v.shape != target[k].shape:
            raise _fail(path, f"tensor for {k} has shape {tuple(v.shape)}, the model built from its settings "
                              f"{tuple(target[k].shape)}: the checkpoint's tensors and model_params disagree")
        target[k] = v.to(target[k].dtype)
    model.load_state_dict(target)
    source = {"branches": [d.name for d in datasets], "type_map": [t for t in _branch_type_map(branches, params, first_name)],
              "train_infos": state["_extra_state"].get("train_infos"), "descriptor": params_descriptor(branches, first_name)}
    return Imported(model=model.eval(), source=source)


def _branch_type_map(branches: dict, params: dict, name: str) -> list[str]:
    return list(branches[name].get("type_map") or params.get("type_map") or [])


def params_descriptor(branches: dict, name: str) -> dict:
    return dict(branches[name].get("descriptor") or {})


def _tensor(spec: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(spec["data"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])


def _unmap_descriptor(ours: dict[str, torch.Tensor], cfg, types: list[int], template: dict[str, torch.Tensor]) -> dict:
    """deepmd-kit descriptor tensors (keys without the branch prefix) from our backbone state: :func:`_map_descriptor`
    inverted."""
    cf, lmax = cfg.focus_channels, cfg.lmax
    o = lambda key: ours["backbone." + key]  # noqa: E731
    out: dict[str, torch.Tensor] = {}

    def table(key: str) -> torch.Tensor:
        t = o(key)
        rows = t[torch.tensor(types) - 1]
        return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # deepmd-kit's padding row: zero, as it initialises

    out[DESC + "type_embedding.adam_type_embedding"] = table("type_embedding.weight")
    out[DESC + "radial_basis.adam_freqs"] = o("geometry.adam_freqs")[None]
    out[DESC + "radial_embedding.net.0.matrix"] = o("radial.net.0.weight").T
    out[DESC + "radial_embedding.net.1.adam_scale"] = o("radial.net.1.weight")
    out[DESC + "radial_embedding.net.3.matrix"] = o("radial.net.3.weight").T
    es = DESC + "env_seed_embedding."
    out[es + "env_type_embed.adam_type_embedding"] = table("env_seed.type_table.weight")
    out[es + "rbf_proj_layer1.matrix"] = o("env_seed.radial.0.weight").T
    out[es + "rbf_proj_layer2.matrix"] = o("env_seed.radial.2.weight").T
    out[es + "g_layer1.matrix"] = o("env_seed.mix.0.weight").T
    out[es + "g_layer2.matrix"] = o("env_seed.mix.2.weight").T
    out[es + "output_proj.matrix"] = o("env_seed.film.weight").T
    out[DESC + "film_scale_norm.adam_scale"] = o("env_seed.norm_scale.weight")[None]
    out[DESC + "film_shift_norm.adam_scale"] = o("env_seed.norm_shift.weight")[None]
    out[DESC + "film_scale_strength_log"] = o("env_seed.log_strength")[:1]
    out[DESC + "film_shift_strength_log"] = o("env_seed.log_strength")[1:]
    inverse = torch.argsort(kernel_permutation(lmax, cfg.mmax, cfg.rank))
    for i in range(cfg.n_blocks):
        k, b = f"{DESC}blocks.{i}.", f"blocks.{i}."
        for mine, their in (("conv_norm", "post_so2_norm"), ("ffn_norm", "pre_ffn_norms.0")):
            out[k + their + ".adam_scale"] = o(b + mine + ".weight")[:, None, :]
            out[k + their + ".bias"] = o(b + mine + ".bias")[None]
        c, oc = k + "so2_conv.", b + "conv."
        out[c + "pre_focus_mix.weight"] = o(oc + "pre_mix.weight")
        out[c + "post_focus_mix.weight"] = o(oc + "post_mix.weight")
        out[c + "radial_degree_mixer.weight"] = o(oc + "edge_product.kernel")[:, inverse]
        out[c + "radial_degree_mixer.channel_basis"] = o(oc + "edge_product.channel_mix")
        for s in range(cfg.so2_layers):
            w0 = o(f"{oc}so2.{s}.weight_m0")
            out[f"{c}so2_linears.{s}.weight_m0"] = w0.permute(1, 0, 2).reshape(w0.shape[1], -1)
            for m in range(cfg.mmax):
                wu, wv = o(f"{oc}so2.{s}.weight_u.{m}"), -o(f"{oc}so2.{s}.weight_v.{m}")
                w = torch.cat([wu, wv], dim=2).permute(1, 0, 2)  # (in, F, 2·out)
                out[f"{c}so2_linears.{s}.weight_m.{m}"] = w.reshape(w.shape[0], -1)
        for s in range(cfg.so2_layers - 1):
            out[f"{c}non_linearities.{s}.gate_linear.weight"] = o(f"{oc}gates.{s}.weight").permute(1, 0, 2).reshape(cf, -1)
        out[c + "attn_qk_norm.adam_scale"] = o(oc + "att_norm.weight")[None]
        gate_norm = ours.get(f"backbone.{oc}gate_norm.weight", o(oc + "att_norm.weight"))  # shared: both are it
        out[c + "attn_output_gate_norm.adam_scale"] = gate_norm[None]
        out[c + "attn_q_proj.weight"] = o(oc + "query").permute(1, 0, 2).reshape(cf, -1)
        out[c + "attn_k_proj.weight"] = o(oc + "key").permute(1, 0, 2).reshape(cf, -1)
        out[c + "adamw_attn_logit_w"] = o(oc + "radial_logit")[:, :, None]
        out[c + "adamw_attn_gate_w"] = o(oc + "out_gate").T[:, :, None]
        out[c + "adamw_attn_z_bias_raw"] = o(oc + "null_logit")[:, None]
        ff = k + "ffns.0."
        out[ff + "so3_linear_1.weight"] = o(b + "ffn.up.weight")
        out[ff + "act.scalar_gate.weight"] = o(b + "ffn.gate.weight").T
        out[ff + "so3_linear_2.weight"] = o(b + "ffn.down.weight")
    out[DESC + "output_ffn.so3_linear_1.weight"] = o("output_ffn.up.weight").T[None]
    out[DESC + "output_ffn.so3_linear_2.weight"] = o("output_ffn.down.weight").T[None]
    for key, v in out.items():
        if key in template and template[key].shape != v.shape:
            raise ForeignFormatError(f"internal: {key} shape {tuple(v.shape)} != deepmd-kit's {tuple(template[key].shape)}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def write(model, path: Path, dataset: str | None = None) -> None:
    """``model`` (imported from deepmd-kit, possibly fine-tuned here) as a deepmd-kit trainer checkpoint; every head a
    branch (``dataset`` given: that head alone, single-task). ``dp --pt freeze`` takes the file."""
    path = Path(path)
    config = model.config
    origin = dict(config.origin or {})
    if origin.get("format") != "deepmd":
        raise ForeignFormatError(f"{path}: export --format deepmd needs a model imported from deepmd-kit (lampretrain "
                                 "import deepmd ...): its index tables and settings come from that checkpoint")
    cfg = model.backbone.config
    if not (cfg.readout_ffn and config.heads.glu and config.heads.per_dataset):
        raise ForeignFormatError(f"{path}: the model lost deepmd-kit's readout FFN or GLU heads; it cannot be written back")
    names = config.dataset_names if dataset is None else [model.dataset_names[model.dataset_index(dataset)]]
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    types = list(origin["types"])
    params = origin["model_params"]
    branches = _branches(path, params)
    buffers = origin["buffers"]
    state: dict[str, Any] = {}
    any_branch = next(iter(buffers))
    desc = _unmap_descriptor(ours, cfg, types, {})
    for k, name in enumerate(names):
        src = name if name in buffers else any_branch
        prefix = "model.Default." if dataset is not None else f"model.{name}."
        for key, spec in buffers[src].items():
            state[prefix + key] = _tensor(spec)
        for key, v in desc.items():
            state[prefix + key] = v.clone()
        i = model.dataset_index(name)
        scale = float(model.energy_heads.scale[i])
        n_layers = len(config.heads.hidden) + 1
        for j in range(n_layers):
            w = ours[f"energy_heads.mlp.weights.{j}"][i]
            bvec = ours[f"energy_heads.mlp.biases.{j}"][i]
            if j < n_layers - 1:
                state[f"{prefix}{NET}hidden_layers.{j}.linear.matrix"] = w.clone()
                state[f"{prefix}{NET}hidden_layers.{j}.linear.bias"] = bvec.clone()
            else:  # deepmd-kit's output layer has no bias: fold it (and our output scale) into the biases per type
                state[f"{prefix}{NET}output_layer.matrix"] = (w * scale if scale != 1.0 else w).clone()
                out_bias = float(bvec[0]) * scale
        refs = ours["references.table"][i]
        energy = torch.tensor([float(refs[z]) + out_bias for z in types], dtype=torch.float64)
        state[prefix + "atomic_model.out_bias"] = energy.reshape(1, -1, 1)
        state[prefix + FIT + "bias_atom_e"] = torch.zeros(len(types), 1, dtype=torch.float64)
        dtype = ours["backbone.type_embedding.weight"].dtype
        for key in list(state):
            if key.startswith(prefix) and (key.startswith(prefix + DESC) or key.startswith(prefix + NET)) and \
                    state[key].dtype.is_floating_point and key[len(prefix):] not in buffers[src]:
                state[key] = state[key].to(dtype)
    if dataset is None:
        model_params = params
    else:
        bp = dict(branches.get(names[0]) or next(iter(branches.values())))
        if "model_dict" in params:
            shared = params.get("shared_dict", {})
            for key in ("descriptor", "type_map"):
                if isinstance(bp.get(key), str):
                    bp[key] = shared.get(bp[key].split(":")[0], bp[key])
        model_params = bp
    state["_extra_state"] = {"model_params": model_params, "train_infos": {"lr": 0.0, "step": 0}}
    from ...files import atomic_write

    atomic_write(path, lambda p: torch.save({"model": state}, p))


register_format(ForeignFormat(
    name="deepmd",
    description="deepmd-kit 3.x DPA4 trainer checkpoint (model.ckpt*.pt, single- or multi-task)",
    read=read,
    write=write,
))

