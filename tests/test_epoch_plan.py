"""Epoch planning that scales: each rank plans only its share, with the sampler's guarantees (small sizes)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from lampretrain.bench.balance import mptrj_like
from lampretrain.sampling import BalancedBatchSampler, CostModel, OversizeWarning, dataset_weights, epoch_counts
from lampretrain.sampling.balanced import UNIT, _bins_needed, _pack, _Permutation, size_class


def _mptrj_cost(n: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """MPtrj-like costs (bench/balance.py) and a budget of 1000 average atoms."""
    atoms, edges, angles = mptrj_like(n, seed)
    cost = CostModel(1.0, 0.1, 0.01)(atoms, edges, angles)
    return cost, 1000.0 * cost.sum() / atoms.sum()


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversizeWarning)
        return fn(*args, **kw)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_keyed_bijection(n):
    keys = np.random.default_rng(n).integers(0, 2**64 - 1, size=(4, 2), dtype=np.uint64, endpoint=True)
    image = _Permutation(n)(np.arange(n, dtype=np.uint64), keys)
    assert np.array_equal(np.sort(image), np.arange(n))
    # one key set per position (the copies of an oversampled dataset): still a bijection for each key set
    x = np.tile(np.arange(n), 3)
    per = np.repeat(np.random.default_rng(1).integers(0, 2**63, size=(4, 2, 3), dtype=np.uint64), n, axis=2)
    y = _Permutation(n)(x, per).reshape(3, n)
    assert all(np.array_equal(np.sort(row), np.arange(n)) for row in y)
    if n >= 1000:
        assert not np.array_equal(y[0], y[1])  # different keys, different orders
        assert abs(np.corrcoef(image[:-1], image[1:])[0, 1]) < 0.1  # neighbours are not correlated


def test_size_classes_match_their_bounds():
    w = np.concatenate([np.arange(1, 70_000), np.random.default_rng(0).integers(1, UNIT + 1, 100_000), [UNIT]])
    c = size_class(w)
    from lampretrain.sampling.balanced import _CLASS_MAX

    assert c.min() >= 0 and (w <= _CLASS_MAX[c]).all()
    assert (np.diff(size_class(np.sort(w)[::-1])) >= 0).all()  # costlier never in a later class


@pytest.mark.parametrize("kind", ["halves", "near-budget", "uniform", "mptrj"])
def test_packing_bound_holds_for_hard_size_mixes(kind):
    rng = np.random.default_rng(7)
    w = {
        "halves": np.full(301, UNIT // 2 + 1),  # no two fit together
        "near-budget": np.concatenate([np.full(40, UNIT), rng.integers(1, UNIT // 50, 3000)]),
        "uniform": rng.integers(1, UNIT + 1, 5000),
        "mptrj": np.ceil(_mptrj_cost(20_000)[0] * UNIT / _mptrj_cost(20_000)[1]).clip(1, UNIT).astype(np.int64),
    }[kind]
    counts = np.bincount(size_class(w), minlength=97)[None]
    sums = np.bincount(size_class(w), weights=w, minlength=97).astype(np.int64)[None]
    bins = int(_bins_needed(counts, sums)[0])
    batch, load = _pack(w, bins)  # raises when a batch ends above the budget
    assert load.max() <= UNIT and np.array_equal(np.bincount(batch, weights=w, minlength=bins), load)
    if kind == "halves":
        assert bins == w.size
    if kind == "mptrj":
        assert w.sum() / (bins * UNIT) > 0.97  # the bound does not waste the budget
        assert (load.max() - np.median(load)) / UNIT < 0.01  # batches level within the small structures' size


@pytest.mark.parametrize("world", [8, 64, 256])
def test_guarantees_on_an_mptrj_like_epoch(world):
    cost, budget = _mptrj_cost(60_000)
    sampler = BalancedBatchSampler(cost, budget, world_size=world, seed=3)
    plan = _quiet(sampler.plan, 0, ranks=range(world))
    assert plan.loads.shape == (plan.steps, world)  # the same number of steps on every rank
    assert plan.max_over_mean().mean() <= 1.05
    batches = [plan.batch(s, r) for s in range(plan.steps) for r in range(world)]
    assert all(b.size for b in batches)
    assert all(cost[b].sum() <= budget or b.size == 1 for b in batches)  # within budget, or alone when oversize
    assert np.array_equal(np.sort(plan.items), np.arange(cost.size))  # nothing dropped, nothing repeated
    mean_fill = cost.sum() / (plan.steps * world * budget)
    assert mean_fill > 0.9


def test_each_rank_plans_alone_what_the_simulation_of_all_ranks_gives():
    cost, budget = _mptrj_cost(20_000, seed=2)
    world = 16
    together = _quiet(BalancedBatchSampler(cost, budget, world_size=world, seed=9).plan, 4, ranks=range(world))
    for r in (0, 5, 15):
        alone = _quiet(BalancedBatchSampler(cost, budget, rank=r, world_size=world, seed=9).plan, 4)
        assert alone.steps == together.steps
        for s in range(alone.steps):
            assert np.array_equal(alone.batch(s, r), together.batch(s, r))
    other_seed = _quiet(BalancedBatchSampler(cost, budget, world_size=world, seed=10).plan, 4, ranks=range(world))
    assert not np.array_equal(other_seed.items, together.items)


def test_memory_per_rank_does_not_grow_with_world_size():
    cost, budget = _mptrj_cost(40_000, seed=4)
    held = {}
    for world in (4, 16, 64):
        sampler = BalancedBatchSampler(cost, budget, rank=world - 1, world_size=world, seed=0)
        plan = _quiet(sampler.plan, 0)
        # the plan is this rank's share (≈ N/R structures, S steps), nothing of the other ranks
        assert plan.items.size <= 1.1 * cost.size / world
        assert plan.offsets.size == plan.steps + 1 and plan.loads.shape == (plan.steps, 1)
        arrays = [v for v in vars(sampler).values() if isinstance(v, np.ndarray)]
        assert max(a.size for a in arrays) == cost.size  # the cost column only; no per-frame plan or order
        assert sampler.cost.dtype == np.float32
        held[world] = plan.items.nbytes + plan.offsets.nbytes + plan.loads.nbytes
    assert held[64] < held[16] < held[4]


def test_resume_mid_epoch_equals_uninterrupted_with_weights():
    cost, budget = _mptrj_cost(8_000, seed=5)
    dataset = np.repeat([0, 1, 2], [6000, 1500, 500])
    w = dataset_weights([6000, 1500, 500], "temperature", temperature=2.0)
    kw = dict(world_size=4, rank=3, dataset=dataset, weights=w, epoch_size=9000, seed=21)
    ref = BalancedBatchSampler(cost, budget, **kw)
    ref.set_epoch(2)
    full = _quiet(list, ref)
    run = BalancedBatchSampler(cost, budget, **kw)
    run.set_epoch(2)
    it = iter(run)
    head = _quiet(lambda: [next(it) for _ in range(len(full) // 2)])
    resumed = BalancedBatchSampler(cost, budget, **kw)
    resumed.load_state_dict(run.state_dict())
    assert head + _quiet(list, resumed) == full
    drawn = np.concatenate([np.array(b) for b in full])
    counts = np.bincount(dataset[drawn], minlength=3)
    everyone = _quiet(BalancedBatchSampler(cost, budget, **{**kw, "rank": 0}).plan, 2, ranks=range(4))
    np.testing.assert_array_equal(np.bincount(dataset[everyone.items], minlength=3), epoch_counts([6000, 1500, 500], w, 9000))
    assert counts.sum() == drawn.size


def test_step_count_and_order_depend_on_the_epoch_only_through_the_seed():
    cost, budget = _mptrj_cost(5_000, seed=6)
    a = BalancedBatchSampler(cost, budget, world_size=8, rank=2, seed=1)
    b = BalancedBatchSampler(cost, budget, world_size=8, rank=2, seed=1)
    pa, pb = _quiet(a.plan, 3), _quiet(b.plan, 3)
    assert np.array_equal(pa.items, pb.items) and np.array_equal(pa.offsets, pb.offsets)
    assert not np.array_equal(_quiet(a.plan, 4).items, pa.items)


def test_bench_scale_prints_the_planning_keys(capsys):
    from lampretrain import cli

    assert cli.main(["bench", "scale", "--frames", "20000", "--ranks", "16", "--no-save"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by = {x["bench"]: x for x in lines}
    assert set(by) == {"scale_index", "scale", "scale_resume", "scale_detail"}
    assert list(by["scale"]) == ["bench", "frames", "ranks", "plan_s", "plan_rss_mb", "max_over_mean", "dropped"]
    assert by["scale"]["frames"] == 20000 and by["scale"]["ranks"] == 16 and by["scale"]["dropped"] == 0
    assert by["scale"]["max_over_mean"] <= 1.05 and by["scale_resume"]["same_batch"] is True
