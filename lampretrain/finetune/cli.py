"""``lampretrain finetune``: wired into the main command line by ``lampretrain.cli``."""

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
    )
    p.add_argument("recipe", help="fine-tuning recipe YAML")
    p.add_argument("--from", dest="checkpoint", help="pretrained checkpoint directory (checkpoints/step-N); "
                   "default: the recipe's finetune.checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. finetune.freeze=backbone or optim.lr=1e-4")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint of this fine-tuning run) or a checkpoint directory")
    p.add_argument("--max-steps", type=int, help="stop at this step (the schedule still follows train.steps)")


def run(args: argparse.Namespace) -> int:
    from . import finetune, load_finetune

    recipe = load_finetune(args.recipe, args.checkpoint, args.set)
    result = finetune(recipe, resume=args.resume, max_steps=args.max_steps)
    if result.exported is not None:
        r = result.report
        print(f"[lampretrain] {recipe.name}: head '{r.head}', step-0 energy MAE {r.step0_mae_pretrained:.4f} → "
              f"{r.step0_mae:.4f} eV/atom after change-bias; {r.trainable} trainable parameters")
        print(f"  finished at step {result.run.step}; checkpoint {result.run.checkpoint}")
        print(f"  exported:  {result.exported}")
    return 0
