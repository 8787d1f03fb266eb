"""One sweep trial as its own process: ``python -m lampretrain.finetune.trial RECIPE.json``.

Ray Tune runs a function trainable in a thread, where the trainer cannot install its
preemption signal handlers and where process-wide state (the process group, RANK,
torch threads) would outlive the trial; so the trial's Ray worker starts this process
and reads its reports: one line ``@@lampretrain-report {json}`` per log window on stdout.
"""

from __future__ import annotations

import json
import math
import sys



def main(argv: list[str] | None = None) -> int:
    import mlflow

    from .recipe import parse_finetune
    from .run import finetune
    from .sweep import PREFIX

    path = (argv or sys.argv[1:])[0]
    with open(path) as fh:
        data = json.load(fh)
    recipe = parse_finetune(data, where=path)

    def emit(step: int, metrics: dict[str, float]) -> None:
        run = mlflow.active_run()
        out = {k: (float(v) if math.isfinite(float(v)) else math.inf)  # a diverged NaN is +inf: ASHA can stop it
               for k, v in metrics.items() if isinstance(v, (int, float))}
        out.update(step=step, finished=step >= recipe.train.steps, mlflow_run_id=run.info.run_id if run else "")
        print(PREFIX + json.dumps(out), flush=True)

    try:
        finetune(recipe, on_log=emit)
    except BaseException as err:
        if mlflow.active_run() is not None:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run(status="FAILED")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
