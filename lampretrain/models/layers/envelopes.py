"""Smooth cutoff envelopes: functions of x = r / r_c that go to 0 at x = 1 with continuous derivatives."""

from __future__ import annotations

import torch


def polynomial_envelope(x: torch.Tensor, p: int) -> torch.Tensor:
    """DimeNet's envelope u_p(x) = 1 − (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) − p(p+1)/2 x^(p+2), 0 for x ≥ 1.

    u(1) = u'(1) = u''(1) = 0 (C²).
    """
    a = -(p + 1) * (p + 2) / 2
    b = p * (p + 2)
    c = -p * (p + 1) / 2
    xp = x.pow(p)
    u = 1 + xp * (a + x * (b + c * x))
    return torch.where(x < 1, u, torch.zeros_like(x))


def c3_envelope(x: torch.Tensor, p: int) -> torch.Tensor:
    """DPA4's C³ envelope s_p(x) = 1 + x^p (a + b x + c x² + d x³), 0 for x ≥ 1.

    a = −(p+1)(p+2)(p+3)/6, b = p(p+2)(p+3)/2, c = −p(p+1)(p+3)/2, d = p(p+1)(p+2)/6,
    so s and its first three derivatives vanish at x = 1 (s5 = 1 − 56x⁵ + 140x⁶ − 120x⁷ + 35x⁸).
    """
    a = -(p + 1) * (p + 2) * (p + 3) / 6
    b = p * (p + 2) * (p + 3) / 2
    c = -p * (p + 1) * (p + 3) / 2
    d = p * (p + 1) * (p + 2) / 6
    s = 1 + x.pow(p) * (a + x * (b + x * (c + d * x)))
    return torch.where(x < 1, s, torch.zeros_like(x))
