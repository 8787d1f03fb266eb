"""EMA of the weights: the decay warms up, so a short run's average forgets the random initialisation."""

import torch

from lampretrain.train.ema import EMA


def test_short_run_average_forgets_the_initial_weights():
    # θ jumps from its init (0) to 1 and stays: after 150 steps at d = 0.99 a fixed-decay
    # average would still hold 0.99^150 ≈ 22% of the init; the warmed-up one keeps < 1%.
    p = torch.nn.Parameter(torch.zeros(4))
    ema = EMA({"w": p}, 0.99)
    with torch.no_grad():
        p.fill_(1.0)
    for step in range(150):
        ema.update(step)
    assert torch.all(ema.shadow["w"] > 0.99)


def test_decay_ramps_to_the_configured_value():
    ema = EMA({"w": torch.nn.Parameter(torch.zeros(1))}, 0.999)
    assert ema.decay_at(0) == 0.1  # first update: mostly the trained weights
    decays = [ema.decay_at(t) for t in range(20000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    assert decays[-1] == 0.999


def test_average_follows_the_formula():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    ema = EMA({"w": p}, 0.5)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update(0)  # d_0 = 0.1: 0.1·2 + 0.9·4
    assert torch.allclose(ema.shadow["w"], torch.tensor([3.8]))
    ema.update(5)  # d_5 = min(0.5, 6/15) = 0.4: 0.4·3.8 + 0.6·4
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.4 * 3.8 + 0.6 * 4.0]))
