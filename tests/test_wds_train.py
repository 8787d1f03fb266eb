"""Training from WebDataset tar shards (``data.format: wds``): the streaming sampler's guarantees, the reader on
real shards written by prep, the mistakes a user meets (one line each), and real 2-rank torchrun runs (gloo) that
compare the loss with the LMDB path and resume a SIGKILLed run bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lampretrain.config import from_dict
from lampretrain.prep.pipeline import prepare
from lampretrain.prep.spec import PrepSpec
from lampretrain.recipe import parse_recipe
from lampretrain.sampling import BalancedBatchSampler, StreamBatchSampler, epoch_counts
from lampretrain.store.index import StoreError, StoreIndex
from lampretrain.store.wds_shards import ShardError

from finetune_support import AL, FEO, REAL
from test_train import ENV, REPO, pretrain_cmd, run, saved_tensors, write_recipe

SPICE = REAL / "spice_hdf5/SPICE-1.1.4_n2.hdf5"
ANI = REAL / "ani1x_hdf5/ani1_n5.hdf5"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The trainer tests' four real datasets, in small shards (several per dataset), both formats."""
    out = tmp_path_factory.mktemp("wds") / "store"
    sources = [{"path": str(FEO), "dataset": "mp_pbeu"}, {"path": str(AL), "dataset": "mp_r2scan"},
               {"path": str(SPICE), "dataset": "spice"}, {"path": str(ANI), "dataset": "ani1x"}]
    spec = from_dict(PrepSpec, {"name": "wds", "output": str(out), "sources": sources, "split": {"val": 0.1},
                                "shard_size_mb": 0.01})
    prepare(spec, workers=1, progress=False)
    return out


def recipe(tmp_path: Path, store: Path, **data) -> dict:
    raw = yaml.safe_load(write_recipe(tmp_path, store).read_text())
    raw["data"].update({"format": "wds", "workers": 0, **data})
    return raw


# --- the plan ----------------------------------------------------------------------------------------------------------


def synthetic(n: int = 12000, shards: int = 30):
    rng = np.random.default_rng(0)
    cost = np.exp(rng.normal(3.0, 0.8, size=n)).clip(2, 400)
    dataset = np.repeat(np.arange(3), [n // 2, n // 3, n - n // 2 - n // 3])
    shard = np.repeat(np.arange(shards), -(-n // shards))[:n]
    return cost, dataset, shard


@pytest.mark.parametrize("world", [1, 3, 8])
def test_every_frame_once_equal_steps_and_windows_hold_their_batches(world):
    cost, dataset, shard = synthetic()
    sampler = StreamBatchSampler(cost, 600, 0, world, dataset=dataset, seed=3, shard=shard, buffer=500)
    plan = sampler.plan(0, ranks=range(world))
    assert np.array_equal(np.sort(plan.items), np.arange(cost.size))  # nothing dropped, nothing repeated
    assert plan.windows == -(-cost.size // (world * 500)) and plan.steps == plan.windows * plan.window_steps
    assert plan.max_over_mean().max() <= 1.05 and plan.loads.max() <= 600
    assert plan.loads.sum() / (plan.steps * world * 600) > 0.9  # the batches are full
    for r in range(world):
        alone = StreamBatchSampler(cost, 600, r, world, dataset=dataset, seed=3, shard=shard, buffer=500).plan(0)
        assert alone.steps == plan.steps  # every rank the same step count, planned without communication
        for j in range(plan.windows):
            stream = plan.stream(j, r)
            assert np.array_equal(alone.stream(j, r), stream)
            # a window is read front to back: runs of one shard in increasing store order
            same = shard[stream[1:]] == shard[stream[:-1]]
            assert (np.diff(stream)[same] > 0).all()
            steps = range(j * plan.window_steps, (j + 1) * plan.window_steps)
            held = np.concatenate([plan.batch(s, r) for s in steps])
            assert np.array_equal(np.sort(held), np.sort(stream))  # the window's batches are its frames
            for s in steps:
                assert np.array_equal(alone.batch(s, r), plan.batch(s, r))


def test_weights_mix_datasets_as_the_lmdb_path_and_resume_mid_window():
    cost, dataset, shard = synthetic()
    weights = np.array([0.2, 0.3, 0.5])
    options = dict(dataset=dataset, weights=weights, epoch_size=15000, seed=1)
    stream = StreamBatchSampler(cost, 600, 1, 2, shard=shard, buffer=700, segment=100, **options)
    lmdb = BalancedBatchSampler(cost, 600, 1, 2, **options)
    counts = epoch_counts(np.bincount(dataset), weights, 15000)
    for sampler in (stream, lmdb):
        drawn = np.bincount(dataset[sampler.epoch_order(2)], minlength=3)
        assert np.array_equal(drawn, counts)  # the same frames per dataset in both formats
    whole = list(stream)
    position = stream.plan(0).window_steps + 3  # inside the second window
    resumed = StreamBatchSampler(cost, 600, 1, 2, shard=shard, buffer=700, segment=100, **options)
    resumed.load_state_dict(stream.state_dict(position) | {"epoch": 0})
    assert list(resumed) == whole[position:]
    with pytest.raises(ValueError, match="buffer=700 but this run has 500"):
        StreamBatchSampler(cost, 600, 1, 2, shard=shard, buffer=500, **options).load_state_dict(stream.state_dict())


# --- the reader and the loader on real shards --------------------------------------------------------------------------


def _key(frame) -> tuple:
    return (frame.source, frame.positions.shape[0], round(float(frame.positions.sum()), 6))


def test_stream_reads_the_planned_frames_from_prep_shards_and_resumes(store, tmp_path):
    """Each micro-batch holds exactly the frames the plan names (compared with the LMDB shards), over two epochs
    and from a position inside a later window."""
    from lampretrain.graph.datasets import LmdbFrameDataset
    from lampretrain.train.data import build_train_data

    index = StoreIndex.open(store)
    assert len(index.shard_paths("wds", "train")) >= 8  # several shards per dataset
    cfg = parse_recipe(recipe(tmp_path, store, wds={"shuffle_buffer": 12})).data
    data = build_train_data(cfg, 1, 2, 0)
    batches = data.sampler
    rows = batches.row
    lmdb = LmdbFrameDataset.from_rows(index, "train", rows)
    plan = batches.plan(0)
    assert plan.windows >= 3
    epochs = []
    for epoch in (0, 1):
        batches.load_state_dict({"epoch": epoch, "position": 0})
        got = list(batches)
        assert len(got) == batches.plan(epoch).steps
        for step, frames in enumerate(got):
            assert [_key(f) for f in frames] == [_key(lmdb[i]) for i in batches.plan(epoch).batch(step, 1)]
        epochs.append([[_key(f) for f in b] for b in got])
    assert epochs[0] != epochs[1]
    position = plan.window_steps + 1
    batches.load_state_dict({"epoch": 0, "position": position})
    assert [[_key(f) for f in b] for b in batches] == epochs[0][position:]


@pytest.mark.parametrize("url", ["pipe:cat {store}/{{path}}", "file:{store}/{{path}}"], ids=["pipe", "file"])
def test_shards_behind_a_url_give_the_same_batches(store, tmp_path, url):
    """data.wds.url: the same batches through webdataset's gopen (pipe:) and a file: URL as from the store
    directory, from the start and resumed inside a later window."""
    from lampretrain.train.data import build_train_data

    def batches(position: int, **wds) -> list:
        data = build_train_data(parse_recipe(recipe(tmp_path, store, wds={"shuffle_buffer": 12, **wds})).data, 0, 2, 0)
        data.sampler.load_state_dict({"epoch": 0, "position": position})
        return [[_key(f) for f in b] for b in data.sampler]

    local = batches(0)
    assert batches(0, url=url.format(store=store)) == local
    assert batches(9, url=url.format(store=store)) == local[9:]


def test_mistakes_are_one_line_naming_the_shard(store, tmp_path):
    from lampretrain.train.data import build_train_data

    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(store), str(broken)], check=True)
    raw = recipe(tmp_path, broken)
    tars = sorted((broken / "wds").glob("train-*.tar"))

    # a truncated shard: found when the stream reaches it, named with the record
    tars[1].write_bytes(tars[1].read_bytes()[:1500])
    data = build_train_data(parse_recipe(raw).data, 0, 1, 0)
    with pytest.raises(ShardError, match=rf"{tars[1]}: (corrupt or truncated WebDataset shard|record \d+ is not in)"):
        for _ in data.sampler:
            pass
    # a corrupt record inside an intact tar
    data_bytes = bytearray(tars[2].read_bytes())
    data_bytes[512 + 40] ^= 0xFF  # inside the first member's msgpack payload
    tars[2].write_bytes(bytes(data_bytes))
    tars[1].write_bytes((store / "wds" / tars[1].name).read_bytes())
    data = build_train_data(parse_recipe(raw).data, 0, 1, 0)
    with pytest.raises(ShardError, match=rf"{tars[2]}#\d{{9}}: .*corrupt record"):
        for _ in data.sampler:
            pass
    # a URL whose command fails
    raw["data"]["wds"] = {"url": f"pipe:cat {broken}/missing/{{path}}"}
    data = build_train_data(parse_recipe(raw).data, 0, 1, 0)
    with pytest.raises(ShardError, match=r"pipe:cat .*/missing/wds/train-\d{5}\.tar: cannot read"):
        next(iter(data.sampler))
    # a missing local shard: refused before training, by name
    raw["data"]["wds"] = {}
    tars[0].unlink()
    with pytest.raises(StoreError, match=rf"{tars[0]}: WebDataset shard missing \(1 of {len(tars)}"):
        parse_recipe(raw).data.check_store()
    # a store prep wrote without tar shards
    lmdb_only = tmp_path / "lmdb_only"
    subprocess.run(["cp", "-r", str(store), str(lmdb_only)], check=True)
    manifest = json.loads((lmdb_only / "manifest.json").read_text())
    del manifest["shards"]["wds"]
    (lmdb_only / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="has no WebDataset shards of split 'train' .*formats: lmdb.*data.format: lmdb"):
        parse_recipe(recipe(tmp_path, lmdb_only)).data.check_store()

    # the command line prints one line, exit 2, no traceback
    (tmp_path / "cli").mkdir()
    path = tmp_path / "cli" / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "cli", broken)))
    proc = subprocess.run([sys.executable, "-m", "lampretrain.cli", "pretrain", str(path)], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {tars[0]}: WebDataset shard missing (1 of {len(tars)} "
                                                "shards of split 'train'); restore it or re-run `lampretrain prep "
                                                "--overwrite`"]


# --- 2 ranks under torchrun ------------------------------------------------------------------------------------------


def compare_worker(out: str, *recipes: str) -> None:
    """One torchrun job: each recipe trained in-process, rank 0 writing every logged loss; every rank's step count
    per epoch gathered for the first recipe's data."""
    import torch
    import torch.distributed as dist

    from lampretrain.recipe import load_recipe
    from lampretrain.train import pretrain
    from lampretrain.train.data import build_train_data
    from lampretrain.train.trainer import TrainHooks

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"steps": {}, "loss": {}}
    for path in recipes:
        r = load_recipe(path)
        data = build_train_data(r.data, rank, world, r.train.seed)
        mine = torch.tensor([data.sampler.plan(e).steps for e in range(3)])
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        result["steps"][r.data.format] = [t.tolist() for t in every]

        class Losses(TrainHooks):
            seen: list = []

            def on_log(self, step, metrics):
                self.seen.append(metrics["loss"])

        hooks = Losses()
        pretrain(r, hooks=hooks)
        result["loss"][r.data.format] = hooks.seen
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_wds_loss_matches_lmdb(store, tmp_path):
    """Same store, seed and model, 2 ranks (gloo): every rank plans the same step count each epoch, and the WDS
    run's loss over 24 steps stays within the stated tolerance of the LMDB run's."""
    paths = []
    for fmt in ("lmdb", "wds"):
        (tmp_path / fmt).mkdir()
        paths.append(write_recipe(tmp_path / fmt, store, data={"format": fmt, "workers": 0},
                                  train={"steps": 24, "log_every": 1, "eval_every": None},
                                  checkpoint={"every": 24}, tracking={"enabled": False}))
    out = tmp_path / "result.json"
    run([*pretrain_cmd(paths[0])[:-4], __file__, "compare", str(out), *map(str, paths)], timeout=300)
    result = json.loads(out.read_text())
    for fmt, per_rank in result["steps"].items():
        assert per_rank[0] == per_rank[1], fmt  # no rank waits at an epoch's end for another
    lmdb, wds = (np.array(result["loss"][f]) for f in ("lmdb", "wds"))
    assert lmdb.size == wds.size == 24 and np.isfinite(wds).all()
    assert lmdb[0] == pytest.approx(wds[0], rel=0.5)  # same initial model, other frames
    late = slice(8, None)
    diff = abs(wds[late].mean() - lmdb[late].mean()) / lmdb[late].mean()
    print(f"loss mean over steps 9-24: lmdb {lmdb[late].mean():.4f}, wds {wds[late].mean():.4f} (rel diff {diff:.3f})")
    assert diff < 0.25


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_is_bitwise(store, tmp_path):
    """2 ranks, one loader worker each, windows of 8 frames: SIGKILL after the step-5 checkpoint (inside a window
    past the first), --resume auto, and the step-10 state equals an uninterrupted run's bitwise."""
    sections = dict(data={"format": "wds", "workers": 1, "wds": {"shuffle_buffer": 8}}, tracking={"enabled": False},
                    train={"eval_every": 5, "steps": 10}, checkpoint={"every": 5, "keep": 3})
    (tmp_path / "ref").mkdir()
    (tmp_path / "kill").mkdir()
    reference = write_recipe(tmp_path / "ref", store, **sections)
    cut = write_recipe(tmp_path / "kill", store, **sections)
    from lampretrain.recipe import load_recipe
    from lampretrain.train.data import build_train_data

    plan = build_train_data(load_recipe(cut).data, 0, 2, 0).sampler.plan(0)
    assert plan.steps > 10 and 5 // plan.window_steps >= 1 and 5 % plan.window_steps  # mid-epoch, mid-window

    proc = subprocess.Popen(pretrain_cmd(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO,
                            start_new_session=True)
    root = tmp_path / "kill" / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (root / "step-000000005").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "step-000000010").exists()
    resumed = run(pretrain_cmd(cut, "--resume", "auto"))
    assert "resumed from" in resumed.stdout
    run(pretrain_cmd(reference))
    a = saved_tensors(tmp_path / "ref" / "run" / "checkpoints" / "step-000000010", tmp_path)
    b = saved_tensors(root / "step-000000010", tmp_path)
    compared = [k for k in a if k.startswith(("/model", "/optim", "/ema"))]
    assert a.keys() == b.keys() and len(compared) > 50
    import torch

    for k in compared:
        assert torch.equal(a[k], b[k]), k


if __name__ == "__main__" and sys.argv[1] == "compare":
    compare_worker(*sys.argv[2:])
