"""Command line: ``gkd train RECIPE [key=value ...]``, ``gkd eval --model PATH``, ``gkd demo``,
``gkd serve-teacher MODEL`` and ``gkd cache-teacher RECIPE``.

Works as a console script and under ``accelerate launch -m gkd.cli train RECIPE ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["console_main", "main"]

# Set by a command that ran with several processes; see console_main.
_hard_exit = False


def _train(args: argparse.Namespace) -> int:
    from gkd.config import GKDConfig, load_config

    if args.help_config:
        print(GKDConfig.help_text())
        return 0
    if args.recipe is None:
        print("gkd train: error: a recipe file is required (e.g. gkd train recipes/tiny.yaml)", file=sys.stderr)
        return 2
    config = load_config(args.recipe, args.overrides)
    from gkd.distributed import shutdown, world_size
    from gkd.errors import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted
    from gkd.trainer import GKDTrainer

    trainer = GKDTrainer(config)
    is_main = trainer.accelerator.is_main_process
    global _hard_exit
    _hard_exit = world_size() > 1
    message: str | None = None
    try:
        history = trainer.train()
    except Preempted as e:
        message, code = f"gkd train: {e}", PREEMPTED_EXIT_CODE
    except NonFiniteError as e:
        message, code = f"gkd train: error: {e}", 3
    else:
        code = 0
        if history:
            message = (f"done: {trainer.step} steps, final loss {history[-1]['loss']:.4f}; "
                       f"outputs in {config.output_dir}")
    if is_main and message:
        print(message, file=sys.stdout if code == 0 else sys.stderr, flush=True)
    # The trainer's DDP / DeepSpeed wrappers hold the process group: drop them so shutdown() really
    # joins the communicator threads (a live group at interpreter exit can abort with SIGABRT).
    del trainer
    shutdown(synchronize=code == 0)
    return code


def _demo(args: argparse.Namespace) -> int:
    from gkd.demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, quick=args.quick, retrain_teacher=args.retrain_teacher,
             algorithm=args.algorithm, progress=not args.no_progress)
    return 0


#: ``gkd eval`` flag → :func:`gkd.eval_command.run_eval` keyword, for flags a run's config.yaml may also supply.
_EVAL_FROM_CONFIG = {"teacher": "teacher", "dataset": "dataset", "dataset_format": "dataset_format",
                     "dataset_split": "dataset_split", "validation_size": "validation_size", "split_seed": "split_seed",
                     "max_response_length": "max_response_length", "num_train_examples": "num_train_examples",
                     "max_digits": "max_digits", "seed": "data_seed", "max_new_tokens": "max_new_tokens",
                     "max_prompt_length": "max_prompt_length", "temperature": "temperature", "top_p": "top_p",
                     "top_k": "top_k", "reward_funcs": "reward_funcs", "teachers": "teachers",
                     "teacher_column": "teacher_column", "default_teacher": "default_teacher"}


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gkd.errors import InputError
    from gkd.eval_command import format_table, read_run_config, rescore_generations, run_eval, write_report

    if args.rescore:
        if not (args.benchmark and args.benchmark_data):
            raise InputError("--rescore needs --benchmark and --benchmark-data (the rows the generations answer)")
        report = rescore_generations(args.rescore, args.benchmark, args.benchmark_data)
        print("\n".join(_verifiable_table(report)))
        if args.output:
            write_report(report, args.output)
            print(f"wrote {args.output}")
        return 0
    if not args.model:
        raise InputError("--model is required (or --rescore GENERATIONS to score a generations file again)")

    kwargs: dict = {}
    config = args.config
    if config == "auto":  # a run's model sits in output_dir/final, its config in output_dir/config.yaml
        found = Path(args.model).expanduser().parent / "config.yaml"
        config = str(found) if found.is_file() else None
    elif config == "none":
        config = None
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file {config!r} not found")
        from_config = read_run_config(config, teacher_given=args.teacher is not None)
        kwargs.update({_EVAL_FROM_CONFIG[k]: v for k, v in from_config.items()})
        if args.benchmark:  # a benchmark brings its own rows and length; the run's teacher and sampling still apply
            for k in ("dataset", "dataset_format", "dataset_split", "validation_size", "split_seed",
                      "max_response_length", "num_train_examples", "max_digits", "data_seed", "max_new_tokens"):
                kwargs.pop(k, None)
        print(f"gkd eval: data and sampling settings from {config} (flags override them)", file=sys.stderr)
    flags = {"teacher": args.teacher, "dataset": args.dataset, "dataset_format": args.dataset_format,
             "split": args.split, "validation_size": args.validation_size, "split_seed": args.split_seed,
             "max_response_length": args.max_response_length, "max_digits": args.max_digits,
             "num_train_examples": args.num_train_examples, "data_seed": args.data_seed, "max_prompts": args.max_prompts,
             "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
             "samples_per_prompt": args.samples_per_prompt, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed, "batch_size": args.batch_size, "reward_funcs": args.reward_funcs,
             "num_shown": args.show}
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    if args.teacher == "none":
        kwargs["teacher"] = None
    kwargs["decodings"] = ("greedy", "sample") if args.decoding == "both" else (args.decoding,)
    kwargs["teacher_metrics"] = not args.no_teacher_metrics
    if args.benchmark_data and not args.benchmark:
        raise InputError("--benchmark-data needs --benchmark (e.g. --benchmark ifeval)")
    if args.benchmark:
        if args.dataset:
            raise InputError("--benchmark evaluates --benchmark-data; drop --dataset")
        kwargs.update(benchmark=args.benchmark, benchmark_data=args.benchmark_data)
    generations = args.generations
    if generations is None and args.output:
        generations = str(Path(args.output).with_suffix("")) + ".generations.jsonl"
    elif generations is None and args.benchmark:
        generations = f"eval-{args.benchmark}-generations.jsonl"
    if generations not in (None, "none"):
        kwargs["generations"] = generations
        print(f"gkd eval: every completion is written to {generations} as soon as it is decoded", file=sys.stderr)
    report = run_eval(args.model, **kwargs)
    print(format_table(report))
    if args.output:
        write_report(report, args.output)
        print(f"wrote {args.output}")
    return 0


def _verifiable_table(report: dict) -> list[str]:
    from gkd.eval_command import _verifiable_lines

    lines = _verifiable_lines(report)
    lines.append("")
    lines.extend(f"{r['model']}/{r['decoding']}: {r['num_completions']} completions, no EOS {100 * r['no_eos']:.1f}%, "
                 f"mean length {r['completion_len_mean']:.1f} tokens" for r in report["results"])
    return lines


def _cache_teacher(args: argparse.Namespace) -> int:
    import time

    from gkd.config import load_config
    from gkd.serving.cache import cache_teacher

    config = load_config(args.recipe, args.overrides)
    start = time.perf_counter()
    manifest = cache_teacher(config, progress=sys.stderr.isatty())
    print(f"cached the teacher's top-{manifest['top_k']} view of {manifest['rows']} rows in "
          f"{len(manifest['shards'])} shard(s) under {config.teacher_cache} ({time.perf_counter() - start:.0f} s)")
    return 0


def _serve_teacher(args: argparse.Namespace) -> int:
    import os

    from gkd.errors import InputError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("serve-teacher needs FastAPI and uvicorn: pip install 'gkd[serve]'") from None
    from gkd.serving.server import ServerLimits, serve

    api_key = os.environ.get(args.api_key_env) or None
    if args.require_api_key and not api_key:
        raise InputError(f"--require-api-key: the environment variable {args.api_key_env} is empty or unset")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"gkd serve-teacher: warning: listening on {args.host} without a bearer token; anyone who can reach "
              f"this port can use the teacher (set {args.api_key_env})", file=sys.stderr)
    limits = ServerLimits()
    for name in ("max_batch_size", "max_sequence_length", "max_batch_tokens", "chunk_tokens", "max_body_bytes",
                 "max_connections"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise InputError(f"--{name.replace('_', '-')}={value} must be > 0")
            setattr(limits, name, value)
    serve(args.model, host=args.host, port=args.port, api_key=api_key, dtype=args.dtype, device=args.device,
          limits=limits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkd", description="On-policy knowledge distillation for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student from a YAML recipe")
    train.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields, e.g. lmbda=1.0 beta=0")
    train.add_argument("--help-config", action="store_true", help="list every config field with its default and help")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a saved student (and teacher) on held-out prompts",
                        description="Exact match / task reward, Rouge-L, teacher–student KL on the model's own "
                                    "completions, mean length and sample generations. Data settings default to "
                                    "the run's config.yaml beside the model folder (--config).")
    ev.add_argument("--model", help="model folder (e.g. runs/x/final) or hub id (required unless --rescore)")
    ev.add_argument("--teacher", help="teacher folder or hub id for the KLs ('none' to skip one named by --config); "
                                      "a run with several teachers (teachers: in its config) compares each row with "
                                      "its own teacher and reports the KLs per teacher too, unless --teacher is given")
    ev.add_argument("--config", default="auto",
                    help="training config.yaml or recipe to take data/sampling settings from; 'auto' (default): "
                         "MODEL/../config.yaml if present; 'none': ignore")
    ev.add_argument("--dataset", help="builtin:addition (default) or a .jsonl/.json/.parquet/.csv file / datasets name")
    ev.add_argument("--dataset-format", choices=["auto", "prompt_completion", "messages", "dolly", "text"])  # gkd.data.FORMATS
    ev.add_argument("--split", choices=["validation", "train", "all"], help="part of the data to evaluate (default validation)")
    ev.add_argument("--validation-size", type=float, help="share (0..1) or row count held out, as in training")
    ev.add_argument("--split-seed", type=int, help="seed of the train/validation split, as in training")
    ev.add_argument("--max-response-length", type=int, help="length filter on reference responses (tokens), as in training")
    ev.add_argument("--max-digits", type=int, help="builtin:addition: operand digits")
    ev.add_argument("--num-train-examples", type=int, help="builtin:addition: size of the training set it was trained on")
    ev.add_argument("--data-seed", type=int, help="builtin:addition: the training run's seed (picks its held-out problems)")
    ev.add_argument("--max-prompts", type=int, help="evaluate only the first N prompts")
    ev.add_argument("--max-new-tokens", type=int, help="completion length limit (builtin default 2·max_digits+1, else 64)")
    ev.add_argument("--max-prompt-length", type=int, help="prompts are truncated from the left to this many tokens")
    ev.add_argument("--decoding", choices=["greedy", "sample", "both"], default="greedy")
    ev.add_argument("--samples-per-prompt", type=int, help="sampled decoding: completions drawn per prompt (default 1)")
    ev.add_argument("--temperature", type=float)
    ev.add_argument("--top-p", type=float)
    ev.add_argument("--top-k", type=int)
    ev.add_argument("--seed", type=int, help="seed of sampled decoding (default 0)")
    ev.add_argument("--batch-size", type=int, help="prompts per generation batch (default 32)")
    ev.add_argument("--reward-funcs", nargs="+", metavar="SPEC", help="reward functions 'module:function' or 'file.py:function'")
    ev.add_argument("--show", type=int, help="sample generations to print per model and decoding (default 3)")
    ev.add_argument("--no-teacher-metrics", action="store_true", help="use the teacher for the KLs only")
    ev.add_argument("--benchmark", choices=["ifeval"],
                    help="evaluate on a verifiable-instruction benchmark instead of the run's data (IFEval's checkers, "
                         "from the if-verifiable package: pip install 'gkd[eval]'); default length 512 new tokens")
    ev.add_argument("--benchmark-data", metavar="PATH_OR_NAME",
                    help="the benchmark's rows in IFEval's format (key, prompt, instruction_id_list, kwargs): a "
                         ".jsonl/.json/.parquet file, or a datasets name such as google/IFEval (online)")
    ev.add_argument("--generations", metavar="PATH",
                    help="JSONL file that receives every completion as soon as it is decoded, before scoring "
                         "(default: beside --output; with --benchmark and no --output: eval-<benchmark>-generations.jsonl; "
                         "'none': do not write)")
    ev.add_argument("--rescore", metavar="GENERATIONS",
                    help="score a generations file of an earlier --benchmark run again, without any model "
                         "(with --benchmark and the same --benchmark-data)")
    ev.add_argument("--output", help="write the full results as JSON here")
    ev.set_defaults(func=_eval)

    demo = sub.add_parser(
        "demo", help="the embedded default: train a teacher on the built-in task, distill a student",
        description="Offline, on the CPU: trains (or takes from the cache) a teacher on the built-in task (column "
                    "addition with written carries), warms a smaller student up with SFT, distills it with on-policy "
                    "GKD (or MiniLLM) and, as a control, continues SFT for as many steps; prints a table of held-out "
                    "exact match and teacher–student KLs and the folders of every model it wrote.")
    demo.add_argument("--output-dir", default="runs/demo",
                      help="where models, metrics and the results table go (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisations and sampling (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test version (seconds, no improvement expected)")
    demo.add_argument("--retrain-teacher", action="store_true", help="ignore the cached demo teacher")
    demo.add_argument("--algorithm", choices=["gkd", "minillm"], default="gkd", help="distillation algorithm of phase 3")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bars (they are shown only on a terminal anyway)")
    demo.set_defaults(func=_demo)

    cache = sub.add_parser(
        "cache-teacher", help="score a recipe's reference completions with its teacher once, for teacher_cache",
        description="Writes the teacher's top-k log-probs (teacher_topk, at loss_temperature) with the tail bucket "
                    "and the reference token's log-prob for every training row into teacher_cache (with teachers:, each "
                    "row by its own teacher, at that teacher's topk and temperature); training with "
                    "the same recipe then reads them on off-policy steps instead of running the teacher.")
    cache.add_argument("recipe", help="YAML recipe (teacher, dataset, teacher_topk, teacher_cache)")
    cache.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher_cache=runs/cache")
    cache.set_defaults(func=_cache_teacher)

    srv = sub.add_parser(
        "serve-teacher", help="serve a teacher over HTTP for `teacher: http://host:port` recipes",
        description="Loads MODEL once and scores batches of token ids: per completion position the teacher's "
                    "top-k log-probs with a tail bucket and the log-prob of the token in the sequence. Binds to "
                    "127.0.0.1 unless --host says otherwise; a bearer token is required when the variable named by "
                    "--api-key-env is set.")
    srv.add_argument("model", help="teacher: folder, .gguf file, hub id, builtin:smollm2-135m-instruct, builtin:tiny-teacher")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key-env", default="GKD_TEACHER_API_KEY",
                     help="environment variable holding the bearer token (default GKD_TEACHER_API_KEY; unset: no token)")
    srv.add_argument("--require-api-key", action="store_true", help="refuse to start without a token")
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    srv.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    srv.add_argument("--max-batch-size", type=int, help="sequences per request (default 256)")
    srv.add_argument("--max-sequence-length", type=int, help="tokens per sequence (default 8192, capped by the model)")
    srv.add_argument("--max-batch-tokens", type=int, help="tokens per request (default 262144)")
    srv.add_argument("--chunk-tokens", type=int, help="padded tokens per teacher forward (default 16384)")
    srv.add_argument("--max-body-bytes", type=int, help="request body size, refused while reading (default 16 MiB)")
    srv.add_argument("--max-connections", type=int, help="open connections; more get 503 (default 64)")
    srv.set_defaults(func=_serve_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # DeepSpeed calls torch collectives that torch deprecated; one warning per call buries the log
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # hub retries: our error says it in one line
    for noisy in ("transformers", "accelerate", "torch", "absl", "httpx"):  # absl: rouge-score; httpx: every request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    import os

    import torch

    if not torch.cuda.is_available():  # DeepSpeed otherwise warns on every start that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from gkd.errors import CheckpointError, InputError, TeacherChangedError, TeacherUnavailableError

    try:
        return args.func(args)
    except (InputError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"gkd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TeacherUnavailableError, TeacherChangedError) as e:  # a served teacher's fault: codes of their own
        print(f"gkd {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


def console_main() -> None:
    """Entry point of the ``gkd`` script and ``python -m gkd.cli``.

    After a multi-process run the process group is already torn down, but DeepSpeed keeps its
    communicators alive through reference cycles that the garbage collector cannot break (autograd
    hooks), and gloo's threads racing interpreter teardown can abort a finished run with SIGABRT
    ("terminate called without an active exception"). Everything is written and flushed by then, so
    such a run leaves with ``os._exit`` and skips the teardown.
    """
    code = main()
    if _hard_exit:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
