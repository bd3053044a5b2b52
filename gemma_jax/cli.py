"""The `gemma-jax` command line."""

from __future__ import annotations

import argparse
import resource
import sys
import time

from gemma_jax.tiny import TINY_NAME


def _generate(args: argparse.Namespace) -> None:
    from gemma_jax.api import load

    start = time.perf_counter()
    model = load(args.ckpt, dtype=args.dtype)
    loaded = time.perf_counter()
    first_token_at: list[float] = []

    def stream(row: int, text: str) -> None:
        first_token_at.append(time.perf_counter())
        sys.stdout.write(text)
        sys.stdout.flush()

    [done] = model.complete(
        [args.prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, chat=args.chat, stop=args.stop or (), stream=stream,
    )  # fmt: skip
    end = time.perf_counter()
    first = first_token_at[0] if first_token_at else end
    decode_rate = (len(done.tokens) - 1) / (end - first) if len(done.tokens) > 1 and end > first else 0.0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n[{done.prompt_tokens} prompt tokens, {len(done.tokens)} new tokens ({done.finish_reason}); "
        f"load {loaded - start:.1f}s, first token {first - loaded:.1f}s (incl. compile), "
        f"decode {decode_rate:.1f} tokens/s; peak RSS {peak_mib:.0f} MiB]",
        file=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-jax", description="Gemma models in JAX: generate, convert, fine-tune.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt, streaming it to stdout")
    gen.add_argument("--ckpt", default=TINY_NAME, help=f"checkpoint directory, or '{TINY_NAME}' (random demo model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="parameter dtype")
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        sys.exit(f"gemma-jax {args.command}: error: {err}")


if __name__ == "__main__":
    main()
