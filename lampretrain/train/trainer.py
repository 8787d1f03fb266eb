"""The pretraining loop: data → model → loss → engine step, with checkpoints, resume and tracking.

One optimizer step, as :func:`pretrain` runs it::

    lr = peak · lr_factor(step)                        # schedules.py, a pure function of the step
    objective.follow_lr(lr / peak)                     # loss weights follow the lr decay (final_weights)
    for k in range(grad_accum):                        # micro-batches from the cost-balanced sampler
        with engine.gradient_sync(k == grad_accum - 1):
            out = engine.forward(batch)                # energy, forces = −∂E/∂x, stress (create_graph)
            loss, metrics = objective(out, batch)      # masked per-dataset losses, no host sync
            engine.backward(loss / grad_accum)         # double backward through the force graph
    grad_norm = engine.step(clip)                      # clip, AdamW, zero grads
    ema.update(step)

Everything else (logging, validation, checkpoints, signals) happens between steps. The
only host syncs per step are the preemption flag (a gloo all-reduce of one
int) and, every ``log_every`` steps, one all-reduce of the metric window.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from .. import malloc
from ..config import ConfigError
from ..models import graph_cutoffs
from ..models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
from ..objectives import METRICS, MultiTaskObjective
from ..recipe import Recipe, recipe_dict
from . import checkpoint as ckpt
from .data import TrainData, build_train_data, build_val_loader
from .distributed import Context, setup, teardown
from .ema import EMA
from .engines import Engine, make_engine
from .references import apply_shift, refit_store_references
from .schedules import annealing_fraction, lr_factor
from .tracking import Tracker
from .validation import validate


@dataclass
class RunResult:
    step: int
    checkpoint: Path | None
    run_dir: Path
    mlflow_uri: str
    mlflow_run_id: str | None
    preempted: bool
    last_metrics: dict[str, float]
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation (val/<dataset>/<metric>)


class MetricWindow:
    """Device-side sums of step metrics between two logs; one all-reduce turns them into averages.

    An error metric ``<dataset>/<metric>`` (a name in ``objectives.METRICS``) is
    averaged weighted by ``<dataset>/<label>_count``, the labelled samples it is a
    mean over (a dataset absent from a micro-batch has count 0 and weighs nothing);
    ``*_count``/``*n_graphs`` are summed; everything else is a plain mean over
    micro-batches. The per-key rules are fixed once per set of keys, so adding a
    micro-batch's metrics costs one stack and a few vector ops, not a few per metric.
    """

    def __init__(self):
        self._sums: dict[tuple[str, ...], _KeySums] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        keys = tuple(metrics)
        with torch.no_grad():
            values = torch.stack(list(metrics.values())).float()  # (M,) scalars, dtypes promoted
        if keys not in self._sums:
            self._sums[keys] = _KeySums(keys, values.device)
        self._sums[keys].add(values)

    def reduce(self, world_size: int) -> dict[str, float]:
        """All ranks call this together; returns averages over all ranks and micro-batches."""
        if not self._sums:
            return {}
        parts = list(self._sums.values())
        keys = sorted({k for part in parts for k in part.keys})  # the same order on every rank
        summed = {k for part in parts for k, s in zip(part.keys, part.summed_keys) if s}
        where = {k: i for i, k in enumerate(keys)}
        device = parts[0].num.device
        num = torch.zeros(len(keys), device=device)
        den = torch.zeros(len(keys), device=device)
        for part in parts:  # a key may come in more than one set of keys (micro-batch metrics, grad_norm)
            index = torch.tensor([where[k] for k in part.keys], device=device)
            num.index_add_(0, index, part.num)
            den.index_add_(0, index, part.den)
        flat = torch.cat([num, den])
        dist.all_reduce(flat)
        values = flat.tolist()
        n = len(keys)
        self._sums.clear()
        return {
            k: values[i] if k in summed else values[i] / values[n + i]
            for i, k in enumerate(keys)
            if k in summed or values[n + i] > 0
        }


def _count_key(key: str) -> str:
    """``<dataset>/<label>_count`` for an error metric ``<dataset>/<metric>``; '' (no key) for anything else."""
    prefix, _, name = key.rpartition("/")
    return f"{prefix}/{METRICS[name].label}_count" if prefix and name in METRICS else ""


class _KeySums:
    """Running Σ value·weight and Σ weight for one set of metric keys (see :class:`MetricWindow`)."""

    def __init__(self, keys: tuple[str, ...], device: torch.device):
        self.keys = keys
        index = {k: i for i, k in enumerate(keys)}
        count_of = [index.get(_count_key(k), -1) for k in keys]
        self.summed_keys = [k.endswith("_count") or k.endswith("n_graphs") for k in keys]
        self.weighted = torch.tensor([c >= 0 for c in count_of], device=device)
        self.count_of = torch.tensor([c if c >= 0 else i for i, c in enumerate(count_of)], device=device)
        self.unit = torch.tensor([0.0 if s else 1.0 for s in self.summed_keys], device=device)  # weight of the rest
        self.num = torch.zeros(len(keys), device=device)
        self.den = torch.zeros(len(keys), device=device)

    def add(self, values: torch.Tensor) -> None:
        count = values[self.count_of]  # (M,) the paired count of each error metric
        self.num += values * torch.where(self.weighted, count, 1.0)
        self.den += torch.where(self.weighted, count, self.unit)


class Preemption:
    """SIGTERM/SIGUSR1/SIGINT set a flag; all ranks agree on it after every step (gloo MAX of one int).

    Ctrl-C is a preemption too: the step finishes and a checkpoint is written. A second Ctrl-C stops at once
    (KeyboardInterrupt), for a user who will not wait for the step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, group):
        self.group = group
        self.flag = False
        self.since: float | None = None  # perf_counter() at the first signal: the grace a cluster must give
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if self.since is None:
            self.since = time.perf_counter()

    def agreed(self) -> bool:
        t = torch.tensor([int(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


class TrainHooks:
    """Where a run built on this loop (fine-tuning, property heads) differs from pretraining; the defaults are
    pretraining.

    ``build_data`` gives the stream (batches' dataset ids index the model's heads), ``build_model``
    the model (``model(batch)`` → a dict of tensors), ``build_objective`` what turns its outputs and the
    batch into (loss, metrics), ``build_val_loader`` this rank's validation batches (None: no validation)
    and ``validate`` the metrics over all ranks' batches (every rank calls it), ``lr_scales`` a learning-rate
    multiplier per parameter name (layer-wise decay; absent names get 1) and ``on_log`` sees every logged
    metric window, with the validation of that step, on rank 0 (e.g. to report to Ray Tune).
    ``validate_at_start``: a fresh run also validates before its first step (a starting error to report).
    """

    validate_at_start = False

    def build_data(self, recipe: Recipe, rank: int, world_size: int) -> TrainData:
        return build_train_data(recipe.data, rank, world_size, recipe.train.seed)

    def build_val_loader(self, recipe: Recipe, model: MultiTaskModel, rank: int, world_size: int):
        return build_val_loader(recipe.data, model.dataset_names, rank, world_size, graph_cutoffs(model))

    def build_model(self, recipe: Recipe, data: TrainData) -> MultiTaskModel:
        return build_model(recipe, data.datasets, data.index.stats())

    def build_objective(self, recipe: Recipe, model: MultiTaskModel) -> torch.nn.Module:
        return MultiTaskObjective(recipe.objective.config(), model.config.datasets)

    def validate(self, engine: Engine, batches, model: MultiTaskModel, ema: EMA | None,
                 device: torch.device) -> dict[str, float]:
        return validate(engine, batches, model.dataset_names, ema, device)

    def lr_scales(self, model: MultiTaskModel) -> dict[str, float]:
        return {}

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass


def _param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], scales: dict[str, float],
                  weight_decay: float, decay_vectors: bool) -> list[dict]:
    """The engine's trainable ``params`` grouped by learning-rate multiplier (``lr_scale``, read by set_lr) and by
    weight decay: matrices decay, vectors (biases, norm gains, scalars) do not unless ``decay_vectors``, as in
    nanoGPT and MACE, since shrinking a norm's gain or a bias towards 0 regularises nothing."""
    scale_of = {id(p): scales.get(n, 1.0) for n, p in model.named_parameters()}
    groups: dict[tuple[float, float], list] = {}
    for p in params:
        ndim = len(getattr(p, "ds_shape", p.shape))  # DeepSpeed ZeRO-3 keeps the full shape aside
        decay = weight_decay if ndim >= 2 or decay_vectors else 0.0
        groups.setdefault((scale_of.get(id(p), 1.0), decay), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": d} for (s, d), ps in sorted(groups.items(), reverse=True)]


def build_model(recipe: Recipe, datasets: list[str], stats: dict[str, Any]) -> MultiTaskModel:
    specs = [DatasetSpec.from_stats(n, stats.get(n, {})) for n in datasets]
    config = MultiTaskConfig(
        backbone=recipe.model.name,
        datasets=specs,
        heads=HeadsConfig.from_dict(recipe.model.heads),
        backbone_options=dict(recipe.model.options),
    )
    return MultiTaskModel(config)


def _autocast(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ConfigError("train.precision: bf16 autocast is for GPUs; use fp32 (or auto) on CPU")
        return torch.bfloat16
    return None


def _rng_tensors(ctx: Context) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return {f"rank{ctx.rank}": state}


def _set_rng(ctx: Context, saved: dict[str, torch.Tensor]) -> None:
    mine = saved[f"rank{ctx.rank}"]
    torch.set_rng_state(mine["cpu"])
    if "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], ctx.device)


def _state(engine: Engine, ema: EMA | None, objective: torch.nn.Module, ctx: Context) -> tuple[dict, dict]:
    tensors, extras = engine.state_tensors()
    if ema is not None:
        tensors["ema"] = engine.full_tensors(ema.state_dict())
    if len(objective.state_dict()):
        tensors["objective"] = objective.state_dict()
    tensors["rng"] = _rng_tensors(ctx)
    return tensors, extras


def pretrain(
    recipe: Recipe, resume: str | None = None, max_steps: int | None = None, hooks: TrainHooks | None = None
) -> RunResult:
    """Run (or continue) the recipe; every rank calls this. ``resume``: None, "auto" or a checkpoint path.

    ``max_steps`` stops early at that step (the schedule still follows ``train.steps``).
    """
    recipe.data.check_store()  # a missing store or dataset name is one line, before any process group exists
    ctx = setup(recipe.train.device, recipe.engine.backend)
    # Restored afterwards: a process that trains in-process (tests, notebooks) and forks later must not
    # give its children the flag-setting SIGTERM handler, or they would ignore Pool.terminate().
    handlers = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    try:
        return _run(recipe, ctx, resume, max_steps, hooks or TrainHooks())
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        teardown(ctx)


def _run(recipe: Recipe, ctx: Context, resume: str | None, max_steps: int | None, hooks: TrainHooks) -> RunResult:
    tr = recipe.train
    run_dir = Path(recipe.output)
    ckpt_root = run_dir / "checkpoints"
    resolved = recipe_dict(recipe)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    torch.manual_seed(tr.seed)  # same initial weights on every rank (DDP also broadcasts them)
    data = hooks.build_data(recipe, ctx.rank, ctx.world_size)
    model = hooks.build_model(recipe, data)
    data.use_cutoffs(*graph_cutoffs(model))  # inference builds graphs at the model's cutoffs too, not the store's
    malloc.set_mmap_threshold(malloc.resolve(tr.malloc_mmap_threshold_mb, graph_cutoffs(model)[1]))
    objective = hooks.build_objective(recipe, model).to(ctx.device)
    o = recipe.optim

    def optimizer_factory(params):
        params = _param_groups(model, params, hooks.lr_scales(model), o.weight_decay, o.decay_vectors)
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    engine = make_engine(
        recipe.engine.name, model, optimizer_factory, ctx.device, _autocast(recipe, ctx.device),
        grad_accum=tr.grad_accum, zero_stage=recipe.engine.zero_stage, max_norm=tr.clip_grad_norm,
        deepspeed_config=recipe.engine.deepspeed, find_unused_parameters=recipe.engine.find_unused_parameters,
    )
    aux = [p for p in objective.parameters() if p.requires_grad]  # e.g. uncertainty-weighting log σ
    aux_opt = torch.optim.AdamW(aux, lr=o.lr, weight_decay=0.0) if aux else None
    ema = EMA(engine.named_parameters(), tr.ema_decay) if tr.ema_decay else None

    step, epoch, position, run_id = 0, 0, 0, None
    source = _resume_source(ckpt_root, resume, ctx, recipe.checkpoint.verify)
    if source is not None:
        meta = ckpt.read_meta(source)
        tensors, extras = _state(engine, ema, objective, ctx)
        if meta["world_size"] != ctx.world_size:
            raise ckpt.CheckpointError(f"{source}: saved at world size {meta['world_size']}, resuming at "
                                       f"{ctx.world_size}; resume with {meta['world_size']} ranks")
        saved_format = meta.get("sampler", {}).get("format", "lmdb")
        if saved_format != recipe.data.format:  # the two formats order an epoch differently
            raise ckpt.CheckpointError(f"{source}: saved with data.format {saved_format}, this recipe has "
                                       f"{recipe.data.format}; resume with data.format: {saved_format}")
        ckpt.load(source, tensors, sparse="optim" if "optim" in tensors else None)
        engine.load_state_tensors(tensors, meta["engine"])
        if ema is not None:
            engine.load_local_(ema.state_dict(), tensors["ema"])
        if "objective" in tensors:
            objective.load_state_dict(tensors["objective"])
        _set_rng(ctx, tensors["rng"])
        step, epoch, position, run_id = meta["step"], meta["epoch"], meta["position"], meta["mlflow_run_id"]

    tracker = Tracker(
        run_dir, recipe.tracking.uri, recipe.tracking.experiment, recipe.tracking.run_name or recipe.name,
        active=ctx.is_main and recipe.tracking.enabled, run_id=run_id, parent_run_id=recipe.tracking.parent_run_id,
    )
    tracker.log_recipe(resolved)
    if ctx.is_main:
        where = f"resumed from {source} at step {step}" if source else "fresh start"
        print(f"[lampretrain] {recipe.name}: {ctx.world_size} rank(s) on {ctx.device}, engine {engine.name}, "
              f"{sum(p.numel() for p in model.parameters())} parameters, {where}", flush=True)

    val_loader = hooks.build_val_loader(recipe, model, ctx.rank, ctx.world_size) if tr.eval_every else None
    if tr.eval_every and val_loader is None and ctx.is_main:
        print(f"[lampretrain] train.eval_every is set but {recipe.data.store} has no val frames for these datasets; "
              "no validation", flush=True)
    preempt = Preemption(ctx.control)
    stop_at = min(tr.steps, max_steps or tr.steps)
    window = MetricWindow()
    stream = data.stream(epoch, position)
    bar = _progress(ctx, tr, step, stop_at)
    model.train()
    last_ckpt, last_metrics, val_metrics, preempted = None, {}, {}, False
    if val_loader is not None and step == 0 and hooks.validate_at_start:
        val_metrics = hooks.validate(engine, val_loader, model, ema, ctx.device)
        tracker.log_metrics(val_metrics, 0)
        _report_val(ctx, bar, 0, val_metrics)
        if ctx.is_main:
            hooks.on_log(0, val_metrics)
    t_window, atoms, graphs, win_steps = time.perf_counter(), 0, 0, 0
    while step < stop_at:
        engine.set_lr(o.lr * lr_factor(step, tr.steps, recipe.schedule, o.lr))
        objective.follow_lr(annealing_fraction(step, tr.steps, recipe.schedule, o.lr))
        for k in range(tr.grad_accum):
            epoch, position, batch = next(stream)
            batch = data.finish(batch, ctx.device)
            with engine.gradient_sync(k == tr.grad_accum - 1):
                out = engine.forward(batch)
                loss, metrics = objective(out, batch)
                engine.backward(loss / tr.grad_accum)
            window.add(metrics)
            atoms += int(batch.positions.shape[0])
            graphs += int(batch.n_atoms.shape[0])
        if aux_opt is not None:
            _average_grads(aux, ctx.world_size)
            aux_opt.step()
            aux_opt.zero_grad(set_to_none=True)
        grad_norm = engine.step(tr.clip_grad_norm)
        if ema is not None:
            ema.update(step)
        step += 1
        win_steps += 1
        window.add({"grad_norm": grad_norm.detach().to(ctx.device)})
        if bar is not None:
            bar.update(1)
        seconds = time.perf_counter() - t_window  # the window's training time: the refit and validation below are not
        preempted = preempt.agreed()
        if step == tr.steps and tr.refit_references and not preempted:
            _refit_references(engine, ema, recipe, ctx, tracker, step, bar)
        validated = {}
        if val_loader is not None and not preempted and (step % tr.eval_every == 0 or step == stop_at):
            t_val = time.perf_counter()
            val_metrics = validated = hooks.validate(engine, val_loader, model, ema, ctx.device)
            tracker.log_metrics(val_metrics, step)
            _report_val(ctx, bar, step, val_metrics)
            t_window += time.perf_counter() - t_val  # throughput counts training only
        if step % tr.log_every == 0 or step == stop_at:  # after validation: on_log sees this step's (Ray Tune ranks it)
            last_metrics = _log(window, ctx, tracker, step, seconds, atoms, graphs, win_steps, engine, bar)
            if ctx.is_main:
                hooks.on_log(step, {**last_metrics, **validated})
            t_window, atoms, graphs, win_steps = time.perf_counter(), 0, 0, 0
        if preempted or step % recipe.checkpoint.every == 0 or step == stop_at:
            tensors, extras = _state(engine, ema, objective, ctx)
            meta = {
                "step": step, "epoch": epoch, "position": position, "world_size": ctx.world_size,
                "sampler": data.sampler.state_dict(position=position) | {"epoch": epoch},
                "mlflow_run_id": tracker.run_id if ctx.is_main else None, "engine": extras,
                "recipe": resolved, "model": model.config.to_dict(), "torch": torch.__version__, "time": time.time(),
            }
            meta["mlflow_run_id"] = _broadcast(meta["mlflow_run_id"])
            t_save = time.perf_counter()
            last_ckpt = ckpt.save(ckpt_root, step, tensors, meta, recipe.checkpoint.keep)
            save_s = time.perf_counter() - t_save
            tracker.log_metrics({"checkpoint_write_s": save_s}, step)  # sizes the preemption grace (docs/clusters)
        if preempted:
            if ctx.is_main:
                after = f", {time.perf_counter() - preempt.since:.1f} s after the signal" if preempt.since else ""
                print(f"[lampretrain] preempted: checkpoint {last_ckpt} at step {step} (written in {save_s:.1f} s"
                      f"{after})", flush=True)
            break
    if bar is not None:
        bar.close()
    engine.close()
    tracker.finish("KILLED" if preempted else "FINISHED")
    return RunResult(step, last_ckpt, run_dir, tracker.uri, tracker.run_id, preempted, last_metrics, val_metrics)


RESUME_CHOICES = ("auto", "fresh")


def _resume_source(root: Path, resume: str | None, ctx: Context, verify_hashes: bool) -> Path | None:
    """Rank 0 picks the checkpoint and tells the others; every refusal is a one-line CheckpointError.

    ``None``: start at step 0 (a step directory already there is set aside when reached, never replaced).
    ``"auto"``: the newest checkpoint that verifies, a fresh start when the run has none; when it has
    some and none verifies, refuse, since starting over would bury a long run's history.
    ``"fresh"``: start at step 0 after moving the run's checkpoints to ``checkpoints/previous-<time>/``.
    A path: that checkpoint, or the newest of that run directory.
    """
    if resume is None:
        return None
    choice, error = None, None
    if ctx.is_main:
        try:
            choice = _pick_checkpoint(root, resume, verify_hashes)
        except ckpt.CheckpointError as err:
            error = str(err)
    choice, error = _broadcast((choice, error))
    if error is not None:
        raise ckpt.CheckpointError(error)
    return Path(choice) if choice else None


def _pick_checkpoint(root: Path, resume: str, verify_hashes: bool) -> str | None:
    if resume not in RESUME_CHOICES:
        found = ckpt.resolve(resume, verify_hashes)
        ckpt.verify(found, verify_hashes)
        return str(found)
    existing = [path for _, path in ckpt.checkpoint_dirs(root)]
    if resume == "fresh":
        if existing:
            moved = ckpt.set_aside(root, existing)
            print(f"[lampretrain] --resume fresh: moved {len(existing)} earlier checkpoint(s) to {moved}", flush=True)
        return None
    if not existing:
        return None
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", RuntimeWarning)
        found = ckpt.latest(root, hashes=verify_hashes)
    if found is not None:  # newer broken ones were skipped: say so; when all are broken, the error says it
        for w in skipped:
            warnings.warn(w.message, RuntimeWarning, stacklevel=2)
    if found is None:
        raise ckpt.CheckpointError(
            f"{root}: --resume auto found {len(existing)} checkpoint(s) and none is usable "
            f"({ckpt.unusable(root, verify_hashes)}); nothing was changed. Resume one by path, or pass "
            "--resume fresh to start over (they are kept under checkpoints/previous-<time>/)")
    return str(found)


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _average_grads(params: list[torch.Tensor], world_size: int) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def _progress(ctx: Context, tr, start: int, total: int):
    if not (ctx.is_main and tr.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)


def _log(window: MetricWindow, ctx: Context, tracker: Tracker, step: int, seconds: float, atoms: int, graphs: int,
         steps: int, engine: Engine, bar) -> dict[str, float]:
    local = torch.tensor([atoms, seconds, graphs], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local, group=ctx.control)
    per_rank = torch.stack(gathered)
    metrics = window.reduce(ctx.world_size)
    wall = float(per_rank[:, 1].max())
    total_atoms = float(per_rank[:, 0].sum())
    metrics.update({
        "lr": engine.optimizer.param_groups[0]["lr"],
        "step_time_s": wall / max(steps, 1),
        "atoms_per_s": total_atoms / max(wall, 1e-9),
        "graphs_per_s": float(per_rank[:, 2].sum()) / max(wall, 1e-9),
        "imbalance_atoms": float(per_rank[:, 0].max() / per_rank[:, 0].mean().clamp(min=1.0)),
    })
    if ctx.is_main:
        tracker.log_metrics(metrics, step)
        if bar is not None and math.isfinite(metrics.get("loss", float("nan"))):
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", atoms_s=f"{metrics['atoms_per_s']:.0f}")
    return metrics


def _refit_references(engine: Engine, ema: EMA | None, recipe: Recipe, ctx: Context, tracker: Tracker, step: int,
                      bar) -> None:
    """``train.refit_references``: change-bias of every head with the weights the checkpoint serves (EMA), before
    the final validation and checkpoint. The energies drift by meV/atom per step to the end of a short run, and a
    dataset of one composition (water) then scores on its offset; the fit runs on rank 0 and every rank applies it."""
    with ema.applied() if ema is not None else contextlib.nullcontext(), engine.evaluation() as model:
        refits = None
        if ctx.is_main:
            refits = refit_store_references(model, recipe.data.store, recipe.data.datasets,
                                            max_frames=recipe.train.refit_references, device=ctx.device)
        refits = _broadcast(refits)
        if not ctx.is_main:
            for refit in refits:
                apply_shift(model, refit.dataset, refit.delta)
    if ctx.is_main:
        tracker.log_metrics({f"refit/{r.dataset}/energy_per_atom_mae_{when}": mae for r in refits if r.frames
                             for when, mae in (("before", r.mae_before), ("after", r.mae_after))}, step)
        lines = [f"  {r.dataset}: {r.frames} frames, energy MAE {1e3 * r.mae_before:.2f} -> {1e3 * r.mae_after:.2f} "
                 "meV/atom" if r.frames else f"  {r.dataset}: no energy-labelled train frames, references kept"
                 for r in refits]
        (bar.write if bar is not None else print)("[lampretrain] references refit on train frames:\n" + "\n".join(lines))


def _report_val(ctx: Context, bar, step: int, metrics: dict[str, float]) -> None:
    if not ctx.is_main:
        return
    units = {"energy_per_atom_mae": "eV/atom", "force_component_mae": "eV/Å", "stress_component_mae": "eV/Å³"}
    parts = [f"{m} {metrics[f'val/{m}']:.4g} {u}" for m, u in units.items() if f"val/{m}" in metrics]
    parts = parts or [f"{k} {v:.4g}" for k, v in metrics.items()]  # a hook's own metrics (property heads)
    line = f"[lampretrain] step {step} validation: " + ", ".join(parts)
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
