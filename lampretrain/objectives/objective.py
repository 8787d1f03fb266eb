"""The multi-task training objective: masked per-dataset E/F/σ/m losses, balancing, denoising.

``objective(out, batch) -> (loss, metrics)`` reads a model's output dict and a
``GraphBatch``. Each loss term is a mean over the labelled samples of one dataset
in the batch (L_kt, K datasets × T tasks); terms without labels are masked, never
filled with zeros. Graphs displaced for denoising (``out["noisy"]``) leave the
E/F/σ/m terms (their labels belong to the undisplaced structure) and enter only
through the denoising term λ_dn · mean_i ‖ε̂_i − ε_i/σ‖ over displaced atoms
(``energy_on_noisy`` keeps their energy term, DeNS's "predict the original energy").
With ``final_weights`` a task's coefficient follows the learning rate from its start value c
to its final value c_f, c(s) = c_f + (c − c_f)·lr(s)/lr_peak (deepmd-kit's start_pref/limit_pref):
forces can lead while the backbone forms and energies get the weight once the lr is small enough
to resolve their frame-to-frame differences; the trainer calls ``follow_lr`` every step.
No ``.item()``, no branching on tensor values: metrics stay tensors on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch

from ..config import from_dict
from ..graph.batch import GraphBatch
from ..models.layers.scatter import scatter_sum
from ..models.multitask import DatasetSpec
from .balancing import LossBalancer
from .metrics import energy_per_atom_mae, force_component_mae, force_norm_mae, magmom_mae, stress_component_mae

TASKS = ("energy", "forces", "stress", "magmoms")
LOSS_METRICS = (energy_per_atom_mae, force_norm_mae, stress_component_mae, magmom_mae)  # the term of each task


@dataclass
class ObjectiveConfig:
    energy_weight: float = 1.0
    force_weight: float = 1.0
    stress_weight: float = 0.1
    magmom_weight: float = 0.1
    dataset_weights: dict[str, float] = field(default_factory=dict)  # name → multiplier, default 1
    balancing: Literal["none", "static", "uncertainty"] = "static"  # see objectives.balancing
    static_max_ratio: float = 10.0  # static/uncertainty: scales clamped within this factor of their median over datasets
    uncertainty_max_ratio: float | None = None  # uncertainty: weights stay within this factor of the static ones
    denoising_weight: float = 10.0  # λ_dn, deepmd-kit DPA4 dens default
    energy_on_noisy: bool = False
    final_weights: dict[str, float] = field(default_factory=dict)  # task → coefficient at the end of the lr decay

    def __post_init__(self) -> None:
        for f in ("energy_weight", "force_weight", "stress_weight", "magmom_weight", "denoising_weight"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"{f}: must be >= 0, got {getattr(self, f)}")
        if not self.static_max_ratio >= 1:
            raise ValueError(f"static_max_ratio: must be >= 1, got {self.static_max_ratio}")
        if self.uncertainty_max_ratio is not None and not self.uncertainty_max_ratio > 1:
            raise ValueError(f"uncertainty_max_ratio: must be > 1 (or null), got {self.uncertainty_max_ratio}")
        for task, final in self.final_weights.items():
            if task not in TASKS:
                raise ValueError(f"final_weights: unknown task '{task}'; tasks: {', '.join(TASKS)}")
            if not final >= 0:
                raise ValueError(f"final_weights.{task}: must be >= 0, got {final}")
            if not self.start_weights()[TASKS.index(task)] > 0:
                raise ValueError(f"final_weights.{task}: the {task} weight is 0, so there is nothing to "
                                 "anneal; give it a small start weight (deepmd-kit starts energy at 0.02)")

    def start_weights(self) -> list[float]:
        """Coefficient per task in TASKS order at the peak learning rate."""
        return [self.energy_weight, self.force_weight, self.stress_weight, self.magmom_weight]

    def task_factors(self, lr_fraction: float) -> list[float]:
        """c(s)/c per task in TASKS order at lr(s)/lr_peak = ``lr_fraction`` (1 for a task without a final weight)."""
        factors = []
        for task, start in zip(TASKS, self.start_weights()):
            final = self.final_weights.get(task)
            factors.append(1.0 if final is None else (final + (start - final) * lr_fraction) / start)
        return factors

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ObjectiveConfig":
        """Validated by the one config validator (keys, types, choices, ranges)."""
        return from_dict(cls, dict(data), at="objective")


class MultiTaskObjective(torch.nn.Module):
    """Holds the balancing state (learnable for ``uncertainty``: give its parameters to the optimizer)."""

    def __init__(self, config: ObjectiveConfig, datasets: Sequence[DatasetSpec]):
        super().__init__()
        self.config = config
        self.names = [d.name for d in datasets]
        unknown = sorted(set(config.dataset_weights) - set(self.names))
        if unknown:
            raise ValueError(
                f"objective.dataset_weights: unknown dataset(s) {', '.join(unknown)}; known: {', '.join(self.names)}"
            )
        task = torch.tensor(config.start_weights())
        per_dataset = torch.tensor([float(config.dataset_weights.get(n, 1.0)) for n in self.names])
        scales = torch.tensor([[d.energy_rms, d.force_rms, 1.0, 1.0] for d in datasets], dtype=torch.float64)
        self.balancer = LossBalancer(
            config.balancing, per_dataset[:, None] * task[None, :], scales.float(), config.static_max_ratio,
            config.uncertainty_max_ratio,
        )
        self.active_tasks = [t for t, w in enumerate(task.tolist()) if w > 0]  # fixed by the config, not by data
        self.register_buffer("active", (task > 0)[None, :].expand(len(self.names), -1).clone())
        # not persistent: set from the step by follow_lr, so checkpoints stay loadable either way
        self.register_buffer("task_factor", torch.ones(len(TASKS)), persistent=False)

    def follow_lr(self, lr_fraction: float) -> None:
        """Move the annealed task weights to lr(s)/lr_peak = ``lr_fraction`` (no-op without final_weights)."""
        if self.config.final_weights:
            self.task_factor.copy_(torch.tensor(self.config.task_factors(lr_fraction)))

    def forward(self, out: Mapping[str, torch.Tensor], batch: GraphBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = len(self.names)
        graph_ds = batch.dataset
        atom_ds = graph_ds[batch.batch]
        clean = ~out["noisy"] if "noisy" in out else torch.ones_like(batch.energy_mask)
        clean_atoms = clean[batch.batch]
        energy_clean = torch.ones_like(clean) if self.config.energy_on_noisy else clean
        masks = (batch.energy_mask & energy_clean, batch.forces_mask & clean_atoms, batch.stress_mask & clean,
                 batch.magmoms_mask & clean_atoms)
        groups = (graph_ds, atom_ds, graph_ds, atom_ds)
        sums = torch.stack([  # (K, T, 2): Σ per-sample loss error and labelled samples; zero where not predicted
            metric.sums(out[task], getattr(batch, task), mask, group, k, batch.n_atoms) if task in out
            else torch.zeros(k, 2, device=group.device)
            for task, metric, mask, group in zip(TASKS, LOSS_METRICS, masks, groups)
        ], dim=1)
        losses = torch.stack([m.finish(sums[:, t]) for t, m in enumerate(LOSS_METRICS)], dim=1).float()  # (K, T)
        count = sums[..., 1]  # (K, T)
        present = (count > 0) & self.active
        loss, terms = self.balancer(losses * self.task_factor, present)
        metrics: dict[str, torch.Tensor] = {}
        if "noise_pred" in out:
            # λ_dn · mean ‖ε̂ − ε/σ‖₂ over displaced atoms: the norm MAE's formula on the noise vectors
            noise = (out["noise_pred"], out["noise_target"], out["noise_mask"])
            dn = force_norm_mae.sums(*noise, torch.zeros_like(atom_ds), 1)[0]
            loss = loss + self.config.denoising_weight * force_norm_mae.finish(dn)
            metrics["denoise"] = force_norm_mae.finish(dn).detach()
            metrics["denoise_atoms"] = dn[1].detach()
            per_ds = force_norm_mae.finish(force_norm_mae.sums(*noise, atom_ds, k)).detach()
        with_components = "forces" in out and TASKS.index("forces") in self.active_tasks
        if with_components:  # the force metric papers and validation report, next to the norm the loss uses
            components = force_component_mae.finish(
                force_component_mae.sums(out["forces"].detach(), batch.forces, masks[1], atom_ds, k))
        metrics["loss"] = loss.detach()
        weights = self.balancer.weights().detach() * self.task_factor
        n_graphs = scatter_sum(torch.ones_like(graph_ds), graph_ds, k)
        for d, name in enumerate(self.names):
            metrics[f"{name}/loss"] = terms[d].sum().detach()
            metrics[f"{name}/n_graphs"] = n_graphs[d]
            for t in self.active_tasks:
                task = TASKS[t]
                metrics[f"{name}/{LOSS_METRICS[t].name}"] = losses[d, t].detach()
                metrics[f"{name}/{task}_count"] = count[d, t].detach()
                metrics[f"{name}/{task}_weight"] = weights[d, t]
            if with_components:
                metrics[f"{name}/{force_component_mae.name}"] = components[d]
            if "noise_pred" in out:
                metrics[f"{name}/denoise"] = per_ds[d].detach()
        return loss, metrics
