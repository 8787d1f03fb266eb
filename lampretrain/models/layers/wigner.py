"""Quaternion edge frames and real Wigner-D matrices.

Convention: D(R) acts on packed real-SH coefficients so that Y(R x) = D(R) Y(x)
(``spherical_harmonics.real_spherical_harmonics``). An edge frame R_ij is a
rotation with R_ij r̂_ij = e_z; D(R_ij) then carries a node's coefficients
into the edge's local frame, where the edge direction is the m = 0 axis.
"""

from __future__ import annotations

import torch

from .lebedev import lebedev_grid, lebedev_order_for
from .spherical_harmonics import real_spherical_harmonics, sh_dim


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a·b of (w, x, y, z) quaternions (..., 4)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix (..., 3, 3) of a unit quaternion (w, x, y, z): v ↦ q v q*."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))


def z_roll_quaternion(gamma: torch.Tensor) -> torch.Tensor:
    """Rotation by γ about z, (...,) → (..., 4)."""
    half = 0.5 * gamma
    zero = torch.zeros_like(half)
    return torch.stack([torch.cos(half), zero, zero, torch.sin(half)], dim=-1)


def smoothstep(t: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """C^∞ step σ(1/(1−t) − 1/t): 0 for t ≤ 0, 1 for t ≥ 1, all derivatives 0 at both ends.

    ``t`` is clamped into [margin, 1 − margin], where the step is already 0 or 1 to
    double precision, so 1/t and its gradient stay finite.
    """
    t = t.clamp(margin, 1 - margin)
    return torch.sigmoid(1 / (1 - t) - 1 / t)


def edge_quaternion(unit: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Quaternion (E, 4) of a rotation taking each unit vector (E, 3) to e_z (DPA4 SM eqs. 48–50).

    Two charts, q⁺ = (1+z, y, −x, 0)/√(2(1+z)) (regular away from −z) and
    q⁻ = (−x, 0, 1−z, y)/√(2(1−z)) (regular away from +z), are sign-aligned and
    blended by a C^∞ step in (z+1)/2, then renormalised. Both charts map r̂ to e_z,
    so the blend differs from either only by a roll about z, which the model ignores.
    """
    x, y, z = unit.unbind(-1)
    zero = torch.zeros_like(z)
    q_plus = torch.stack([1 + z, y, -x, zero], dim=-1) * torch.rsqrt((2 * (1 + z)).clamp_min(eps))[:, None]
    q_minus = torch.stack([-x, zero, 1 - z, y], dim=-1) * torch.rsqrt((2 * (1 - z)).clamp_min(eps))[:, None]
    sign = torch.where((q_plus * q_minus).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(unit.dtype)
    blend = smoothstep(0.5 * (z + 1))[:, None]
    q = blend * q_plus + (1 - blend) * sign * q_minus
    return q / q.norm(dim=-1, keepdim=True)


class WignerD(torch.nn.Module):
    """Rows of the real Wigner-D matrix D(R) for degrees 0..L, from rotation matrices.

    D(R) = Σ_a w_a Y(R q_a) Y(q_a)ᵀ over a Lebedev rule exact to degree 2L: since
    Y(R x) = D(R) Y(x) and Σ_a w_a Y(q_a) Y(q_a)ᵀ = I for orthonormal Y, this is exact,
    block-diagonal in l, and a polynomial in R (smooth, no Euler angles).
    """

    def __init__(self, lmax: int, rows: list[int] | None = None):
        super().__init__()
        self.lmax = lmax
        points, weights = lebedev_grid(lebedev_order_for(2 * lmax))
        points = torch.from_numpy(points)
        basis = real_spherical_harmonics(points, lmax, "integral")  # (A, D)
        self.rows = list(range(sh_dim(lmax))) if rows is None else list(rows)
        self.register_buffer("points", points, persistent=False)  # (A, 3)
        self.register_buffer("basis", basis * torch.from_numpy(weights)[:, None] * (4 * torch.pi), persistent=False)

    def forward(self, rotation: torch.Tensor) -> torch.Tensor:
        """(E, 3, 3) → (E, len(rows), (L+1)²)."""
        rotated = torch.einsum("eij,aj->eai", rotation, self.points.to(rotation.dtype))
        sh = real_spherical_harmonics(rotated, self.lmax, "integral", self.rows)  # (E, A, rows)
        return torch.einsum("ear,ak->erk", sh, self.basis.to(rotation.dtype))
