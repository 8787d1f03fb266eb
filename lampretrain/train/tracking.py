"""MLflow tracking from rank 0: the resolved recipe as params, per-dataset metrics, throughput.

By default runs go to a local store under the run directory, no server:
``sqlite:///<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts`` (MLflow
3 refuses its old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
browse with ``mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db``).
``tracking.uri`` points at a server for clusters. A resumed
run continues the MLflow run whose id its checkpoint holds. Other ranks get a
tracker that does nothing, so the loop needs no rank checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    """Rank-0 MLflow run; ``active=False`` gives a no-op tracker."""

    def __init__(
        self,
        run_dir: str | Path,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        active: bool,
        run_id: str | None = None,
        system_metrics: bool = False,
        parent_run_id: str | None = None,
    ):
        self.active = active
        self.run_id: str | None = run_id
        run_dir = Path(run_dir).resolve()
        self.uri = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        if not active:
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        if uri is None and mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(run_dir / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=system_metrics,
            parent_run_id=None if run_id else parent_run_id,
        )
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id

    def log_recipe(self, recipe: Mapping[str, Any]) -> None:
        if not self.active:
            return
        params = flatten(recipe)
        existing = self._mlflow.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}  # params are immutable in MLflow
        items = list(new.items())
        for start in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[start : start + 100]))
        self._mlflow.log_dict(dict(recipe), "recipe.json")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.active and metrics:
            self._mlflow.log_metrics({k.replace("@", "_"): float(v) for k, v in metrics.items()}, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow.end_run(status=status)
            self.active = False
