"""Command line: ``gkd train RECIPE [key=value ...]`` and ``gkd demo``.

Works as a console script and under ``accelerate launch -m gkd.cli train RECIPE ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from gkd.config import GKDConfig, load_config

    if args.help_config:
        print(GKDConfig.help_text())
        return 0
    if args.recipe is None:
        print("gkd train: error: a recipe file is required (e.g. gkd train recipes/tiny.yaml)", file=sys.stderr)
        return 2
    config = load_config(args.recipe, args.overrides)
    from gkd.distributed import shutdown
    from gkd.trainer import PREEMPTED_EXIT_CODE, GKDTrainer, NonFiniteError, Preempted

    trainer = GKDTrainer(config)
    try:
        history = trainer.train()
    except Preempted as e:
        if trainer.accelerator.is_main_process:
            print(f"gkd train: {e}", file=sys.stderr)
        shutdown(synchronize=False)
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as e:
        if trainer.accelerator.is_main_process:
            print(f"gkd train: error: {e}", file=sys.stderr)
        shutdown(synchronize=False)
        return 3
    shutdown()
    if trainer.accelerator.is_main_process and history:
        last = history[-1]
        print(f"done: {trainer.step} steps, final loss {last['loss']:.4f}; outputs in {config.output_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gkd.demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, quick=args.quick, retrain_teacher=args.retrain_teacher,
             algorithm=args.algorithm)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkd", description="On-policy knowledge distillation for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student from a YAML recipe")
    train.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields, e.g. lmbda=1.0 beta=0")
    train.add_argument("--help-config", action="store_true", help="list every config field with its default and help")
    train.set_defaults(func=_train)

    demo = sub.add_parser("demo", help="the embedded default: train a teacher on the built-in task, distill a student")
    demo.add_argument("--output-dir", default="runs/demo", help="where models, metrics and the results table go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test version (seconds, no improvement expected)")
    demo.add_argument("--retrain-teacher", action="store_true", help="ignore the cached demo teacher")
    demo.add_argument("--algorithm", choices=["gkd", "minillm"], default="gkd", help="distillation algorithm of phase 3")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # DeepSpeed calls a torch collective that torch deprecated; one warning per step buries the log
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from gkd.checkpoint import CheckpointError
    from gkd.config import InputError

    try:
        return args.func(args)
    except (InputError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"gkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
