"""One sweep trial as its own process: ``python -m lampretrain.finetune.trial RECIPE.json TAGS_JSON``.

Ray Tune runs a function trainable in a thread, where the trainer cannot install its
preemption signal handlers and where process-wide state (the process group, RANK,
torch threads) would outlive the trial; so the trial's Ray worker starts this process
and reads its reports: one line ``@@lampretrain-report {json}`` per log window on stdout.

The trial's MLflow child run is created here, first thing, with ``TAGS_JSON`` (the trial's
key): a trial that fails before training starts still has a run that ends ``FAILED`` with
its error, and one whose process is killed leaves a ``RUNNING`` run the sweep can find by
those tags and close.
"""

from __future__ import annotations

import json
import math
import os
import sys


def main(argv: list[str] | None = None) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    path, tags = argv or sys.argv[1:]
    with open(path) as fh:
        data = json.load(fh)
    tracking = data["tracking"]
    client = MlflowClient(tracking["uri"])
    experiment = client.get_experiment_by_name(tracking["experiment"])  # the sweep's parent run made it
    run_id = client.create_run(experiment.experiment_id, run_name=tracking["run_name"],
                               tags={**json.loads(tags), MLFLOW_PARENT_RUN_ID: tracking["parent_run_id"]}).info.run_id
    # the trainer's tracker continues this run: MLflow's start_run takes an existing run from MLFLOW_RUN_ID
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        from .recipe import parse_finetune
        from .run import finetune
        from .sweep import PREFIX

        recipe = parse_finetune(data, where=path)

        def emit(step: int, metrics: dict[str, float]) -> None:
            out = {k: (float(v) if math.isfinite(float(v)) else math.inf)  # a diverged NaN is +inf: ASHA can stop it
                   for k, v in metrics.items() if isinstance(v, (int, float))}
            out.update(step=step, finished=step >= recipe.train.steps, mlflow_run_id=run_id)
            print(PREFIX + json.dumps(out), flush=True)

        finetune(recipe, on_log=emit)
    except BaseException as err:
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        if mlflow.active_run() is not None:  # the trainer's, this same run: end it where MLflow tracks it as active
            mlflow.end_run(status="FAILED")
        else:
            client.set_terminated(run_id, "FAILED")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
