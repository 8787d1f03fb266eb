"""Lebedev quadrature on the unit sphere (``scipy.integrate.lebedev_rule``).

A rule of order p integrates every polynomial of degree ≤ p on S² exactly,
with far fewer points than a product (θ, φ) grid.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.integrate import lebedev_rule

LEBEDEV_ORDERS = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 35, 41, 47, 53, 59, 65, 71, 77, 83, 89,
                  95, 101, 107, 113, 119, 125, 131)


def lebedev_order_for(degree: int) -> int:
    """The smallest available rule that is exact for polynomials of degree ``degree``."""
    for order in LEBEDEV_ORDERS:
        if order >= degree:
            return order
    raise ValueError(f"no Lebedev rule is exact to degree {degree}; the highest order is {LEBEDEV_ORDERS[-1]}")


@lru_cache(maxsize=None)
def lebedev_grid(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (A, 3) on the unit sphere and weights (A,) normalised to Σ w_a = 1 (float64)."""
    if order not in LEBEDEV_ORDERS:
        raise ValueError(f"Lebedev order {order} is not available; choose one of {LEBEDEV_ORDERS}")
    x, w = lebedev_rule(order)
    points = np.ascontiguousarray(x.T)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points, w / w.sum()
