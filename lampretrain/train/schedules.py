"""Learning-rate schedules as pure functions of the optimizer step.

A schedule is a multiplier of the peak learning rate; the trainer sets
``lr = peak · factor(step)`` on every parameter group before each step, so a
resumed run needs nothing but the step count.
"""

from __future__ import annotations

import math

from ..recipe import ScheduleSection


def warmup_factor(step: int, warmup_steps: int, start: float) -> float:
    """Linear ramp from ``start`` at step 0 to 1 at ``warmup_steps``."""
    return start + (1.0 - start) * step / warmup_steps


def cosine_factor(progress: float, floor: float) -> float:
    """floor + (1 − floor)·½(1 + cos πp) for p ∈ [0, 1] (cosine annealing)."""
    p = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_factor(step: int, total: int, cfg: ScheduleSection, peak: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` of ``total``.

    - cosine: warmup, then cosine from the peak down to ``min_lr`` at ``total``;
    - wsd: warmup, constant, then cosine to ``min_lr`` over the last
      ``decay_fraction`` of the steps (DPA4: warmup from 0.2·lr, decay 0.65);
    - constant: warmup, then the peak.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return warmup_factor(step, cfg.warmup_steps, cfg.warmup_start_factor)
    floor = cfg.min_lr / peak if peak > 0 else 0.0
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        return cosine_factor((step - cfg.warmup_steps) / span, floor)
    decay_start = max(cfg.warmup_steps, int(round(total * (1.0 - cfg.decay_fraction))))
    if step < decay_start:
        return 1.0
    return cosine_factor((step - decay_start) / max(total - decay_start, 1), floor)


def annealing_fraction(step: int, total: int, cfg: ScheduleSection, peak: float) -> float:
    """lr(step)/peak once warmup is over, 1 during it: how far the decay has gone, which loss weights
    that follow the learning rate read (objective ``final_weights``), so warmup does not move them."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return 1.0
    return lr_factor(step, total, cfg, peak)
