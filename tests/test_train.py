"""The trainer end to end: recipes, schedules, checkpoints, resume after SIGKILL, SIGTERM, MLflow, two nodes.

Multi-process tests launch the real command line under torchrun (gloo on
CPU) on a small store prepared from the bundled real DFT fixtures (FeO PBE+U
and Al r2SCAN from VASP with stress, SPICE and ANI-1x molecules).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lampretrain.config import ConfigError
from lampretrain.recipe import ScheduleSection, load_recipe, parse_recipe
from lampretrain.train import checkpoint as ckpt
from lampretrain.train.schedules import lr_factor

from finetune_support import free_port

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "tests" / "data" / "real"


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from finetune_support import training_store

    return training_store(tmp_path_factory.mktemp("store"))


def write_recipe(tmp_path: Path, store: Path, **sections) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "demo-dpa4.yaml").read_text())
    recipe["data"].update(store=str(store), budget=60, max_natoms=30, datasets=None,  # all of the test store's
                          sampling={"strategy": "temperature", "temperature": 2.0})
    recipe["model"]["options"] = {"channels": 8, "lmax": 1, "n_blocks": 1, "so2_layers": 1, "n_radial": 4, "cutoff": 5.0}
    recipe["model"]["heads"] = {"hidden": [8]}
    recipe["output"] = str(tmp_path / "run")
    recipe["train"].update(progress=False, log_every=2, steps=8, ema_decay=0.9, refit_references=None)
    recipe["checkpoint"].update(every=2, keep=3)
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def pretrain_cmd(recipe: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "lampretrain.cli", "pretrain", str(recipe), *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def saved_tensors(path: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = node

    walk("", torch.load(out, weights_only=True))
    return flat


# --- recipes and schedules -------------------------------------------------------------------------------------------


def test_recipe_rejects_unknown_keys_and_applies_overrides():
    base = yaml.safe_load((REPO / "recipes" / "demo-matris.yaml").read_text())
    with pytest.raises(ConfigError, match=r"unknown key 'lrate'.*allowed keys: name, lr, weight_decay"):
        parse_recipe({**base, "optim": {"lrate": 1e-3}})
    with pytest.raises(ConfigError, match=r"engine.name: 'horovod' is not allowed; choose one of 'ddp', 'fsdp', 'deepspeed'"):
        parse_recipe(dict(base), ["engine.name=horovod"])
    with pytest.raises(ConfigError, match=r"unknown model 'matris-99m'"):
        parse_recipe(dict(base), ["model.name=matris-99m"])
    with pytest.raises(ConfigError, match=r"objective.*balancing"):
        parse_recipe(dict(base), ["objective.options.balancing=magic"])
    with pytest.raises(ConfigError, match=r"engine.zero_stage: deepspeed ZeRO-2 with train.grad_accum 2.*zero_stage 1 or 3"):
        parse_recipe(dict(base), ["engine.name=deepspeed", "engine.zero_stage=2", "train.grad_accum=2"])
    recipe = parse_recipe(dict(base), ["optim.lr=3e-4", "train.steps=7"])
    assert recipe.optim.lr == 3e-4 and recipe.train.steps == 7


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith(("finetune-", "sweep-"))), ids=lambda p: p.name
)
def test_shipped_recipes_validate(path):
    """Pretraining recipes (fine-tuning and sweep recipes need a checkpoint: their own tests validate them)."""
    recipe = load_recipe(path)
    assert recipe.model.name and recipe.train.steps > 0


def test_schedules():
    cos = ScheduleSection(kind="cosine", warmup_steps=10, warmup_start_factor=0.0, min_lr=0.0)
    assert lr_factor(0, 110, cos, 1.0) == 0.0
    assert lr_factor(5, 110, cos, 1.0) == pytest.approx(0.5)
    assert lr_factor(10, 110, cos, 1.0) == pytest.approx(1.0)
    assert lr_factor(60, 110, cos, 1.0) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(110, 110, cos, 1.0) == pytest.approx(0.0)
    wsd = ScheduleSection(kind="wsd", warmup_steps=10, warmup_start_factor=0.2, decay_fraction=0.5, min_lr=0.1)
    assert lr_factor(0, 100, wsd, 1.0) == pytest.approx(0.2)
    assert lr_factor(30, 100, wsd, 1.0) == 1.0 and lr_factor(49, 100, wsd, 1.0) == 1.0  # stable phase
    assert lr_factor(75, 100, wsd, 1.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, wsd, 1.0) == pytest.approx(0.1)


def test_metric_window_weights_counts_and_means():
    """Error metrics weighted by their label's count over micro-batches, counts summed, other metrics averaged."""
    import torch.distributed as dist

    from lampretrain.train.trainer import MetricWindow

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        window = MetricWindow()
        t = torch.tensor
        window.add({"loss": t(1.0), "a/force_norm_mae": t(0.5), "a/force_component_mae": t(0.2),
                    "a/forces_count": t(3.0), "a/n_graphs": t(2)})
        window.add({"loss": t(3.0), "a/force_norm_mae": t(0.9), "a/force_component_mae": t(0.6),
                    "a/forces_count": t(1.0), "a/n_graphs": t(1)})
        window.add({"loss": t(2.0), "a/force_norm_mae": t(7.0), "a/force_component_mae": t(7.0),
                    "a/forces_count": t(0.0), "a/n_graphs": t(0)})
        window.add({"grad_norm": t(4.0)})
        window.add({"grad_norm": t(6.0)})
        out = window.reduce(1)
        assert out == pytest.approx({"loss": 2.0, "a/force_norm_mae": (0.5 * 3 + 0.9) / 4,
                                     "a/force_component_mae": (0.2 * 3 + 0.6) / 4, "a/forces_count": 4.0,
                                     "a/n_graphs": 3.0, "grad_norm": 5.0})
        window.add({"b/energy_per_atom_mae": t(1.0), "b/energy_count": t(0.0)})
        assert window.reduce(1) == {"b/energy_count": 0.0}  # no labelled value: no MAE, not 0 and not NaN
    finally:
        dist.destroy_process_group()


# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_metadata_unpickler_refuses_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        ckpt._MetadataUnpickler(open(tmp_path / ".metadata", "rb")).load()


# --- real runs -------------------------------------------------------------------------------------------------------


def _edge_lengths(batch) -> torch.Tensor:
    from lampretrain.graph.batch import edge_vectors

    return edge_vectors(batch.positions, batch.cell, batch).norm(dim=-1)


def test_graphs_follow_the_model_cutoffs_not_the_store_ones(tmp_path):
    """A store prepared at 5 / 3.5 Å feeds a model built at 4 / 3 Å: the trainer's train and val graphs have the
    model's edges (the same as a neighbour search at 4 Å); the store's cutoffs only serve its cost statistics."""
    from lampretrain.graph.batch import build_graph
    from lampretrain.store.index import StoreIndex
    from lampretrain.train import pretrain
    from lampretrain.train.data import build_train_data
    from lampretrain.train.trainer import TrainHooks, build_model

    from finetune_support import FEO, make_store, tiny_recipe

    class KeepData(TrainHooks):  # the trainer's own data object, after it has run
        def build_data(self, recipe, rank, world_size):
            self.data = super().build_data(recipe, rank, world_size)
            return self.data

    store = make_store(tmp_path / "store", [{"path": str(FEO), "dataset": "mp_pbeu"}], val=0.2,
                       graphs={"cutoff": 5.0, "three_body_cutoff": 3.5})
    assert (StoreIndex.open(store).cutoff, StoreIndex.open(store).three_body_cutoff) == (5.0, 3.5)
    recipe = parse_recipe(tiny_recipe(store, tmp_path / "run", steps=1))
    data = build_train_data(recipe.data, 0, 1, seed=0)
    _, _, at_store = next(data.stream(0, 0))
    assert _edge_lengths(at_store).max() > 4.2  # the store's graphs do hold 4-5 Å edges

    model = build_model(recipe, data.datasets, data.index.stats())
    assert (model.backbone.config.cutoff, model.backbone.config.three_body_cutoff) == (4.0, 3.0)
    hooks = KeepData()
    pretrain(recipe, hooks=hooks)
    data = hooks.data
    _, _, batch = next(data.stream(0, 0))  # the same frames (position 0 of epoch 0), rebuilt at 4 / 3 Å
    assert torch.equal(batch.positions, at_store.positions)
    lengths = _edge_lengths(batch)
    assert lengths.max() < 4.0 and batch.num_edges < at_store.num_edges
    assert (lengths[batch.angle_index] < 3.0).all() and batch.num_angles < at_store.num_angles
    assert batch.num_edges == sum(build_graph(f, 4.0, 3.0).edge_index.shape[1] for f in _frames_of(batch, data))

    val = TrainHooks().build_val_loader(recipe, model, 0, 1)
    val_lengths = torch.cat([_edge_lengths(b) for b in val])
    assert 3.5 < val_lengths.max() < 4.0


def test_trainer_anneals_loss_weights_with_the_lr(tmp_path):
    """objective.final_weights through the real trainer: every step's logged weight is the static one times
    c(s)/c at that step's lr/lr_peak (1 during warmup)."""
    from lampretrain.train import pretrain
    from lampretrain.train.schedules import annealing_fraction
    from lampretrain.train.trainer import TrainHooks

    from finetune_support import FEO, make_store, tiny_recipe

    class Record(TrainHooks):
        def __init__(self):
            self.logged: dict[int, dict[str, float]] = {}

        def on_log(self, step, metrics):
            self.logged[step] = metrics

    store = make_store(tmp_path / "store", [{"path": str(FEO), "dataset": "mp_pbeu"}], val=0.0, graphs={})
    raw = tiny_recipe(store, tmp_path / "run", steps=6)
    raw["objective"]["options"]["final_weights"] = {"energy": 20.0, "forces": 1.0}
    raw["schedule"] = {"kind": "cosine", "warmup_steps": 2, "min_lr": 0.0}
    raw["train"]["log_every"] = 1
    recipe = parse_recipe(raw)
    hooks = Record()
    pretrain(recipe, hooks=hooks)
    config = recipe.objective.config()
    assert sorted(hooks.logged) == [1, 2, 3, 4, 5, 6]
    start = hooks.logged[1]
    for step, metrics in hooks.logged.items():
        fraction = annealing_fraction(step - 1, 6, recipe.schedule, recipe.optim.lr)
        energy, forces = config.task_factors(fraction)[:2]
        assert metrics["mp_pbeu/energy_weight"] == pytest.approx(start["mp_pbeu/energy_weight"] * energy, rel=1e-6)
        assert metrics["mp_pbeu/forces_weight"] == pytest.approx(start["mp_pbeu/forces_weight"] * forces, rel=1e-6)
    assert annealing_fraction(1, 6, recipe.schedule, recipe.optim.lr) == 1.0  # warmup leaves the weights alone
    assert hooks.logged[6]["mp_pbeu/energy_weight"] > 5 * start["mp_pbeu/energy_weight"]


def test_trainer_refits_references_after_the_last_step(tmp_path):
    """train.refit_references: the final checkpoint carries the refit references (model config and table agree),
    its energy MAE on the refit frames is the logged 'after' and no more than 'before'; a --max-steps stop does not
    refit."""
    import mlflow

    from lampretrain.inference.loading import load_model
    from lampretrain.models import graph_cutoffs
    from lampretrain.train import pretrain
    from lampretrain.train.references import energy_errors, store_batches

    from finetune_support import FEO, make_store, tiny_recipe

    store = make_store(tmp_path / "store", [{"path": str(FEO), "dataset": "mp_pbeu"}], val=0.0, graphs={})
    raw = tiny_recipe(store, tmp_path / "run", steps=4)
    raw["train"]["refit_references"] = 6
    partial = pretrain(parse_recipe(raw), max_steps=2)
    client = mlflow.MlflowClient(tracking_uri=partial.mlflow_uri)
    assert not any(k.startswith("refit/") for k in client.get_run(partial.mlflow_run_id).data.metrics)
    result = pretrain(parse_recipe(raw), resume="auto")
    logged = client.get_run(result.mlflow_run_id).data.metrics
    model = load_model(result.checkpoint)
    k = model.dataset_index("mp_pbeu")
    refs = model.config.datasets[k].element_references
    assert {z: model.references.table[k, z].item() for z in refs} == pytest.approx(refs, rel=0, abs=1e-12)
    frames = store_batches(str(store), {"mp_pbeu": k}, cutoffs=graph_cutoffs(model), max_frames=6)
    errors = energy_errors(model, frames)
    assert errors.label.size == 6
    assert errors.energy_per_atom_mae == pytest.approx(logged["refit/mp_pbeu/energy_per_atom_mae_after"], rel=1e-5)
    assert logged["refit/mp_pbeu/energy_per_atom_mae_after"] <= logged["refit/mp_pbeu/energy_per_atom_mae_before"]


def test_matris_resume_equals_uninterrupted(tmp_path):
    """MatRIS has a parameter that never reaches the loss (its last bond update), so AdamW holds no state for it
    and its checkpoints lack that entry: resume must leave it stateless (not fail on the fresh template's state)
    and reach the uninterrupted run's step 4 bitwise."""
    from lampretrain.train import pretrain

    from finetune_support import FEO, make_store, tiny_recipe

    store = make_store(tmp_path / "store", [{"path": str(FEO), "dataset": "mp_pbeu"}], val=0.0, graphs={})
    runs = {}
    for kind in ("ref", "split"):
        raw = tiny_recipe(store, tmp_path / kind, steps=4)
        raw["tracking"] = {"enabled": False}
        if kind == "split":
            assert pretrain(parse_recipe(raw), max_steps=2).step == 2
            runs[kind] = pretrain(parse_recipe(raw), resume="auto").checkpoint
        else:
            runs[kind] = pretrain(parse_recipe(raw)).checkpoint
    a, b = (saved_tensors(runs[k], tmp_path) for k in ("ref", "split"))
    block = [k for k in a if k.startswith("/optim/backbone.blocks.1.")]
    assert block and not any("line_refinement.edge_scale" in k for k in block)
    assert a.keys() == b.keys() and any(k.startswith("/optim") for k in a)
    for k in a:
        if k.startswith(("/model", "/optim")):
            assert torch.equal(a[k], b[k]), k


def _frames_of(batch, data) -> list:
    """The store frames of a train batch, found by their positions (FeO relaxation steps all differ)."""
    frames = [data.loader.dataset[i] for i in range(len(data.loader.dataset))]
    starts = torch.cumsum(batch.n_atoms, 0) - batch.n_atoms
    out = []
    for g, start in enumerate(starts.tolist()):
        pos = batch.positions[start : start + int(batch.n_atoms[g])].double().numpy()
        out.append(next(f for f in frames if f.positions.shape == pos.shape and abs(f.positions - pos).max() < 1e-5))
    return out


@pytest.mark.slow
def test_single_process_run_logs_to_mlflow_and_sigterm_checkpoints(store, tmp_path):
    """A plain process: loss goes down, MLflow has params and per-dataset metrics; SIGTERM → checkpoint, exit 0;
    a corrupted newest checkpoint is skipped by --resume auto."""
    recipe = write_recipe(tmp_path, store, train={"steps": 400, "log_every": 2}, checkpoint={"every": 4, "keep": 3})
    cmd = [sys.executable, "-m", "lampretrain.cli", "pretrain", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
    root = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (root / "step-000000012").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:] if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "preempted" in out
    steps = [s for s, _ in ckpt.checkpoint_dirs(root)]
    assert len(steps) == 3 and steps[-1] >= 12  # keep-last-3, the SIGTERM one last
    last = ckpt.checkpoint_dirs(root)[-1][1]
    ckpt.verify(last)
    meta = ckpt.read_meta(last)
    assert meta["step"] == steps[-1] and meta["recipe"]["train"]["steps"] == 400

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run_info = client.get_run(meta["mlflow_run_id"])
    assert run_info.data.params["optim.lr"] == "0.002"
    assert run_info.data.params["model.name"] == "dpa4-neo"
    for key in ("loss", "atoms_per_s", "graphs_per_s", "imbalance_atoms", "spice/force_norm_mae",
                "spice/force_component_mae", "mp_pbeu/stress_component_mae"):
        assert key in run_info.data.metrics, key
    loss = [m.value for m in client.get_metric_history(run_info.info.run_id, "loss")]
    assert len(loss) >= 6 and all(map(math.isfinite, loss))  # learning itself: tests/test_engines.py (fixed batches)

    # corrupt the newest checkpoint's tensor file: resume must fall back to the previous one
    shard = sorted(last.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="does not match its SHA-256"):
        assert ckpt.latest(root) == ckpt.checkpoint_dirs(root)[-2][1]
    previous = ckpt.checkpoint_dirs(root)[-2][0]
    res = run(cmd + ["--resume", "auto", "--max-steps", str(previous + 1)])
    assert f"resumed from {root / f'step-{previous:09d}'} at step {previous}" in res.stdout
    assert meta["mlflow_run_id"] in res.stdout  # the same MLflow run continues


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bitwise(store, tmp_path):
    """2 ranks, DDP: killed with SIGKILL after the step-4 checkpoint, resumed → step-8 state bitwise equal."""
    (tmp_path / "ref").mkdir()
    run(pretrain_cmd(write_recipe(tmp_path / "ref", store)))
    (tmp_path / "kill").mkdir()
    recipe = write_recipe(tmp_path / "kill", store)
    proc = subprocess.Popen(pretrain_cmd(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO,
                            start_new_session=True)
    root = tmp_path / "kill" / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (root / "step-000000004").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "step-000000008").exists()
    res = run(pretrain_cmd(recipe, "--resume", "auto"))
    assert "resumed from" in res.stdout
    a = saved_tensors(tmp_path / "ref" / "run" / "checkpoints" / "step-000000008", tmp_path)
    b = saved_tensors(root / "step-000000008", tmp_path)
    assert a.keys() == b.keys()
    compared = [k for k in a if k.startswith(("/model", "/optim", "/ema"))]
    assert len(compared) > 50
    for k in compared:
        assert torch.equal(a[k], b[k]), k


def resume_worker(*recipes: str) -> None:
    """One torchrun job, several runs in one process group: for every pair (reference, split) of recipes,
    the reference trains straight through; the split one stops at step 2 (``--max-steps``) and a second
    call resumes it with ``--resume auto``."""
    import torch.distributed as dist

    from lampretrain.recipe import load_recipe
    from lampretrain.train import pretrain

    dist.init_process_group("gloo")

    for ref, split in zip(recipes[::2], recipes[1::2]):
        pretrain(load_recipe(ref))
        assert pretrain(load_recipe(split), max_steps=2).step == 2
        assert pretrain(load_recipe(split), resume="auto").step == 4
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_and_deepspeed_resume_equals_uninterrupted(store, tmp_path):
    """2 ranks, FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3: checkpoint at step 2 (sharded model, optimizer and EMA; ZeRO's
    fp32 partitions), resume, and step 4 equals the uninterrupted run's step 4 bitwise, the references refit after
    the last step (train.refit_references, gathered parameters, rank 0's fit on every rank) included."""
    pytest.importorskip("deepspeed")
    engines = {"fsdp": {"name": "fsdp"}, "zero2": {"name": "deepspeed", "zero_stage": 2},
               "zero3": {"name": "deepspeed", "zero_stage": 3}}
    recipes = []
    for name, engine in engines.items():
        for kind in ("ref", "split"):
            (tmp_path / name / kind).mkdir(parents=True)
            recipes.append(str(write_recipe(tmp_path / name / kind, store, engine=engine,
                                            train={"steps": 4, "refit_references": 4}, tracking={"enabled": False})))
    proc = subprocess.run(
        [*pretrain_cmd(Path(recipes[0]))[:-4], __file__, *recipes],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in engines:
        a = saved_tensors(tmp_path / name / "ref" / "run" / "checkpoints" / "step-000000004", tmp_path)
        b = saved_tensors(tmp_path / name / "split" / "run" / "checkpoints" / "step-000000004", tmp_path)
        assert a.keys() == b.keys()
        compared = [k for k in a if k.startswith(("/model", "/optim", "/zero", "/ema"))]
        assert len(compared) > 20 and any(k.startswith(("/optim", "/zero")) for k in compared)
        for k in compared:  # bitwise on CPU: same data order, RNG states and reduction order
            assert torch.equal(a[k], b[k]), f"{name} {k}"
        before = saved_tensors(tmp_path / name / "split" / "run" / "checkpoints" / "step-000000002", tmp_path)
        assert not torch.equal(a["/model/references.table"], before["/model/references.table"])  # refit at step 4


@pytest.mark.slow
def test_two_nodes_on_loopback_train_and_checkpoint(store, tmp_path):
    recipe = write_recipe(tmp_path, store, train={"steps": 4}, checkpoint={"every": 4})
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
             str(r), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lampretrain.cli", "pretrain",
             str(recipe)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 rank(s)" in outs[0]
    last = tmp_path / "run" / "checkpoints" / "step-000000004"
    ckpt.verify(last)
    assert ckpt.read_meta(last)["world_size"] == 2
    assert len(list(last.glob("*.distcp"))) == 2  # each node wrote its shard (its RNG state at least)


if __name__ == "__main__":
    resume_worker(*sys.argv[1:])


def test_weight_decay_spares_biases_and_norm_gains():
    """Matrices decay; vectors (biases, LayerNorm gains) do not, unless optim.decay_vectors (nanoGPT, MACE)."""
    from lampretrain.train.trainer import _param_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    params = list(model.parameters())
    groups = _param_groups(model, params, {"2.weight": 0.5}, 0.1, decay_vectors=False)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay_of[id(p)] == (0.1 if p.ndim == 2 else 0.0), name
        assert scale_of[id(p)] == (0.5 if name == "2.weight" else 1.0), name
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, params))
    groups = _param_groups(model, params, {}, 0.1, decay_vectors=True)
    assert [g["weight_decay"] for g in groups] == [0.1]
    # and AdamW applies it so: a zero-gradient step shrinks only the matrices
    opt = torch.optim.AdamW(_param_groups(model, params, {}, 0.1, False), lr=1.0)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for (name, p), b in zip(model.named_parameters(), before):
        assert torch.equal(p, b) == (p.ndim < 2), name


def test_graphs_built_on_the_device_train_as_graphs_built_in_the_loader(tmp_path):
    """data.graphs_on: device — loader workers collate atoms only and the trainer builds edges and angles where
    the model runs (vesin-torch): the same graphs, so the same losses and weights as the loader-built run."""
    pytest.importorskip("vesin_torch")
    from lampretrain.train import pretrain

    from finetune_support import FEO, make_store, tiny_recipe

    store = make_store(tmp_path / "store", [{"path": str(FEO), "dataset": "mp_pbeu"}])
    results = {}
    for where in ("loader", "device"):
        recipe = tiny_recipe(store, tmp_path / where, steps=3)
        recipe["data"].update(graphs_on=where, workers=1)
        recipe["tracking"] = {"enabled": False}
        recipe["train"]["log_every"] = 1
        result = pretrain(parse_recipe(recipe))
        results[where] = (result.last_metrics, saved_tensors(result.checkpoint, tmp_path))
    from lampretrain.train.data import build_train_data

    data = build_train_data(parse_recipe(recipe).data, 0, 1, seed=0)
    _, _, atoms_only = next(data.stream(0, 0))
    assert atoms_only.num_edges == 0 and data.finish(atoms_only, torch.device("cpu")).num_edges > 0
    (m_loader, t_loader), (m_device, t_device) = results["loader"], results["device"]
    assert m_loader["loss"] == pytest.approx(m_device["loss"], rel=1e-5)
    for name, value in t_loader.items():
        if name.startswith("/model/"):
            torch.testing.assert_close(t_device[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_a_run_of_one_leaves_no_launcher_environment_behind(monkeypatch):
    """A process that trains in-process (tests, notebooks) and then starts children must not hand them the
    RANK/MASTER_PORT of its finished world of one: a child would take them for torchrun's and bind that port."""
    import torch.distributed as dist

    from lampretrain.train.distributed import SOLO_ENV, setup, teardown

    for key in SOLO_ENV:
        monkeypatch.delenv(key, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    ctx = setup("cpu", "gloo")
    assert dist.get_world_size() == 1 and os.environ["RANK"] == "0"
    teardown(ctx)
    assert not [key for key in SOLO_ENV if key in os.environ]
    ctx = setup("cpu", "gloo")  # and a second run of one gets a port of its own
    teardown(ctx)
