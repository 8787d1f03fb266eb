"""Engines under real torchrun (gloo, 2 ranks on CPU): each trains MatRIS and DPA4 with conservative forces.

One torchrun job per backbone runs this file as its worker (``__main__``):
rank r takes micro-batch r of two fixed micro-batches of real DFT frames
(Al r2SCAN from VASP with stress, SPICE molecules), and every engine (DDP,
FSDP2, DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3) trains the same initial weights
for a few steps. The ``+accum`` runs accumulate gradients over both
micro-batches on every rank (rank r starting with micro-batch r, reducing
only on the last): the same mean gradient. Rank 0 also trains a plain module
on both micro-batches with gradient accumulation (the 1-rank run with the
same global batch). The test
compares final parameters and loss curves.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_support import free_port

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "tests" / "data" / "real"
ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3", "ddp+accum", "fsdp+accum", "zero3+accum"]
STEPS = 4
TINY = {
    "matris-4m": dict(num_layers=1, atom_dim=16, bond_dim=16, angle_dim=16, readout_hidden=[16], magmom_hidden=16,
                      cutoff=5.0, three_body_cutoff=3.0),
    # random_roll off: the 1-rank reference draws the rolls of both micro-batches from one RNG stream
    "dpa4-neo": dict(channels=8, lmax=2, n_blocks=1, so2_layers=1, n_radial=6, cutoff=5.0, random_roll=False),
}


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def micro_batches(model_name: str):
    from lampretrain.graph.batch import collate
    from lampretrain.io import read_frames

    al = list(itertools.islice(read_frames(REAL / "custodian_vasp_mp" / "Al_r2SCAN_relax" / "vasprun.xml"), 2))
    spice = list(itertools.islice(read_frames(REAL / "spice_hdf5" / "SPICE-1.1.4_n2.hdf5"), 2))
    for f in al:
        f.dataset = "al_r2scan"
    for f in spice:
        f.dataset = "spice"
    ids = {"al_r2scan": 0, "spice": 1}
    opts = TINY[model_name]
    return [collate([al[k], spice[k]], dataset_ids=ids, cutoff=opts["cutoff"], three_body_cutoff=opts.get("three_body_cutoff", 3.0))
            for k in range(2)]


def build(model_name: str):
    from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
    from lampretrain.objectives import MultiTaskObjective, ObjectiveConfig

    torch.manual_seed(0)
    datasets = [DatasetSpec("al_r2scan", {13: -4.0}), DatasetSpec("spice", {1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0})]
    model = MultiTaskModel(MultiTaskConfig(model_name, datasets, HeadsConfig(hidden=(16,)), dict(TINY[model_name])))
    objective = MultiTaskObjective(ObjectiveConfig(stress_weight=1.0, magmom_weight=0.0, balancing="none"), datasets)
    return model, objective


def full_params(engine) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if engine.name == "fsdp":
        state = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif engine.name == "deepspeed":  # ZeRO-3: gathered from the partitions
        state = engine.state_tensors()[0]["model"]
    else:
        state = engine.module.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def optimizer(params):
    # no weight decay: parameters that get no gradient (MatRIS's last bond update) are skipped by torch's AdamW
    # under DDP (grad None) but decayed by ZeRO (grad zero-filled); with decay 0 both leave them unchanged
    return torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)


def worker(model_name: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lampretrain.train.distributed import setup
    from lampretrain.train.engines import make_engine

    ctx = setup("cpu", "gloo")
    batches = micro_batches(model_name)
    results: dict[str, dict] = {}
    import time

    for name in ENGINES:
        t0 = time.time()
        model, objective = build(model_name)
        base, accum = name.split("+")[0], 2 if name.endswith("+accum") else 1
        kind, stage = ("deepspeed", int(base[-1])) if base.startswith("zero") else (base, 2)
        engine = make_engine(kind, model, optimizer, ctx.device, None, grad_accum=accum, zero_stage=stage,
                             find_unused_parameters=model_name.startswith("matris"))
        model.train()
        losses = []
        for _ in range(STEPS):
            total = torch.zeros(())
            for k in range(accum):
                batch = batches[(ctx.rank + k) % 2]
                with engine.gradient_sync(k == accum - 1):
                    loss, _ = objective(engine.forward(batch), batch)
                    engine.backward(loss / accum)
                total += loss.detach() / accum
            engine.step(None)
            mean = total
            dist.all_reduce(mean)
            losses.append(mean.item() / ctx.world_size)
        params = full_params(engine)
        engine.close()
        print(f"rank {ctx.rank} {name} {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
        if ctx.rank == 0:
            torch.save(params, Path(out_dir) / f"{name}.pt")
            results[name] = {"losses": losses}
        dist.barrier()
    if ctx.rank == 0:  # one rank, both micro-batches accumulated: the same global batch
        model, objective = build(model_name)
        model.train()
        opt = optimizer([p for p in model.parameters() if p.requires_grad])
        losses = []
        for _ in range(STEPS):
            total = 0.0
            for b in batches:
                loss, _ = objective(model(b), b)
                (loss / 2).backward()
                total += loss.item() / 2
            opt.step()
            opt.zero_grad()
            losses.append(total)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out_dir) / "single.pt")
        results["single"] = {"losses": losses}
        (Path(out_dir) / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = b[k].abs().max().item() + 1e-6
        worst = max(worst, (a[k].float() - b[k].float()).abs().max().item() / scale)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["dpa4-neo", "matris-4m"])
def test_engines_train_with_forces_and_agree(model_name, tmp_path):
    pytest.importorskip("deepspeed")
    proc = torchrun([__file__, model_name, str(tmp_path)], env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in [*ENGINES, "single"]:
        losses = results[name]["losses"]
        assert losses[-1] < 0.95 * losses[0], f"{name}: loss did not go down: {losses}"
    load = lambda n: torch.load(tmp_path / f"{n}.pt", weights_only=True)  # noqa: E731
    ddp = load("ddp")
    # 2-rank DDP (rank r: micro-batch r) == 1 rank accumulating both micro-batches
    assert max_rel_diff(ddp, load("single")) < 1e-4
    for name in ENGINES[1:]:
        assert max_rel_diff(load(name), ddp) < 1e-4, name
        if not name.endswith("+accum"):  # the accumulating runs log the mean over both micro-batches
            assert results[name]["losses"] == pytest.approx(results["ddp"]["losses"], rel=1e-4)


def test_zero2_refuses_gradient_accumulation_with_the_reason():
    """deepspeed 0.17.6's stage-2 epilogue keeps only the last micro-batch's reduced gradient (measured: with the
    loss on the first of two micro-batches only, the gradient norm is 0); ZeRO-1/3, FSDP and DDP accumulate."""
    pytest.importorskip("deepspeed")
    from lampretrain.train.engines import make_engine

    with pytest.raises(ValueError, match=r"ZeRO-2.*grad_accum 2.*last micro-batch.*zero_stage 1 or 3"):
        make_engine("deepspeed", torch.nn.Linear(2, 1), optimizer, torch.device("cpu"), None, grad_accum=2, zero_stage=2)


def test_zero3_partitions_every_parameter():
    """The adapter gathers all parameters together, so ZeRO-3's persistence of small ones is refused, not ignored."""
    pytest.importorskip("deepspeed")
    from lampretrain.train.engines.deepspeed_zero3 import DeepSpeedZero3Adapter

    adapter = DeepSpeedZero3Adapter.__new__(DeepSpeedZero3Adapter)
    assert adapter.zero_config(3, {"overlap_comm": False}) == {
        "overlap_comm": False, "stage": 3, "stage3_param_persistence_threshold": 0}
    with pytest.raises(ValueError, match="stage3_param_persistence_threshold must be 0"):
        adapter.zero_config(3, {"stage3_param_persistence_threshold": 100000})


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
