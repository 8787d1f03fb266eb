"""EMFA SO(2) convolution (DPA4 §4.2.3, eqs. 16–30).

Per edge j → i: pre-mix, rotate the source features into the edge frame keeping |m| ≤ M,
(A1) a low-rank edge–node product whose degree-mixing kernel comes from the radial
features, (A2) F parallel "focus" stacks of residual SO(2) layers with gates and a softmax
competition between them, rotate back, (A3) envelope-gated attention over neighbours
with a null term, then a zero-initialised post-mix (the block starts as the identity).

Everything per edge (rotation in, A1, A2, rotation back, scatter to the centre atom) runs
in chunks of ``edge_chunk`` edges, so a chunk's tensors stay cache- and allocator-sized.
Chunks keep their graph while the estimated stored activations fit ``edge_memory_mb``;
the chunks beyond it keep only their inputs and are recomputed in the backward pass, and in
training in the double backward too (``layers.recompute``), so a force loss then needs one
chunk's second-order graph at a time. Recomputing costs about 1.5× the chunk's work, so the
budget decides speed against memory.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.equivariant_norm import RMSNorm
from ..layers.recompute import recompute
from ..layers.scatter import Segments, gather, scatter_max, scatter_sum, segment_sum
from ..layers.so2 import SO2Linear, m_part_rows
from ..layers.so3_linear import SO3Linear
from .config import DPA4Config
from .geometry import EdgeCache


def _normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


def _trunc_normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-3 * std, b=3 * std))


class LowRankEdgeProduct(nn.Module):
    """(A1) y_{l m c} = Σ_r B_{r c} Σ_{l'} K^{(r)}_{l l' |m|}(ρ̃) x_{l' m c} (DPA4 eqs. 18–20), fused with the rotation.

    K = ρ̃_flat W with ρ̃ the (L+1)·H radial features of the edge; one (L−m+1)² degree
    matrix per |m| and rank, the same for −m and +m (so it commutes with rolls).
    Since x = P_M D h'_j, y = Σ_r (K_r P_M D) (B_r ⊙ h'_j): the tiny per-edge matrices
    K_r P_M D (E, rows, D) are formed first and B_r scales the node features before the
    gather, so the only (E, ·, H)-sized work is one gather and one bmm per |m| part.
    """

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        lmax, mmax, h, r = cfg.lmax, cfg.mmax, cfg.hidden_channels, cfg.rank
        self.rank = r
        self.block_sizes = [lmax - m + 1 for m in range(mmax + 1)]
        k_deg = sum(n * n for n in self.block_sizes)
        fan_in, fan_out = (lmax + 1) * h, k_deg * r
        self.kernel = _trunc_normal(fan_in, fan_out, std=1 / math.sqrt(fan_in + fan_out))
        self.channel_mix = _trunc_normal(r, h, std=1 / math.sqrt(r + h))

    def forward(self, xp: torch.Tensor, src: Segments, to_local: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """xp (N, D, H) node features, source atoms ``src`` (E,) → N, rotation rows (E, rows, D) of P_M D in
        m-major order, rho (E, L+1, H) → (E, rows, H) in the edge frame, m-major."""
        n_edges = rho.shape[0]
        scaled = (xp[:, None] * self.channel_mix[:, None, :].to(xp.dtype)).flatten(1, 2)  # (N, R·D, H)
        source = gather(scaled, src)  # (E, R·D, H)
        kernel = rho.flatten(1) @ self.kernel  # (E, K_deg·R)
        fused, col, row = [], 0, 0
        for m, n in enumerate(self.block_sizes):
            k = kernel[:, col : col + n * n * self.rank].unflatten(1, (self.rank, n, n))  # (E, R, n, n)
            col += n * n * self.rank
            signs = 1 if m == 0 else 2
            rows = to_local[:, row : row + signs * n].unflatten(1, (signs, n)).to(k.dtype)  # (E, ±, n, D)
            row += signs * n
            fused.append(torch.einsum("erij,epjd->epird", k, rows).reshape(n_edges, signs * n, -1))  # (E, ·, R·D)
        # one bmm over all |m| parts: a few tiny batched products cost more than one with more rows
        return torch.bmm(torch.cat(fused, dim=1).to(source.dtype), source)


class FocusGate(nn.Module):
    """Γ: SiLU on the (l=0, m=0) row, σ(W x₀₀)_l on every row of degree l ≥ 1, per focus."""

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        cf = cfg.focus_channels
        self.weight = _normal(cfg.n_focus, cf, cfg.lmax * cf, std=0.01)

    def forward(self, scalar: torch.Tensor) -> torch.Tensor:
        """scalar x₀₀ (F, E, C_f) → per-degree factors (F, E, L+1, C_f).

        Slot 0 is σ(x₀₀), so multiplying the (0, 0) row by it gives SiLU(x₀₀); slot l ≥ 1
        multiplies every row of degree l, whatever its m.
        """
        return torch.sigmoid(torch.cat([scalar, torch.bmm(scalar, self.weight)], dim=-1)).unflatten(-1, (-1, scalar.shape[-1]))


def gated_residual(x: list[torch.Tensor], y: list[torch.Tensor], gates: torch.Tensor | None) -> list[torch.Tensor]:
    """x + Γ(y) on every |m| part (F, E, rows_m·C_f), with per-degree gates (F, E, L+1, C_f) or none."""
    if gates is None:
        return [a + b for a, b in zip(x, y)]
    # x + y·g rather than addcmul: addcmul's backward spends an extra full-size multiply on its scalar factor
    out = [x[0] + y[0] * gates.flatten(2)]
    for m, (a, b) in enumerate(zip(x[1:], y[1:]), start=1):
        g = gates[:, :, None, m:]  # (F, E, 1, L−m+1, C_f): degrees m..L for both −m and +m
        out.append(a + (b.unflatten(-1, (2, -1, g.shape[-1])) * g).flatten(2))
    return out


class EMFAConvolution(nn.Module):
    def __init__(self, cfg: DPA4Config):
        super().__init__()
        self.cfg = cfg
        c, f, cf, h = cfg.channels, cfg.n_focus, cfg.focus_channels, cfg.hidden_channels
        self.pre_mix = SO3Linear(cfg.lmax, c, h)
        self.lift = nn.Linear(c, h, bias=False) if h != c else None
        self.edge_product = LowRankEdgeProduct(cfg)
        self.so2 = nn.ModuleList(SO2Linear(cfg.lmax, cfg.mmax, cf, f) for _ in range(cfg.so2_layers))
        self.gates = nn.ModuleList(FocusGate(cfg) for _ in range(cfg.so2_layers - 1))
        if f > 1:
            self.focus_norm = RMSNorm(cf, cfg.rms_eps)
            self.focus_logit = _normal(f, cf, std=0.01)
        self.att_norm = RMSNorm(cf, cfg.rms_eps)  # Q/K (and, shared, the output gate)
        # "split": the output gate reads its own norm (deepmd-kit's attn_output_gate_norm); scales start equal
        self.gate_norm = RMSNorm(cf, cfg.rms_eps) if cfg.attention_norms == "split" else None
        self.query = _trunc_normal(f, cf, cf, std=1 / math.sqrt(2 * cf))
        self.key = _trunc_normal(f, cf, cf, std=1 / math.sqrt(2 * cf))
        self.radial_logit = _normal(c, f, std=0.01)
        self.out_gate = _normal(f, cf, std=0.01)
        self.null_logit = nn.Parameter(torch.full((f,), 0.5413))  # softplus(0.5413) ≈ 1
        self.post_mix = SO3Linear(cfg.lmax, h, c, zero_init=True)
        self.part_rows = m_part_rows(cfg.lmax, cfg.mmax)

    def forward(self, h: torch.Tensor, geo: EdgeCache, radial: torch.Tensor) -> torch.Tensor:
        """h (N, D, C), radial (E, L+1, C) with edge type features → (N, D, C)."""
        f, cf = self.cfg.n_focus, self.cfg.focus_channels
        xp = self.pre_mix(h)  # (N, D, H)
        rho = radial if self.lift is None else self.lift(radial)  # (E, L+1, H)
        weight, out_gate = self.attention(xp[:, 0], geo, radial[:, 0])  # (E, F), (N, F)
        agg = self.edge_messages(xp, rho, weight, geo).unflatten(-1, (f, cf))  # (N, D, F, C_f)
        return self.post_mix((agg * out_gate[:, None, :, None].to(agg.dtype)).flatten(2))

    def edge_messages(self, xp: torch.Tensor, rho: torch.Tensor, weight: torch.Tensor, geo: EdgeCache) -> torch.Tensor:
        """Σ_j of the rotated-back, attention-weighted messages, (N, D, H), chunk by chunk over the edges."""
        device = xp.device.type
        amp = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        n_edges = geo.src.shape[0]
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or isinstance(n_edges, torch.SymInt):
            # one chunk: a Python loop over edges would fix the edge count in a traced graph
            src, dst = Segments(geo.src, geo.n_nodes), Segments(geo.dst, geo.n_nodes)
            return self.chunk_messages(src, dst, amp, xp, rho, weight, geo.to_local, geo.to_global)[0]
        size = self.cfg.edge_chunk or max(n_edges, 1)
        params = self.edge_parameters()
        mode = "plain"
        if torch.is_grad_enabled():
            mode = "twice" if self.training else "once"
        stored = self.stored_edges(xp.element_size()) if mode != "plain" else n_edges
        # split, not slices: one backward node concatenates the chunk gradients instead of zero-padding each
        per_edge = [t.split(size) for t in (rho, weight, geo.to_local, geo.to_global)]
        total, start = None, 0
        for (src, dst), edge_inputs in zip(geo.chunk_segments(size), zip(*per_edge)):
            fn = partial(self.chunk_messages, src, dst, amp)
            inputs = (xp, *edge_inputs)
            start += src.index.shape[0]
            if start <= stored:
                (out,) = fn(*inputs)
            elif mode == "twice":  # a force loss differentiates the backward again: recompute there too
                (out,) = recompute(fn, inputs, params)
            else:
                (out,) = checkpoint(fn, *inputs, use_reentrant=False)
            total = out if total is None else total + out
        return total

    def stored_edges(self, element_size: int) -> int:
        """How many edges of this block keep their graph within its share of ``edge_memory_mb``.

        Estimated bytes per edge: k · S · rows · H · element size, with k ≈ 7 for a graph that a
        force loss differentiates twice and k ≈ 2.5 for forces alone (measured on dpa4-air, fp32).
        """
        cfg = self.cfg
        rows = sum(self.part_rows)
        k = 7.0 if self.training else 2.5
        per_edge = k * cfg.so2_layers * rows * cfg.hidden_channels * element_size
        return int(cfg.edge_memory_mb * 2**20 / cfg.n_blocks / per_edge)

    def edge_parameters(self) -> list[nn.Parameter]:
        """Every parameter :meth:`chunk_messages` reads (``recompute`` must be told them)."""
        modules = [self.edge_product, self.so2, self.gates] + ([self.focus_norm] if self.cfg.n_focus > 1 else [])
        params = [p for module in modules for p in module.parameters()]
        return params + ([self.focus_logit] if self.cfg.n_focus > 1 else [])

    def chunk_messages(
        self, src: Segments, dst: Segments, amp: tuple[bool, torch.dtype],
        xp: torch.Tensor, rho: torch.Tensor, weight: torch.Tensor, to_local: torch.Tensor, to_global: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        """One chunk of edges: (A1) → (A2) → focus competition → attention weight → rotate back → Σ_j, (N, D, H).

        ``to_local`` (E, rows, D) and ``to_global`` (E, D, rows) are the chunk's rotations; ``amp`` is the
        autocast state of the forward pass, restored when the backward pass recomputes.
        """
        cfg = self.cfg
        f, cf = cfg.n_focus, cfg.focus_channels
        n_edges = src.index.shape[0]
        with torch.autocast(xp.device.type, dtype=amp[1], enabled=amp[0]):
            local = self.edge_product(xp, src, to_local, rho)  # (E, rows, H)
            # focus-major |m| parts (F, E, rows_m·C_f); views when F = 1
            x = [
                p.unflatten(-1, (f, cf)).permute(2, 0, 1, 3).reshape(f, n_edges, -1)
                for p in local.split(self.part_rows, dim=1)
            ]
            entry_scalar = x[0][..., :cf]  # (F, E, C_f)
            x = self.focus_stacks(*x)
            if f > 1:
                logits = (self.focus_norm(entry_scalar) * self.focus_logit[:, None, :]).sum(-1) / cfg.focus_temperature
                alpha = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0) * (1 - cfg.focus_smoothing) + cfg.focus_smoothing / f
                scale = (alpha * weight.T)[:, :, None].to(x[0].dtype)  # (F, E, 1)
                x = [p * scale for p in x]
            else:
                # one focus: the per-edge attention weight folds into the (E, D, rows) rotation, far smaller than x
                to_global = to_global * weight[:, :, None].to(to_global.dtype)
            local = torch.cat([p.unflatten(-1, (-1, cf)).permute(1, 2, 0, 3).flatten(2) for p in x], dim=1)  # (E, rows, H)
            msg = torch.bmm(to_global.to(local.dtype), local)  # (E, D, H)
            return (segment_sum(msg, dst),)

    def focus_stacks(self, *x: torch.Tensor) -> list[torch.Tensor]:
        """(A2a) S residual gated SO(2) layers on the |m| parts (F, E, rows_m·C_f) → same shapes."""
        cf = self.cfg.focus_channels
        x = list(x)
        for layer, so2 in enumerate(self.so2):
            y = so2(x)
            x = gated_residual(x, y, self.gates[layer](y[0][..., :cf]) if layer < len(self.gates) else None)
        return x

    def attention(self, scalar: torch.Tensor, geo: EdgeCache, rho0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A3) w_ij = s5² e^ℓ / (softplus ζ + ε + Σ_k s5² e^ℓ_ik) per focus (E, F), and the output gate (N, F).

        ℓ_ij = ⟨Q n(x'_i), K n(x'_j)⟩/√C_f + W^rb ρ̃_ij,0. Float32 or wider, with autocast off.
        """
        f, cf = self.cfg.n_focus, self.cfg.focus_channels
        dtype = torch.promote_types(geo.edge_env.dtype, torch.float32)
        with torch.autocast(scalar.device.type, enabled=False):
            x0 = scalar.to(dtype).unflatten(-1, (f, cf))
            s = self.att_norm(x0).transpose(0, 1)  # (F, N, C_f)
            g = s if self.gate_norm is None else self.gate_norm(x0).transpose(0, 1)
            q = torch.bmm(s, self.query.to(dtype)).index_select(1, geo.dst)
            k = torch.bmm(s, self.key.to(dtype)).index_select(1, geo.src)
            logits = (q * k).sum(-1).T / math.sqrt(cf) + rho0.to(dtype) @ self.radial_logit.to(dtype)  # (E, F)
            shift = scatter_max(logits, geo.dst, geo.n_nodes).clamp_min(0.0)  # ≥ 0 keeps the null term ≤ 1
            z = geo.edge_env.to(dtype).pow(2)[:, None] * torch.exp(logits - shift[geo.dst])
            null = (nn.functional.softplus(self.null_logit.to(dtype)) + self.cfg.null_eps) * torch.exp(-shift)  # (N, F)
            weight = z / (null + scatter_sum(z, geo.dst, geo.n_nodes))[geo.dst]
            out_gate = torch.sigmoid((g * self.out_gate.to(dtype)[:, None, :]).sum(-1)).T  # (N, F)
        return weight, out_gate
