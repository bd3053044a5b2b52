"""Command line of `gemma-jax finetune` (also `python -m gemma_jax.train`).

    gemma-jax finetune --ckpt SRC --data train.jsonl [--eval-data eval.jsonl] --out RUN_DIR [--steps N]
        [--mesh fsdp=8] [--lora-rank R] [--config NAME|FILE.yaml] [--resume] [KEY=VALUE ...]

Settings come from the TrainConfig defaults, then `--config`, then the flags, then KEY=VALUE
overrides (any TrainConfig field, e.g. `learning_rate=2e-4 grad_accum=4 remat=block`), which may
stand anywhere on the line; `--help` lists them all.
"""

from __future__ import annotations

import argparse
import functools

from gemma_jax.train.config import load_train_config, parse_overrides, settings_help

# Flags that map straight onto TrainConfig fields (None: not given, so lower layers decide).
_FIELD_FLAGS = ("ckpt", "data", "eval_data", "out", "steps", "mesh", "dcn", "lora_rank", "task")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--ckpt", help="source checkpoint: HF directory, .gguf file, or a name gemma_jax.load knows")
    parser.add_argument("--data", help='training JSONL: {"text": ...} or {"messages": [{"role", "content"}, ...]} per line')
    parser.add_argument("--eval-data", help="evaluation JSONL (same format): loss and perplexity every eval_every steps")
    parser.add_argument("--out", help="RUN_DIR: checkpoints, metrics.jsonl, export/")
    parser.add_argument("--task", help="causal-lm, sequence-classification or token-classification: a classifier on a causal "
                        "LM gets a new head labelled from --data, and evaluation logs accuracy and F1 (default: the checkpoint's task)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--mesh", help="device mesh, e.g. 'fsdp=8' or 'data=2,fsdp=4' (default: every device on fsdp)")
    parser.add_argument("--dcn", help="multi-slice: mesh sizes across slices, e.g. 'data=2' (--mesh then sizes one slice)")
    parser.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters on a frozen base (0: full fine-tuning); "
                        "the learning rate then defaults to LoRA's 2e-4")
    parser.add_argument("--config", help="a shipped config (configs/finetune/NAME.yaml) or a YAML file")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint (fresh start if none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    parser.add_argument("--distributed", action="store_true", help="join a multi-host run (TPU pods; see launch/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="any setting listed below, e.g. learning_rate=2e-4 (anywhere on the line)"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "settings (KEY=VALUE, or in a --config YAML; a flag sets the setting of its name):\n" + settings_help()
    # argparse fills a positional list from one run of arguments only; a KEY=VALUE after an option
    # would be "unrecognized". This parser may be a subcommand's, parsed by its parent's
    # parse_args, so the stray KEY=VALUEs are gathered where argparse hands them back.
    parser.parse_known_args = functools.partial(_gather_overrides, parser, parser.parse_known_args)
    return parser


def _gather_overrides(parser: argparse.ArgumentParser, parse_known_args, args=None, namespace=None):
    """parse_known_args, with KEY=VALUE arguments after the first options added to `overrides`."""
    namespace, extras = parse_known_args(args, namespace)
    stray = [a for a in extras if "=" in a and not a.startswith(tuple(parser.prefix_chars))]
    namespace.overrides = [*(namespace.overrides or []), *stray]
    return namespace, [a for a in extras if a not in stray]


def run(args: argparse.Namespace) -> None:
    """Run the fine-tuning the parsed arguments describe; report how it ended on stdout (leader)."""
    from gemma_jax import distributed
    from gemma_jax.train.run import finetune

    distributed.initialize(force=args.distributed)
    flags = {name: getattr(args, name) for name in _FIELD_FLAGS if getattr(args, name) is not None}
    cfg = load_train_config(args.config, {**flags, **parse_overrides(args.overrides)})
    result = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    if distributed.is_leader():
        how = "preempted (SIGTERM): checkpoint saved" if result.preempted else "done"
        exported = ", ".join(f"{name} {path}" for name, path in result.export.items())
        print(f"finetune {how} at step {result.step}/{cfg.steps}" + (f"; exported {exported}" if exported else ""))


def main(argv: list[str] | None = None) -> None:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m gemma_jax.train", description="Fine-tune a Gemma model."))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"finetune: error: {err}\n")
