"""Real spherical harmonics Y_lm of unit vectors, packed at index ι(l, m) = l² + l + m.

m = 0 is the z axis. Every Y_lm is a polynomial in (x, y, z), so the values and
their gradients are finite everywhere, including the poles.
"""

from __future__ import annotations

import math

import torch


def sh_dim(lmax: int) -> int:
    """(L+1)² coefficients for degrees 0..L."""
    return (lmax + 1) ** 2


def sh_degrees(lmax: int) -> torch.Tensor:
    """Degree l of every packed coefficient, ((L+1)²,) long."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def real_spherical_harmonics(
    unit: torch.Tensor, lmax: int, normalization: str = "norm", rows: list[int] | None = None
) -> torch.Tensor:
    """Real SH of unit vectors (..., 3) → (..., (L+1)²), or (..., len(rows)) for packed indices ``rows``.

    Y_lm = N_lm Q_l^|m|(z) · {√2 Re (x+iy)^m, m > 0;  1, m = 0;  √2 Im (x+iy)^|m|, m < 0}
    with Q_l^m = P_l^m(z) / sin^m θ from the three-term Legendre recursion and
    N_lm = √((2l+1)/4π · (l−m)!/(l+m)!) (no Condon–Shortley phase).
    ``normalization="integral"`` is orthonormal on S²; ``"norm"`` scales degree l by √(4π/(2l+1)),
    so that Σ_m Y_lm(r̂)² = 1 and Y_l0(e_z) = 1. With ``rows`` only those coefficients are
    formed, and the recursions stop at the largest |m| among them.
    """
    if normalization not in ("norm", "integral"):
        raise ValueError(f"normalization must be 'norm' or 'integral', got {normalization!r}")
    wanted = [(l, m) for l in range(lmax + 1) for m in range(-l, l + 1)]
    if rows is not None:
        wanted = [wanted[k] for k in rows]
    mmax = max(abs(m) for _, m in wanted)
    x, y, z = unit.unbind(-1)
    cos_m = [torch.ones_like(x)]  # Re (x + iy)^m
    sin_m = [torch.zeros_like(x)]  # Im (x + iy)^m
    for m in range(1, mmax + 1):
        cos_m.append(x * cos_m[-1] - y * sin_m[-1])
        sin_m.append(x * sin_m[-1] + y * cos_m[-2])
    q: dict[tuple[int, int], torch.Tensor] = {}
    for m in range(mmax + 1):
        q[m, m] = torch.full_like(z, float(math.prod(range(1, 2 * m, 2))))
        if m + 1 <= lmax:
            q[m + 1, m] = (2 * m + 1) * z * q[m, m]
        for l in range(m + 2, lmax + 1):
            q[l, m] = ((2 * l - 1) * z * q[l - 1, m] - (l + m - 1) * q[l - 2, m]) / (l - m)
    out = []
    for l, m in wanted:
        scale = 1.0 if normalization == "norm" else math.sqrt((2 * l + 1) / (4 * math.pi))
        a = abs(m)
        n = scale * math.sqrt(math.factorial(l - a) / math.factorial(l + a)) * (math.sqrt(2.0) if m else 1.0)
        out.append(n * q[l, a] * (cos_m[a] if m >= 0 else sin_m[a]))
    return torch.stack(out, dim=-1)
