"""Dataset weights, the cost model and the rank-balanced distributed batch sampler."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lampretrain.sampling import (
    BalancedBatchSampler,
    CostModel,
    OversizeWarning,
    dataset_weights,
    effective_mix,
    epoch_counts,
    weights_from_mapping,
)


def _sizes(n: int, seed: int = 0) -> np.ndarray:
    """Long-tailed atom counts like MPtrj (1..444)."""
    return np.random.default_rng(seed).lognormal(3.0, 0.8, size=n).clip(1, 444).astype(np.int64)


def _all_ranks(cost, budget, world, **kw):
    samplers = [BalancedBatchSampler(cost, budget, rank=r, world_size=world, **kw) for r in range(world)]
    return samplers, [list(s) for s in samplers]


def test_temperature_weights():
    n = np.array([1000, 100, 10])
    np.testing.assert_allclose(dataset_weights(n, "proportional"), n / n.sum())
    p = dataset_weights(n, "temperature", temperature=2.0)
    np.testing.assert_allclose(p, np.sqrt(n) / np.sqrt(n).sum())
    np.testing.assert_allclose(dataset_weights(n, "temperature", temperature=1.0), n / n.sum())
    np.testing.assert_allclose(dataset_weights(n, "uniform"), [1 / 3] * 3)
    np.testing.assert_allclose(dataset_weights(n, "explicit", ratios=[1, 1, 2]), [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="allowed: proportional"):
        dataset_weights(n, "balanced-ish")
    with pytest.raises(ValueError, match="one ratio per dataset"):
        dataset_weights(n, "explicit", ratios=[1, 2])
    with pytest.raises(ValueError, match="unknown datasets"):
        weights_from_mapping(["mptrj", "spice"], {"omat": 1.0})


def test_epoch_counts_sum_exactly_and_follow_weights():
    counts = epoch_counts([1000, 100, 10], dataset_weights([1000, 100, 10], "temperature", temperature=2.0))
    assert counts.sum() == 1110
    np.testing.assert_array_equal(counts, [784, 248, 78])  # 1110·√n/Σ√n = 783.8, 247.9, 78.4 by largest remainder
    np.testing.assert_array_equal(epoch_counts([7, 3], np.array([0.7, 0.3])), [7, 3])


def test_epoch_draw_oversamples_whole_permutations():
    dataset = np.array([0] * 50 + [1] * 5)
    sampler = BalancedBatchSampler(np.ones(55), 10.0, dataset=dataset, weights=np.array([0.5, 0.5]), seed=1)
    idx = sampler.epoch_order(0)
    small = idx[dataset[idx] == 1]
    repeats = np.bincount(small, minlength=55)[50:]
    assert small.size == 27 and sorted(repeats) == [5, 5, 5, 6, 6]  # 5 whole permutations, then a prefix
    big = idx[dataset[idx] == 0]
    assert big.size == 28 and np.unique(big).size == 28  # under-sampled: no repeats
    mix = effective_mix(idx, dataset, natoms=np.ones(55), names=["a", "b"], weights=np.array([0.5, 0.5]))
    assert mix["b"]["frames"] == pytest.approx(27 / 55) and mix["b"]["target"] == 0.5
    assert sampler.mix(0, natoms=np.ones(55), names=["a", "b"]) == mix  # the sampler counts the same epoch


def test_cost_model_and_fit():
    m = CostModel(atoms=1.0, edges=0.1, angles=0.01)
    np.testing.assert_allclose(m([10, 2], [300, 20], [5000, 0]), [10 + 30 + 50, 2 + 2])
    with pytest.raises(ValueError, match="no angles counts"):
        m([10], [300])
    rng = np.random.default_rng(0)
    atoms = rng.integers(100, 2000, 40)
    edges = atoms * rng.uniform(20, 60, 40)
    angles = edges * rng.uniform(5, 30, 40)
    seconds = 2e-5 * atoms + 3e-6 * edges + 4e-7 * angles + 0.01
    fit = CostModel.fit(atoms, edges, angles, seconds)
    assert (fit.atoms, fit.edges, fit.angles, fit.per_batch) == pytest.approx((2e-5, 3e-6, 4e-7, 0.01), rel=1e-5)


@pytest.mark.parametrize("world", [1, 3, 8])
def test_every_frame_once_per_epoch_with_equal_steps(world):
    natoms = _sizes(3000)
    samplers, batches = _all_ranks(natoms.astype(float), 900.0, world, seed=5)
    steps = {len(b) for b in batches}
    assert len(steps) == 1 and steps.pop() == samplers[0].plan(0).steps  # DDP needs the same count on every rank
    seen = np.concatenate([np.concatenate([np.array(x) for x in b]) for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(natoms.size))
    assert all(len(x) > 0 for b in batches for x in b)
    for b in batches:
        assert all(natoms[x].sum() <= 900 for x in b)  # budget respected
    plan = samplers[0].plan(0, ranks=range(world))
    assert np.median(plan.max_over_mean()) < 1.02


def test_balance_beats_fixed_count():
    natoms = _sizes(20000, seed=3)
    plan = BalancedBatchSampler(natoms.astype(float), 2000.0, world_size=64, seed=0).plan(0, ranks=range(64))
    balanced = plan.max_over_mean().mean()
    perm = np.random.default_rng(0).permutation(natoms.size)
    per = int(2000 / natoms.mean())
    steps = natoms[perm[: (natoms.size // (64 * per)) * 64 * per]].reshape(-1, 64, per).sum(axis=2)
    fixed = (steps.max(axis=1) / steps.mean(axis=1)).mean()
    assert balanced < 1.01 < 1.2 < fixed


def test_deterministic_and_epoch_dependent():
    cost = _sizes(2000).astype(float)
    a = list(BalancedBatchSampler(cost, 700.0, rank=1, world_size=4, seed=7))
    b = list(BalancedBatchSampler(cost, 700.0, rank=1, world_size=4, seed=7))
    assert a == b
    s = BalancedBatchSampler(cost, 700.0, rank=1, world_size=4, seed=7)
    s.set_epoch(1)
    assert list(s) != a
    assert list(BalancedBatchSampler(cost, 700.0, rank=1, world_size=4, seed=8)) != a


def test_resume_mid_epoch_continues_exact_order():
    cost = _sizes(4000).astype(float)
    ref = BalancedBatchSampler(cost, 800.0, rank=2, world_size=4, seed=11)
    ref.set_epoch(3)
    full = list(ref)
    run = BalancedBatchSampler(cost, 800.0, rank=2, world_size=4, seed=11)
    run.set_epoch(3)
    it = iter(run)
    head = [next(it) for _ in range(7)]
    state = run.state_dict()
    assert state["epoch"] == 3 and state["position"] == 7
    resumed = BalancedBatchSampler(cost, 800.0, rank=2, world_size=4, seed=11)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert resumed.epoch == 4 and resumed.position == 0  # the next epoch starts after a full pass
    with pytest.raises(ValueError, match="world_size=4 but this run has 8"):
        BalancedBatchSampler(cost, 800.0, world_size=8).load_state_dict(state)


def test_oversize_structures_get_their_own_batch():
    cost = np.full(200, 10.0)
    cost[[17, 150, 151]] = [500.0, 1000.0, 120.0]
    ids = [f"mptrj/{k}" for k in range(200)]
    with pytest.warns(OversizeWarning, match="mptrj/17"):
        samplers, batches = _all_ranks(cost, 100.0, 2, ids=ids, seed=0)
    flat = [x for b in batches for x in b]
    assert [17] in flat and [150] in flat and [151] in flat
    assert sorted(i for x in flat for i in x) == list(range(200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversizeWarning)
        assert set(np.concatenate([s.plan(0).oversize for s in samplers])) == {17, 150, 151}
    with pytest.raises(ValueError, match="structure mptrj/17 costs 500 > budget 100"):
        list(BalancedBatchSampler(cost, 100.0, oversize="raise", ids=ids, seed=0))


def test_fewer_frames_than_ranks_pads_every_rank():
    cost = np.array([5.0, 1.0, 3.0])
    samplers, batches = _all_ranks(cost, 10.0, 5)
    assert all(len(b) == 1 and len(b[0]) == 1 for b in batches)
    assert {b[0][0] for b in batches} == {0, 1, 2}
    assert sum(s.plan().padded for s in samplers) == 2


def test_weighted_mix_across_ranks():
    dataset = np.repeat([0, 1], [3000, 300])
    cost = _sizes(3300).astype(float)
    w = dataset_weights([3000, 300], "temperature", temperature=2.0)
    samplers, batches = _all_ranks(cost, 1000.0, 4, dataset=dataset, weights=w, seed=2)
    drawn = np.concatenate([np.concatenate([np.array(x) for x in b]) for b in batches])
    assert drawn.size == 3300
    assert (dataset[drawn] == 1).sum() == epoch_counts([3000, 300], w)[1]
    mix = samplers[0].mix(names=["big", "small"])
    assert mix["small"]["frames"] == pytest.approx(w[1], abs=1e-3)


def test_oversize_steps_are_spread_through_the_epoch_not_first():
    # half the structures cost more than the budget: they used to fill the first steps of
    # every epoch, so a short run saw nothing else (the demo trained on one dataset only)
    cost = np.where(np.arange(400) % 2 == 0, 150.0, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversizeWarning)
        plan = BalancedBatchSampler(cost, 100.0, seed=0).plan(0)
    alone = np.array([cost[plan.batch(s, 0)].max() > 100.0 for s in range(plan.steps)])
    assert alone.sum() == 200
    first_quarter = alone[: plan.steps // 4]
    assert 0.2 < first_quarter.mean() < 0.95  # a mix, not only oversize steps
    assert sorted(np.concatenate([plan.batch(s, 0) for s in range(plan.steps)]).tolist()) == list(range(400))


def test_oversize_steps_are_spread_when_an_oversampled_dataset_repeats_structures():
    # an oversampled dataset repeats its structures within an epoch: the oversize ones must still be spread
    # through the epoch, not held back to its end
    cost = np.where(np.arange(60) < 10, 150.0, 10.0)  # 10 oversize structures, 50 small
    dataset = (np.arange(60) >= 10).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversizeWarning)
        s = BalancedBatchSampler(cost, 100.0, dataset=dataset, weights=np.array([0.025, 0.975]), epoch_size=400, seed=1)
        plan = s.plan(0)
    alone = np.nonzero([cost[plan.batch(k, 0)].max() > 100.0 for k in range(plan.steps)])[0]
    assert alone.size == 10
    assert 1 <= (alone < plan.steps / 2).sum() <= 9  # in both halves of the epoch
    drawn = np.concatenate([plan.batch(k, 0) for k in range(plan.steps)])
    assert np.array_equal(np.sort(drawn), np.sort(s.epoch_order(0)))  # the epoch's draw, each once
