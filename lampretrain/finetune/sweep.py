"""``lampretrain sweep``: many fine-tuning trials on Ray Tune, each an MLflow child run of one sweep run.

A sweep file names a base fine-tuning recipe and a search space over its keys::

    name: sweep-demo
    output: outputs/sweep-demo
    recipe: recipes/finetune-demo.yaml        # relative paths are relative to the working directory
    checkpoint: outputs/demo/matris
    set: [train.steps=40]                     # overrides of the base recipe, as `finetune --set`
    space:                                    # dotted recipe key → grid | choice | uniform | loguniform | randint
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      finetune.freeze: {grid: [none, backbone]}
      finetune.replay.ratio: {choice: [0.0, 0.3]}
    num_samples: 2                            # random draws per grid point (grid points × num_samples trials)
    metric: val_mae                           # reported by every trial at each log window, minimised
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}

Every trial runs :func:`lampretrain.finetune.finetune` (the code of ``lampretrain finetune``)
in its own Ray worker process and reports ``<eval_split>_mae`` at every log window, so ASHA
can stop it early. A trial that fails (raises, its process is killed, e.g. by the OOM killer,
or its Ray worker dies) is a ``failed`` row with a one-line reason, its MLflow child run ends
``FAILED`` with that reason in its ``error`` tag, and the sweep goes on.
Finished trials (completed or stopped by ASHA) are recorded in ``<output>/trials/<key>.json``,
``key`` the hash of the base recipe and the trial's values: a re-run (after an interruption,
or with a grown search space) replays them from their records instead of training again.
At the end ``<output>/summary.csv`` holds one row per trial, the best completed trial's
exported model (and checkpoint) is copied to ``<output>/best``; ``lampretrain sweep`` exits 0
when there is one, 1 when no trial completed.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ..recipe import _number_literal
from .recipe import FinetuneRecipe, parse_finetune

PREFIX = "@@lampretrain-report "  # a trial process's report line on stdout: PREFIX + json
KEY_TAG = "lampretrain.trial_key"  # MLflow tags of a trial's child run: its key, and the sweep invocation
ATTEMPT_TAG = "lampretrain.sweep_attempt"  # that ran it (a re-run runs a failed trial again under a new run)
PATH_KEYS = ("data.store", "finetune.checkpoint", "finetune.replay.store", "property.csv")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SearchParam:
    """Exactly one of: a grid (every value, crossed with the other grids), or a distribution sampled per trial."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None  # [low, high], low > 0
    randint: list[int] | None = None  # [low, high), integers

    def check(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice") and not values:
            raise ConfigError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not values[0] < values[1]:
                raise ConfigError(f"{kind}: expected [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"loguniform: low must be > 0, got {values[0]}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that must validate before the sweep starts (every listed value, a range's ends)."""
        values = getattr(self, self.kind)
        return [values[0], values[1] - 1] if self.kind == "randint" else list(values)

    def domain(self):
        from ray import tune

        values = getattr(self, self.kind)
        if self.kind == "grid":
            return tune.grid_search(values)
        if self.kind == "choice":
            return tune.choice(values)
        return getattr(tune, self.kind)(*values)  # uniform, loguniform, randint


@dataclass
class SchedulerSection:
    """ASHA over the trials' reports (one per log window): time is the report count."""

    kind: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # reports before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int | None = None  # default: the base recipe's number of log windows

    def check(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"grace_period: must be >= 1, got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise ConfigError(f"reduction_factor: must be > 1, got {self.reduction_factor}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(f"max_t: must be >= grace_period ({self.grace_period}), got {self.max_t}")


@dataclass
class ResourcesSection:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None  # default: as many as the resources allow

    def check(self) -> None:
        if not self.cpus_per_trial > 0:
            raise ConfigError(f"cpus_per_trial: must be > 0, got {self.cpus_per_trial}")
        if not self.gpus_per_trial >= 0:
            raise ConfigError(f"gpus_per_trial: must be >= 0, got {self.gpus_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent: must be >= 1 (or null), got {self.max_concurrent}")


@dataclass
class RaySection:
    address: str | None = None  # join this cluster ("auto", "host:port"); default: start a local Ray
    num_cpus: int | None = None  # the local Ray's CPUs (default: all)
    dashboard: bool = False  # the local Ray's dashboard, on 127.0.0.1

    def check(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus: must be >= 1 (or null for all), got {self.num_cpus}")


@dataclass
class SweepTracking:
    uri: str | None = None  # MLflow URI; default: sqlite:///<output>/mlflow.db
    experiment: str = "lampretrain-sweep"


@dataclass
class SweepSpec:
    name: str
    recipe: str  # the base fine-tuning recipe
    output: str = "outputs/sweep"
    checkpoint: str | None = None  # the pretrained checkpoint (default: the recipe's finetune.checkpoint)
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides of the base recipe
    space: dict[str, SearchParam] = field(default_factory=dict)
    num_samples: int = 1
    seed: int = 0  # of the random draws: a re-run draws the same trials (and finds their records)
    metric: str = "val_mae"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    ray: RaySection = field(default_factory=RaySection)
    tracking: SweepTracking = field(default_factory=SweepTracking)

    def check(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1, got {self.num_samples}")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    data = apply_overrides(load_yaml(path), [_number_literal(o) for o in overrides or []])
    return from_dict(SweepSpec, data, where=str(path))


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def absolute_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """The recipe's file paths (:data:`PATH_KEYS`, ``output``) made absolute against ``root``."""
    out = copy.deepcopy(data)
    sets = []
    for key in (*PATH_KEYS, "output"):
        value = _get(out, key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            sets.append(f"{key}={json.dumps(str(root / value))}")
    return apply_overrides(out, sets)


def with_params(base: dict[str, Any], params: dict[str, Any], root: Path) -> dict[str, Any]:
    """``base`` with each dotted key set to its trial value (path values resolved against ``root``)."""
    return absolute_paths(apply_overrides(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in params.items()]), root)


def base_recipe(spec: SweepSpec, root: Path) -> dict[str, Any]:
    """The base recipe's plain data with the sweep's checkpoint and overrides, paths absolute."""
    data = apply_overrides(load_yaml(root / spec.recipe), [_number_literal(o) for o in spec.set])
    if spec.checkpoint:
        data.setdefault("finetune", {})["checkpoint"] = spec.checkpoint
    data.setdefault("train", {})["progress"] = False
    return absolute_paths(data, root)


def validate(spec: SweepSpec, base: dict[str, Any], root: Path) -> None:
    """Parse the base recipe with every listed value of every searched key: bad keys and values fail here."""
    parse_finetune(base, where=spec.recipe)
    for key, param in spec.space.items():
        for value in param.candidates():
            try:
                parse_finetune(with_params(base, {key: value}, root), where=f"{spec.recipe} with {key}={value!r}")
            except ConfigError as err:
                raise ConfigError(f"space.{key}: {err}") from None


def trial_key(base: dict[str, Any], params: dict[str, Any]) -> str:
    """Hash of the base recipe and the trial's values: the same trial of the same sweep has the same key."""
    blob = json.dumps({"base": base, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TrialError(RuntimeError):
    """A trial's fine-tuning process failed; the message is the last line of its traceback."""


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it ends (ASHA stopping the trial's worker)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _died(code: int) -> str:
    """The reason for a trial process that a signal ended (``code`` < 0, as Popen reports it)."""
    sig = signal.Signals(-code)
    # the kernel's OOM killer sends SIGKILL, and the trial never installs a handler that could exit otherwise
    hint = "; out of memory?" if sig == signal.SIGKILL else ""
    return f"trial process died (killed by signal {-code} {sig.name}{hint})"


def run_trial(config: dict[str, Any], base: dict[str, Any], root: str, output: str, records: dict[str, dict],
              metric: str, tracking: dict[str, Any], attempt: str) -> None:
    """One Ray Tune trial: replay its record when it finished before, else fine-tune and report every log window.

    The fine-tuning runs in a child process (:mod:`lampretrain.finetune.trial`) whose report
    lines are forwarded to Tune; its stderr goes to ``<trial_dir>/trial.log``.
    """
    import ray
    from ray import tune

    params = config["params"]
    key = trial_key(base, params)
    node = ray.get_runtime_context().get_node_id()
    if key in records:
        for metrics in records[key]["history"]:
            tune.report({**metrics, "cached": True, "node_id": node})
        return
    trial_dir = Path(output) / "trials" / key
    trial_dir.mkdir(parents=True, exist_ok=True)
    data = with_params(base, params, Path(root))
    data["output"] = str(trial_dir)
    data["name"] = f"{data.get('name', 'finetune')}-{key[:8]}"
    data["tracking"] = {**tracking, "enabled": True, "run_name": data["name"]}
    tags = json.dumps({KEY_TAG: key, ATTEMPT_TAG: attempt})
    recipe_path = trial_dir / "trial.json"
    recipe_path.write_text(json.dumps(data, indent=1))
    log_path = trial_dir / "trial.log"
    # a world of one: no rank or rendezvous inherited from the process that started Ray
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "lampretrain.finetune.trial", str(recipe_path), tags],
                                 stdout=subprocess.PIPE, stderr=log, text=True, env=env, preexec_fn=_die_with_parent)
        try:
            for line in child.stdout:
                if not line.startswith(PREFIX):
                    continue
                out = json.loads(line[len(PREFIX):])
                out.update(trial_key=key, trial_dir=str(trial_dir), cached=False, node_id=node)
                if metric not in out:
                    names = sorted(k for k in out if "/" not in k)  # not the per-dataset ones: a line stays readable
                    raise TrialError(f"the trial does not report the sweep's metric '{metric}' (it reports {names}; "
                                     "fine-tuning reports <eval_split>_mae only when its dataset has frames in "
                                     "finetune.eval_split)")
                tune.report(out)
        finally:
            if child.poll() is None and sys.exc_info()[0] is not None:
                child.kill()
            code = child.wait()
    if code < 0:  # its log ends wherever the signal struck: not a reason
        raise TrialError(f"{_died(code)} (log: {log_path})")
    if code != 0:
        lines = [x for x in log_path.read_text().splitlines() if x.strip()]
        raise TrialError(f"{lines[-1][:300] if lines else f'exit code {code}'} (log: {log_path})")


def _records(output: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((output / "trials").glob("*.json")):
        record = json.loads(path.read_text())
        out[record["key"]] = record
    return out


def _callback(output: Path, uri: str):
    """A Tune callback writing each finished trial's record (and closing the MLflow runs of stopped trials)."""
    from ray import tune

    class TrialRecords(tune.Callback):
        """Also each trial's values and reports by trial id: the summary's source, since Tune's result of a trial
        whose worker died before its first report has neither (``Result.config`` is None)."""

        def __init__(self):
            self.params: dict[str, dict[str, Any]] = {}
            self.history: dict[str, list[dict]] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.params[trial.trial_id] = trial.config["params"]

        def on_trial_error(self, iteration, trials, trial, **info):  # also a trial that failed before it started
            self.params[trial.trial_id] = trial.config["params"]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            keep = {k: v for k, v in result.items() if k not in ("config",) and isinstance(v, (int, float, str, bool))}
            self.history.setdefault(trial.trial_id, []).append(
                {k: v for k, v in keep.items() if not _tune_bookkeeping(k)})

        def on_trial_complete(self, iteration, trials, trial, **info):
            history = self.history.get(trial.trial_id, [])
            if not history or history[-1].get("cached"):
                return
            last = history[-1]
            record = {"key": last["trial_key"], "params": trial.config["params"], "history": history,
                      "stopped_early": not last.get("finished"), "trial_dir": last.get("trial_dir"),
                      "mlflow_run_id": last.get("mlflow_run_id")}
            if record["stopped_early"] and record["mlflow_run_id"]:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                client.set_tag(record["mlflow_run_id"], "stopped_early", "asha")
                client.set_terminated(record["mlflow_run_id"], "KILLED")
            from ..files import atomic_write_json

            atomic_write_json(output / "trials" / f"{record['key']}.json", record)

    return TrialRecords()


def _tune_bookkeeping(key: str) -> bool:
    return key in ("training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "date", "hostname",
                   "node_ip", "pid", "trial_id", "experiment_id", "iterations_since_restore", "time_since_restore",
                   "checkpoint_dir_name", "should_checkpoint", "experiment_tag")


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per trial: trial, status, values, metric, iterations, MLflow run, error
    best: dict[str, Any] | None  # the best completed trial's row
    summary: Path  # summary.csv
    parent_run_id: str
    mlflow_uri: str
    wall_s: float


def _start_ray(section: RaySection, address: str | None) -> bool:
    """Join ``address`` or start a local Ray on 127.0.0.1 (dashboard off unless asked); True when started here."""
    import ray

    if ray.is_initialized():
        return False
    address = address or section.address
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as err:
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            raise ConnectionError(
                f"could not join the Ray cluster at {address} ({err}); a cluster started with RAY_AUTH_MODE=token "
                f"needs RAY_AUTH_MODE=token here too (it is {mode}) and its token in RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token") from err
    else:
        ray.init(num_cpus=section.num_cpus, include_dashboard=section.dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


def _reason(error: BaseException) -> str:
    """A failed trial's error as one line: what happened, in the user's terms."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    cause = getattr(error, "cause", None) or error
    if isinstance(cause, TrialError):  # one line already, its log's path at the end
        return str(cause)
    if isinstance(cause, OutOfMemoryError):
        return "the trial's Ray worker was killed by Ray's memory monitor (out of memory)"
    if isinstance(cause, RayActorError):
        # the worker's own death (a signal, the OOM killer, its node gone); the trial process dies with it
        why = "its node was preempted" if cause.preempted else "killed by a signal, out of memory, or its node was lost"
        return f"the trial's Ray worker process died ({why})"
    lines = [x for x in f"{type(cause).__name__}: {cause}".splitlines() if x.strip()]  # Ray's errors run to many lines
    return lines[0][:300]


def _row(params: dict[str, Any], history: list[dict], error: BaseException | None, base: dict[str, Any],
         records: dict[str, dict], metric: str, space: list[str], output: Path) -> dict[str, Any]:
    m = history[-1] if history else {}
    key = trial_key(base, params)
    record = records.get(key)
    if error is not None:
        status = "failed"
    elif m.get("cached"):
        status = "cached (stopped early)" if record and record["stopped_early"] else "cached"
    else:
        status = "completed" if m.get("finished") else "stopped early"
    reason = _reason(error) if error is not None else ""
    row = {"trial": key[:8], "status": status}
    row.update({k: params.get(k) for k in space})
    row.update({metric: m.get(metric), "step": m.get("step"), "reports": len(history),
                "mlflow_run_id": m.get("mlflow_run_id", ""), "node_id": m.get("node_id", ""),
                "trial_dir": m.get("trial_dir") or (str(output / "trials" / key) if error else ""), "error": reason})
    return row


def _fail_runs(rows: list[dict[str, Any]], keys: list[str], uri: str, parent_run_id: str, attempt: str) -> None:
    """End each failed trial's child run of this invocation that is still ``RUNNING`` (its process was killed, or its
    worker died, so nothing ended it) as ``FAILED`` with the row's reason; fill the row's run id when it never
    reported one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    for row, key in zip(rows, keys):
        if row["status"] != "failed":
            continue
        runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                                f"tags.`{KEY_TAG}` = '{key}' and tags.`{ATTEMPT_TAG}` = '{attempt}'")
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "error", row["error"])
                client.set_terminated(run.info.run_id, "FAILED")
        if runs and not row["mlflow_run_id"]:
            row["mlflow_run_id"] = runs[0].info.run_id


def _export_best(row: dict[str, Any], output: Path) -> Path | None:
    """Copy the best trial's exported model (LoRA folded) and last checkpoint to ``<output>/best``."""
    trial_dir = Path(row["trial_dir"]) if row.get("trial_dir") else None
    if trial_dir is None:
        return None
    best = output / "best"
    if best.exists():
        shutil.rmtree(best)
    best.mkdir(parents=True)
    for name in ("model.pt", "property.pt", "finetune.json", "recipe.yaml"):
        if (trial_dir / name).exists():
            shutil.copy2(trial_dir / name, best / name)
    checkpoints = sorted((trial_dir / "checkpoints").glob("step-*"))
    if checkpoints:
        shutil.copytree(checkpoints[-1], best / "checkpoint")
    (best / "trial.json").write_text(json.dumps(row, indent=1, default=str))
    return best


def write_summary(rows: list[dict[str, Any]], path: Path) -> str:
    """``summary.csv`` and the same table as text."""
    columns = list(rows[0]) if rows else ["trial", "status"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c not in ("trial_dir", "node_id")]
    cells = [[_fmt(r.get(c)) for c in shown] for r in rows]
    widths = [max(len(c), *(len(x[k]) for x in cells)) if cells else len(c) for k, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def run_sweep(spec: SweepSpec, address: str | None = None, root: str | Path | None = None,
              verbose: int = 1) -> SweepResult:
    """Validate, start (or join) Ray, run the trials, write records, summary and the best model; see the module doc."""
    from ..train.tracking import Tracker

    start = time.perf_counter()
    root = Path(root or Path.cwd()).resolve()
    output = (root / spec.output).resolve()
    base = base_recipe(spec, root)
    validate(spec, base, root)
    first = parse_finetune(base, where=spec.recipe)
    (output / "trials").mkdir(parents=True, exist_ok=True)
    state_path = output / "sweep.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    uri = spec.tracking.uri if spec.tracking.uri else None
    parent = Tracker(output, uri, spec.tracking.experiment, spec.name, active=True, run_id=state.get("parent_run_id"))
    try:
        result = _run_trials(spec, address, root, output, base, first, parent, verbose, start)
    except BaseException as err:
        import mlflow

        # the sweep's own run ends with it, not left RUNNING: interrupted (Ctrl-C) or failed, with the reason
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
        parent.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    parent.finish()
    return result


def _run_trials(spec: SweepSpec, address: str | None, root: Path, output: Path, base: dict[str, Any],
                first: FinetuneRecipe, parent, verbose: int, start: float) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    state_path = output / "sweep.json"
    parent.log_recipe(to_dict(spec))
    state_path.write_text(json.dumps({"parent_run_id": parent.run_id, "uri": parent.uri}, indent=1))
    records = _records(output)
    tracking = {"uri": parent.uri, "experiment": spec.tracking.experiment, "parent_run_id": parent.run_id}
    attempt = uuid.uuid4().hex
    callback = _callback(output, parent.uri)
    started = _start_ray(spec.ray, address)
    # Ray workers get this module's trial function by value: importing it by name would import the
    # lampretrain.finetune package (torch, the trainer) in every trial's worker, only to start a child process
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        trainable = tune.with_parameters(run_trial, base=base, root=str(root), output=str(output), records=records,
                                         metric=spec.metric, tracking=tracking, attempt=attempt)
        resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
        scheduler = None
        if spec.scheduler.kind == "asha":
            reports = math.ceil(first.train.steps / first.train.log_every) + 1
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.scheduler.max_t or reports,
                                      grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor)
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space={"params": {k: p.domain() for k, p in spec.space.items()}},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                max_concurrent_trials=spec.resources.max_concurrent,
                search_alg=BasicVariantGenerator(random_state=spec.seed),
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(output / "tune"), verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[callback],
            ),
        )
        grid = tuner.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if started:
            import ray

            ray.shutdown()
    records = _records(output)
    rows, keys = [], []
    for k in range(len(grid)):
        trial_id = grid[k].metrics["trial_id"]  # Tune sets it in every trial's result, even an empty one
        params = callback.params.get(trial_id)
        if params is None:  # never started (the sweep was interrupted first): nothing to report; a re-run runs it
            continue
        rows.append(_row(params, callback.history.get(trial_id, []), grid[k].error, base, records, spec.metric,
                         list(spec.space), output))
        keys.append(trial_key(base, params))
    _fail_runs(rows, keys, parent.uri, parent.run_id, attempt)
    done = [r for r in rows if r["status"] in ("completed", "cached") and r[spec.metric] is not None]
    sign = 1.0 if spec.mode == "min" else -1.0
    best = min(done, key=lambda r: sign * r[spec.metric]) if done else None
    summary = output / "summary.csv"
    table = write_summary(rows, summary)
    print(table)
    exported = _export_best(best, output) if best else None
    if best is not None:
        print(f"[lampretrain] sweep {spec.name}: best {best['trial']} {spec.metric} {best[spec.metric]:.4g}; "
              f"exported to {exported}")
    wall = time.perf_counter() - start
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parent.log_metrics({f"trials_{k.replace(' ', '_').replace('(', '').replace(')', '')}": v
                        for k, v in counts.items()} | {"wall_s": wall}, step=0)
    if best is not None:
        parent.log_metrics({f"best_{spec.metric}": best[spec.metric]}, step=0)
    import mlflow

    mlflow.log_artifact(str(summary))  # into the parent run, active in this process
    return SweepResult(rows, best, summary, parent.run_id, parent.uri, wall)
