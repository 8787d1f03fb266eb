"""``lampretrain finetune`` and ``lampretrain sweep``: wired into the main command line by ``lampretrain.cli``."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained checkpoint (kept heads, change-bias, freezing, LR decay, replay, LoRA)",
        description="Fine-tune the model of CHECKPOINT on the store of RECIPE (recipes/finetune-*.yaml). Sections the "
        "recipe leaves out (model, objective, engine) come from the checkpoint's own recipe. Before step 0 the "
        "trained head's element references are refit on the new data (change-bias) and the step-0 energy MAE is "
        "printed before and after; the result is exported to OUTPUT/model.pt with LoRA adapters folded back.",
        epilog="examples (after `lampretrain demo`):\n"
        "  lampretrain finetune recipes/finetune-demo.yaml --from outputs/demo/matris\n"
        "  lampretrain finetune recipes/finetune-property.yaml --from outputs/demo/matris --set train.steps=20",
    )
    p.add_argument("recipe", help="fine-tuning recipe YAML")
    p.add_argument("--from", dest="checkpoint", help="pretrained checkpoint directory (checkpoints/step-N) or a run directory (its newest checkpoint); "
                   "default: the recipe's finetune.checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. finetune.freeze=backbone or optim.lr=1e-4")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint of this fine-tuning run), 'fresh' (start over, "
                   "earlier checkpoints moved aside) or a checkpoint directory")
    p.add_argument("--max-steps", type=int, help="stop at this step (the schedule still follows train.steps)")

    p = subparsers.add_parser(
        "change-bias",
        help="refit a trained model's per-dataset element references on a store (deepmd-kit's change-bias)",
        description="Refit the element references of each dataset head of CHECKPOINT on that dataset's frames in "
        "STORE (least absolute deviations of the per-atom energy, so the MAE on those frames can only go down; "
        "backbone and heads untouched) and save the model to --out, which evaluate, export and the calculator load. "
        "Prints each head's energy MAE before and after.",
        epilog="examples (after `lampretrain demo`):\n"
        "  lampretrain change-bias outputs/demo/matris outputs/demo/store --out refit.pt\n"
        "  lampretrain change-bias outputs/demo/matris outputs/demo/store --datasets water spice --out refit.pt",
    )
    p.add_argument("checkpoint", help="checkpoint directory, run directory or saved model file")
    p.add_argument("store", help="prepared store whose dataset names are heads of the model")
    p.add_argument("--out", required=True, help="where to save the refit model (MultiTaskModel.save)")
    p.add_argument("--datasets", nargs="+", help="only these heads (default: every store dataset the model has)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train", help="frames to fit (default: train)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="checkpoint weights (default: ema)")

    p = subparsers.add_parser(
        "sweep",
        help="many fine-tuning trials on Ray Tune (grid/random search, ASHA), MLflow child runs, best model exported",
        description="Run the trials of SWEEP (recipes/sweep-*.yaml): each is `lampretrain finetune` of the sweep's "
        "base recipe with the trial's values, in its own Ray worker, reporting its validation MAE every log window "
        "(ASHA stops poor ones early). A local Ray (dashboard off, 127.0.0.1) is started unless --address joins a "
        "cluster. Failed trials are listed with their error; finished trials are recorded in OUTPUT/trials and a "
        "re-run replays them instead of training again. Writes OUTPUT/summary.csv and OUTPUT/best.",
        epilog="examples (after `lampretrain demo`):\n"
        "  lampretrain sweep recipes/sweep-demo.yaml --set num_samples=1\n"
        "  lampretrain sweep recipes/sweep-demo.yaml --address auto",
    )
    p.add_argument("sweep", help="sweep YAML")
    p.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT) instead of starting a local one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the sweep file, e.g. num_samples=8 or resources.cpus_per_trial=2")
    p.add_argument("--quiet", action="store_true", help="no Ray Tune progress table")


def run(args: argparse.Namespace) -> int:
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "change-bias":
        return _change_bias(args)
    from . import finetune, load_finetune
    from .property import PropertyReport

    recipe = load_finetune(args.recipe, args.checkpoint, args.set)
    result = finetune(recipe, resume=args.resume, max_steps=args.max_steps)
    if isinstance(result.report, PropertyReport):
        r, split = result.report, recipe.finetune.eval_split
        print(f"[lampretrain] {recipe.name}: property head {r.columns} on {r.train_frames} structures; "
              f"{split} MAE {r.step0_mae:.4g} (training mean) → {r.final.get(f'{split}_mae', float('nan')):.4g}")
        print(f"  exported:  {result.exported}")
    elif result.exported is not None:
        r = result.report
        print(f"[lampretrain] {recipe.name}: head '{r.head}', step-0 energy MAE {r.step0_mae_pretrained:.4f} → "
              f"{r.step0_mae:.4f} eV/atom after change-bias; {r.trainable} trainable parameters")
        print(f"  finished at step {result.run.step}; checkpoint {result.run.checkpoint}")
        print(f"  exported:  {result.exported}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep

    spec = load_sweep(args.sweep, args.set)
    result = run_sweep(spec, address=args.address, verbose=0 if args.quiet else 1)
    print(f"  summary:    {result.summary}  ({len(result.rows)} trials, {result.wall_s:.0f} s)")
    print(f"  MLflow run: {result.parent_run_id} in {result.mlflow_uri}")
    return 0 if result.best is not None else 1


def _change_bias(args: argparse.Namespace) -> int:
    from ..inference.loading import load_model
    from ..train.references import refit_store_references

    model = load_model(args.checkpoint, args.weights)
    for r in refit_store_references(model, args.store, args.datasets, args.split):
        if not r.frames:
            print(f"{r.dataset:<16} no energy-labelled {args.split} frames: references kept")
            continue
        shifts = ", ".join(f"Z={z}: {d * 1e3:+.1f}" for z, d in sorted(r.delta.items()))
        print(f"{r.dataset:<16} {r.frames:>6} frames  energy MAE {r.mae_before * 1e3:9.3f} → {r.mae_after * 1e3:9.3f} "
              f"meV/atom  (δ meV: {shifts})")
    model.save(args.out)
    print(f"saved {args.out}")
    return 0

