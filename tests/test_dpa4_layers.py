"""Spherical harmonics, Wigner-D, edge frames and the Lebedev projection used by DPA4 (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from lampretrain.models.layers.lebedev import lebedev_grid, lebedev_order_for
from lampretrain.models.layers.s2_grid import SphereGrid
from lampretrain.models.layers.so2 import SO2Linear, m_major_rows, m_part_rows
from lampretrain.models.layers.spherical_harmonics import real_spherical_harmonics, sh_dim
from lampretrain.models.layers.wigner import (
    WignerD,
    edge_quaternion,
    quaternion_multiply,
    quaternion_to_matrix,
    z_roll_quaternion,
)

DT = torch.float64


def random_rotation(gen: torch.Generator, n: int = 1) -> torch.Tensor:
    q = torch.randn(n, 4, generator=gen, dtype=DT)
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


def unit_vectors(gen: torch.Generator, n: int) -> torch.Tensor:
    v = torch.randn(n, 3, generator=gen, dtype=DT)
    return v / v.norm(dim=-1, keepdim=True)


def test_spherical_harmonics_are_orthonormal_and_match_closed_forms():
    points, weights = lebedev_grid(lebedev_order_for(12))
    y = real_spherical_harmonics(torch.from_numpy(points), 6, "integral")
    gram = (y.T * torch.from_numpy(weights)) @ y * (4 * math.pi)
    assert torch.allclose(gram, torch.eye(sh_dim(6), dtype=DT), atol=1e-13)
    u = unit_vectors(torch.Generator().manual_seed(0), 5)
    x, yy, z = u.unbind(-1)
    y_norm = real_spherical_harmonics(u, 2, "norm")
    assert torch.allclose(y_norm[:, 1:4], torch.stack([yy, z, x], -1), atol=1e-14)  # l = 1 is (y, z, x)
    assert torch.allclose(y_norm[:, 6], 0.5 * (3 * z**2 - 1), atol=1e-14)
    assert torch.allclose(y_norm[:, 4], math.sqrt(3) * x * yy, atol=1e-14)


def test_selected_harmonic_rows_equal_the_full_set_indexed():
    """The |m| ≤ 1 rows that the edge-frame Wigner rows need, formed alone (shorter recursions), equal the full set's."""
    u = unit_vectors(torch.Generator().manual_seed(6), 9)
    for lmax, mmax in ((3, 1), (5, 2)):
        rows = m_major_rows(lmax, mmax)
        full = real_spherical_harmonics(u, lmax, "integral")
        assert (real_spherical_harmonics(u, lmax, "integral", rows) - full[:, rows]).abs().max() <= 1e-15


def test_wigner_d_rotates_harmonics_and_is_a_representation():
    gen = torch.Generator().manual_seed(1)
    lmax = 5
    wigner = WignerD(lmax).double()
    q = random_rotation(gen, 2)
    d = wigner(q)
    u = unit_vectors(gen, 7)
    lhs = real_spherical_harmonics(u @ q[0].T, lmax, "norm")
    assert torch.allclose(lhs, real_spherical_harmonics(u, lmax, "norm") @ d[0].T, atol=1e-12)
    assert torch.allclose(wigner(q[:1] @ q[1:])[0], d[0] @ d[1], atol=1e-12)
    assert torch.allclose(d[0] @ d[0].T, torch.eye(sh_dim(lmax), dtype=DT), atol=1e-12)


def test_edge_frame_maps_edges_to_z_and_is_smooth_at_the_poles():
    gen = torch.Generator().manual_seed(2)
    poles = torch.tensor([[0.0, 0, 1], [0, 0, -1], [1e-9, 0, 1], [0, -1e-9, -1], [0, 0, 1e-3]], dtype=DT)
    vectors = torch.cat([unit_vectors(gen, 50) * 2.5, poles * 2.5]).requires_grad_(True)
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    rot = quaternion_to_matrix(edge_quaternion(unit))
    assert torch.allclose(torch.einsum("eij,ej->ei", rot, unit), torch.tensor([0.0, 0, 1], dtype=DT), atol=1e-12)
    wigner = WignerD(3, m_major_rows(3, 1)).double()
    (grad,) = torch.autograd.grad(wigner(rot).pow(3).sum(), vectors)
    assert torch.isfinite(grad).all()


def test_lebedev_projection_of_the_bilinear_product_is_exact_at_order_3l():
    gen = torch.Generator().manual_seed(3)
    for lmax, order in ((3, 9), (4, 13), (5, 15)):
        grid = SphereGrid(lmax)
        assert grid.order == order
        a, b = (torch.randn(2, sh_dim(lmax), 4, generator=gen, dtype=DT) for _ in range(2))
        reference = SphereGrid(lmax, order=131).project_product(a, b)
        assert (grid.project_product(a, b) - reference).abs().max() < 1e-12
        below = SphereGrid(lmax, order=max(o for o in (3, 5, 7, 9, 11, 13) if o < order))
        assert (below.project_product(a, b) - reference).abs().max() > 1e-3
        # from ∘ to is the identity on degree ≤ L (product with the constant field 1)
        one = torch.zeros_like(a)
        one[:, 0] = math.sqrt(lmax + 1)
        assert torch.allclose(grid.project_product(a, one), a, atol=1e-12)


def test_so2_linear_commutes_with_rolls_about_the_edge():
    gen = torch.Generator().manual_seed(4)
    lmax, mmax, c = 3, 2, 3
    layer = SO2Linear(lmax, mmax, c, n_focus=2).double()
    rows = m_major_rows(lmax, mmax)
    wigner = WignerD(lmax, rows).double()
    roll = quaternion_to_matrix(z_roll_quaternion(torch.tensor([0.7], dtype=DT)))
    d_roll = wigner(roll)[0][:, rows]  # (rows, rows) acting on m-major coefficients
    x = torch.randn(2, 5, len(rows), c, generator=gen, dtype=DT)
    parts = m_part_rows(lmax, mmax)

    def apply(x):  # (F, E, rows, C) in m-major order, through the per-|m| parts and back
        out = layer([p.flatten(2) for p in x.split(parts, dim=2)])
        return torch.cat([o.unflatten(-1, (-1, c)) for o in out], dim=2)

    rolled_then = apply(torch.einsum("rs,fesc->ferc", d_roll, x))
    then_rolled = torch.einsum("rs,fesc->ferc", d_roll, apply(x))
    assert torch.allclose(rolled_then, then_rolled, atol=1e-12)


def test_z_roll_composes_with_edge_quaternions():
    u = unit_vectors(torch.Generator().manual_seed(5), 4)
    q = quaternion_multiply(z_roll_quaternion(torch.full((4,), 1.3, dtype=DT)), edge_quaternion(u))
    rot = quaternion_to_matrix(q)
    assert torch.allclose(torch.einsum("eij,ej->ei", rot, u), torch.tensor([0.0, 0, 1], dtype=DT), atol=1e-12)


def test_unavailable_lebedev_order_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        lebedev_grid(8)
