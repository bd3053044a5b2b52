"""The `gemma-jax` command line."""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import os
import resource
import sys
import time
from pathlib import Path

from gemma_jax.checkpoint.resolve import GEMMA3_270M
from gemma_jax.tiny import TINY_NAME

CKPT_HELP = (f"HF directory, .gguf file, Hugging Face repo id (e.g. google/gemma-2-2b; HF_HOME, HF_HUB_OFFLINE honoured), "
             f"'{GEMMA3_270M}' (real model, from the gemma3 extra) or '{TINY_NAME}' (random demo)")
DTYPES = ["auto", "bfloat16", "float32"]
DTYPE_HELP = "parameter dtype; auto = float32 on CPU (XLA's bf16 CPU matmuls are slow), else bfloat16"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none (None, an unset flag) or the help says it."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action = copy.copy(action)  # argparse expands no help at all for an option without one
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _shows_default(action) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _shows_default(action: argparse.Action) -> bool:
    return not any(action.default is v for v in (None, False, argparse.SUPPRESS))


class _Parser(argparse.ArgumentParser):
    """The main parser and every subcommand's: defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    return f"gemma-jax {importlib.metadata.version('gemma_jax')} (jax {importlib.metadata.version('jax')})"


def _bounded(kind: type, low: float, high: float | None = None, *, above: bool = False):
    """An argparse `type=` for an int or float in [low, high] (`above`: low excluded), so that a bad
    value fails at parse time with one line naming its argument, before any model loads."""
    if high is not None:
        interval = f"in {'(' if above else '['}{low}, {high}]"
    else:
        interval = f"{'>' if above else '>='} {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text}") from None
        if not ((value > low if above else value >= low) and (high is None or value <= high)):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


POSITIVE = _bounded(int, 1)
TEMPERATURE = _bounded(float, 0)
TOP_P = _bounded(float, 0, 1, above=True)


def _seed():
    from gemma_jax.sampling import SEED_LIMIT  # jax is imported only once a command runs

    return _bounded(int, 0, SEED_LIMIT - 1)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=GEMMA3_270M, help=CKPT_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    parser.add_argument("--mesh", help="device mesh, e.g. 'tensor=8' or 'data=2,fsdp=2,tensor=2' (default: one device)")
    parser.add_argument("--dcn", help="multi-slice: mesh sizes across slices, e.g. 'data=2' (--mesh then sizes one slice)")
    parser.add_argument("--distributed", action="store_true", help="join a multi-host run (TPU pods; see launch/)")
    parser.add_argument("--quant", choices=["w8a8", "w8a16"], help="quantize the weights to int8 on load")
    parser.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's tensors against its checksums")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every program afresh (default: reuse compiled programs from $GEMMA_JAX_CACHE/xla, "
                             "~/.cache/gemma_jax/xla)")  # fmt: skip


def _add_kv_cache_arg(parser: argparse.ArgumentParser) -> None:
    """For the commands that generate (a cache is only read while generating)."""
    parser.add_argument("--kv-cache", default="float", choices=["float", "int8"],
                        help="KV cache dtype: the compute dtype, or int8 with per-token-and-head scales (half the bytes)")


def _add_scan_arg(parser: argparse.ArgumentParser) -> None:
    """For the commands that run a model (Gemma 1/2/3 scan; other families run unrolled)."""
    parser.add_argument("--scan", action="store_true",
                        help="run the layers as one scan: compile time independent of depth, same outputs "
                             "(on CPU each decode step is slower)")  # fmt: skip


def _add_paging_args(parser: argparse.ArgumentParser) -> None:
    """For the commands that run the engine (infer, serve): the paged KV cache's budget and page size."""
    parser.add_argument("--kv-tokens", type=POSITIVE,
                        help="paged KV cache: tokens per global layer shared by all rows through pages (default: one "
                             "full-length sequence per row, the memory of a dense cache); with more rows than it holds at "
                             "full length, short requests run side by side")  # fmt: skip
    parser.add_argument("--page-size", type=POSITIVE, default=32, help="tokens per KV cache page")


def _load_model(args: argparse.Namespace):
    """Join the process group if asked, build the mesh, load the checkpoint onto it."""
    import jax

    from gemma_jax import distributed
    from gemma_jax.api import load
    from gemma_jax.compile_cache import enable_compile_cache
    from gemma_jax.sharding import make_mesh

    distributed.initialize(force=args.distributed)
    if not args.no_compile_cache:
        enable_compile_cache()
    dtype = ("float32" if jax.default_backend() == "cpu" else "bfloat16") if args.dtype == "auto" else args.dtype
    mesh = None if args.mesh is None and args.dcn is None else make_mesh(args.mesh, dcn=args.dcn)
    return load(args.ckpt, dtype=dtype, mesh=mesh, quant=args.quant, verify=not args.no_verify,
                kv_cache=getattr(args, "kv_cache", "float"), scan=getattr(args, "scan", False))  # fmt: skip


def _add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=max_new_tokens)
    parser.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=POSITIVE)
    parser.add_argument("--top-p", type=TOP_P)
    parser.add_argument("--seed", type=_seed(), default=0)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    """`Gemma.complete` options from `_add_sampling_args`'s arguments."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, stop=args.stop or ())  # fmt: skip


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt: --prompt TEXT, or the text of --prompt-file PATH, where "-" (either flag) reads stdin;
    trailing newlines (an editor's, or echo's) are not part of a read prompt."""
    source = args.prompt_file if args.prompt_file is not None else "-" if args.prompt == "-" else None
    if source is None:
        return args.prompt
    if source == "-":
        return sys.stdin.read().rstrip("\n")
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {source}: no such file")
    return path.read_text(encoding="utf-8").rstrip("\n")


def _hint_if_base(args: argparse.Namespace) -> None:
    from gemma_jax.chat import base_model_hint

    hint = base_model_hint(str(args.ckpt))
    if hint:
        print(f"gemma-jax {args.command}: note: {hint}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    from gemma_jax import distributed

    prompt = _read_prompt(args)
    start = time.perf_counter()
    model = _load_model(args)
    leader = distributed.is_leader()
    prompt = distributed.text_from_leader(prompt)  # only process 0 has the terminal's stdin
    if args.chat and leader:
        _hint_if_base(args)
    loaded = time.perf_counter()
    first_token_at: list[float] = []

    def stream(row: int, text: str) -> None:
        first_token_at.append(time.perf_counter())
        if leader:
            sys.stdout.write(text)
            sys.stdout.flush()

    [done] = model.complete([prompt], chat=args.chat, stream=stream, **_sampling(args))
    end = time.perf_counter()
    first = first_token_at[0] if first_token_at else end
    decode_rate = (len(done.tokens) - 1) / (end - first) if len(done.tokens) > 1 and end > first else 0.0
    if leader:
        print(
            f"\n[{done.prompt_tokens} prompt tokens, {len(done.tokens)} new tokens ({done.finish_reason}); "
            f"load {loaded - start:.1f}s, first token {first - loaded:.1f}s (incl. compile), "
            f"decode {decode_rate:.1f} tokens/s; peak RSS {_peak_rss_mib():.0f} MiB]",
            file=sys.stderr,
        )


def _chat(args: argparse.Namespace) -> None:
    from gemma_jax.chat import run_chat

    model = _load_model(args)
    if model.tokenizer is None:
        raise ValueError(f"{args.ckpt}: chat needs a checkpoint with a tokenizer")
    _hint_if_base(args)
    run_chat(model, system=args.system, **_sampling(args))


def _perplexity(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from gemma_jax import distributed
    from gemma_jax.api import load_tokenizer
    from gemma_jax.perplexity import score_windows, windows

    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{args.text_file}: cannot read the text: {getattr(err, 'strerror', None) or err}") from None
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.ckpt)  # the text is checked before the weights load
    if tokenizer is None:
        raise ValueError(f"{args.ckpt}: perplexity needs a checkpoint with a tokenizer")
    chunks, scored = windows(tokenizer.encode(text, add_bos=True), args.ctx, args.stride, tokenizer.bos_id)
    model = _load_model(args)
    bar = tqdm(desc="perplexity", unit="window", disable=not distributed.is_leader())

    def progress(done: int, total: int, running: float) -> None:
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix(ppl=f"{running:.4f}")

    result = score_windows(model, chunks, scored, batch=args.batch, progress=progress)
    bar.close()
    seconds = time.perf_counter() - start
    if distributed.is_leader():
        print(
            f"PPL = {result.ppl:.4f} +/- {result.error:.5f} over {result.tokens_scored} scored tokens "
            f"({result.windows} windows of {args.ctx}); {seconds:.1f}s, "
            f"{result.windows * args.ctx / seconds:.0f} tokens/s, peak RSS {_peak_rss_mib():.0f} MiB"
        )


def _infer(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from gemma_jax import distributed
    from gemma_jax.infer import run_job

    start = time.perf_counter()
    model = _load_model(args)
    leader = distributed.is_leader()
    if model.tokenizer is None:
        raise ValueError(f"{args.ckpt}: infer needs a checkpoint with a tokenizer")
    bar, tokens = None, [0]

    def on_start(total: int) -> None:  # the bar appears once the job's checks passed: a failed one prints only its error
        nonlocal bar
        bar = tqdm(total=total, desc="infer", unit="prompt", disable=not leader)

    def on_result(result) -> None:
        tokens[0] += len(result.tokens)
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens[0] / (time.perf_counter() - start):.1f}")

    summary = run_job(
        model, Path(args.input), Path(args.output), slots=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, strict=args.strict, write=leader,
        on_start=on_start, on_result=on_result, page_size=args.page_size, kv_tokens=args.kv_tokens,
    )  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - start
    if leader:
        print(
            f"{summary.done} prompts done, {summary.skipped} already in {args.output}, {summary.rejected} bad lines; "
            f"{summary.completion_tokens} new tokens in {seconds:.1f}s ({summary.completion_tokens / seconds:.1f} tokens/s); "
            f"peak RSS {_peak_rss_mib():.0f} MiB",
            file=sys.stderr,
        )


def _classify(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from gemma_jax import distributed
    from gemma_jax.classify_job import run_classify_job

    start = time.perf_counter()
    model = _load_model(args)
    leader = distributed.is_leader()
    bar = None

    def on_start(total: int) -> None:  # the bar appears once the job's checks passed, as infer's
        nonlocal bar
        bar = tqdm(total=total, desc="classify", unit="line", disable=not leader)

    summary = run_classify_job(model, Path(args.input), Path(args.output), batch_size=args.batch_size, strict=args.strict,
                               write=leader, on_start=on_start, on_batch=lambda n: bar.update(n))  # fmt: skip
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if leader:
        print(
            f"{summary.done} lines classified, {summary.skipped} already in {args.output}, {summary.rejected} bad lines; "
            f"{summary.tokens} tokens in {seconds:.1f}s ({summary.done / seconds:.1f} lines/s); peak RSS {_peak_rss_mib():.0f} MiB",
            file=sys.stderr,
        )


def _serve(args: argparse.Namespace) -> None:
    from gemma_jax.serve.server import serve

    model = _load_model(args)
    serve(model, model_name=args.served_model_name or Path(args.ckpt).name, host=args.host, port=args.port,
          slots=args.batch_size, max_len=args.max_len, max_queue=args.max_queue, api_key=args.api_key,
          shutdown_timeout=args.shutdown_timeout, page_size=args.page_size, kv_tokens=args.kv_tokens)  # fmt: skip


def _convert(args: argparse.Namespace) -> None:
    from gemma_jax.convert import run

    run(args)


def _quantize(args: argparse.Namespace) -> None:
    from gemma_jax.convert import host_only
    from gemma_jax.quantize import quantize_checkpoint

    host_only()
    quantize_checkpoint(args.src, args.dst, scheme=args.scheme, dtype=args.dtype, calibration=args.calibration,
                        calibration_tokens=args.calibration_tokens, ctx=args.ctx, force=args.force, quiet=args.quiet)  # fmt: skip


def _verify(args: argparse.Namespace) -> None:
    from gemma_jax.convert import host_only
    from gemma_jax.verify import verify

    host_only()
    print(verify(args.ckpt))


def _finetune(args: argparse.Namespace) -> None:
    from gemma_jax.train.cli import run

    run(args)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plan(args: argparse.Namespace) -> None:
    from gemma_jax.models import preset
    from gemma_jax.plan import format_plan, plan
    from gemma_jax.sharding import parse_mesh_spec

    sizes = {k: int(v) for k, _, v in (part.partition("=") for part in args.mesh.split(",")) if v.lstrip("-").isdigit()}
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"--mesh {args.mesh!r}: give every axis an explicit positive size")
    sizes = parse_mesh_spec(args.mesh, math.prod(sizes.values()))
    quant = "w8a16" if args.quant == "int8" else args.quant
    result = plan(preset(args.model), sizes, chip=args.chip, batch=args.batch, seq=args.seq, quant=quant, kv_cache=args.kv_cache,
                  page_size=args.page_size, kv_tokens=args.kv_tokens)  # fmt: skip
    print(format_plan(result))


def build_parser() -> argparse.ArgumentParser:
    from gemma_jax.perplexity import MIN_CTX

    parser = _Parser(prog="gemma-jax", description="Gemma models in JAX: generate, chat, convert, fine-tune.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate text from a prompt, streaming it to stdout")
    _add_model_args(gen)
    _add_scan_arg(gen)
    _add_kv_cache_arg(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text; '-' reads it from stdin")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 file ('-': stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    _add_sampling_args(gen, max_new_tokens=64)
    gen.set_defaults(run=_generate)

    ch = commands.add_parser("chat", help="interactive chat: keeps the conversation, streams each reply (needs an -it model)")
    _add_model_args(ch)
    _add_scan_arg(ch)
    _add_kv_cache_arg(ch)
    ch.add_argument("--system", help="a system message, sent before the first user turn")
    _add_sampling_args(ch, max_new_tokens=512)
    ch.set_defaults(run=_chat)

    inf = commands.add_parser("infer", help="batched JSONL generation with continuous batching; restartable")
    _add_model_args(inf)
    _add_kv_cache_arg(inf)
    inf.add_argument("--input", required=True, help='JSONL: {"id", "prompt"} or {"id", "messages"} per line')
    inf.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    inf.add_argument("--batch-size", type=POSITIVE, default=8, help="decode slots")
    _add_paging_args(inf)
    _add_scan_arg(inf)
    inf.add_argument("--max-new-tokens", type=POSITIVE, default=256)
    inf.add_argument("--temperature", type=TEMPERATURE, default=0.0)
    inf.add_argument("--top-p", type=TOP_P)
    inf.add_argument("--seed", type=_seed(), default=0)
    inf.add_argument("--strict", action="store_true", help="bad input lines are fatal (before any generation)")
    inf.set_defaults(run=_infer)

    cls = commands.add_parser("classify", help="JSONL classification with a sequence or token classifier checkpoint; restartable")
    _add_model_args(cls)
    _add_scan_arg(cls)
    cls.add_argument("--input", required=True, help='JSONL: {"id", "text"} or {"id", "ids": [token ids]} per line')
    cls.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    cls.add_argument("--batch-size", type=POSITIVE, default=16, help="lines per forward pass")
    cls.add_argument("--strict", action="store_true", help="bad input lines are fatal (before any classification)")
    cls.set_defaults(run=_classify)

    srv = commands.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching")
    _add_model_args(srv)
    _add_kv_cache_arg(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--batch-size", type=int, default=8, help="decode slots shared by all requests")
    srv.add_argument("--max-len", type=int, help="tokens per slot, prompt + completion (default: the context, at most 4096)")
    srv.add_argument("--max-queue", type=int, default=64, help="completions waiting for a slot before new requests get 429")
    _add_paging_args(srv)
    _add_scan_arg(srv)
    srv.add_argument("--api-key", default=os.environ.get("GEMMA_JAX_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $GEMMA_JAX_API_KEY)")  # fmt: skip
    srv.add_argument("--served-model-name", help="model id in /v1/models and responses (default: the --ckpt name)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish on SIGTERM")
    srv.set_defaults(run=_serve)

    ppl = commands.add_parser("perplexity", help="perplexity of a text file, measured as llama.cpp's llama-perplexity does")
    _add_model_args(ppl)
    _add_scan_arg(ppl)
    ppl.add_argument("--text-file", required=True)
    ppl.add_argument("--ctx", type=_bounded(int, MIN_CTX), default=512, help="tokens per window (llama.cpp -c)")
    ppl.add_argument("--stride", type=POSITIVE, help="sliding windows every N tokens, scoring the last N (default: llama.cpp chunks)")
    ppl.add_argument("--batch", type=POSITIVE, default=1, help="windows per forward pass")
    ppl.set_defaults(run=_perplexity)

    from gemma_jax.convert import add_arguments as add_convert_arguments
    from gemma_jax.train.cli import add_arguments as add_finetune_arguments

    cv = commands.add_parser("convert", help="convert checkpoints: HF, Orbax, GGUF, compressed-tensors int8 (Google/Kaggle Flax in), streamed")
    add_convert_arguments(cv)
    cv.set_defaults(run=_convert)

    qz = commands.add_parser("quantize", help="write an int8 (W8A8 / W8A16) Orbax checkpoint, about half the bf16 size")
    qz.add_argument("src", help=f"float checkpoint in any format convert reads, or a name ({CKPT_HELP})")
    qz.add_argument("dst", help="Orbax checkpoint directory to write (must not exist, unless --force)")
    qz.add_argument("--scheme", required=True, choices=["w8a8", "w8a16"], help="int8 weights + int8 (w8a8) or float activations")
    qz.add_argument("--calibration", help="w8a8: a text file of representative text for SmoothQuant (recommended: "
                                          "on Gemma 3 270M it cut W8A8's perplexity loss from +2.9%% to +0.8%%)")  # fmt: skip
    qz.add_argument("--calibration-tokens", type=int, default=1024, help="tokens of --calibration to measure")
    qz.add_argument("--ctx", type=int, default=512, help="tokens per calibration row")
    qz.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the float leaves (norms)")
    qz.add_argument("--force", action="store_true", help="replace an existing DST (atomically)")
    qz.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    qz.set_defaults(run=_quantize)

    vf = commands.add_parser("verify", help="check a checkpoint's tensors against its checksums (Orbax; others: structure only)")
    vf.add_argument("ckpt", help="checkpoint in any format convert reads, or a name")
    vf.set_defaults(run=_verify)

    ft = commands.add_parser("finetune", help="fine-tune (full or LoRA), sharded, resumable; chat or plain-text JSONL")
    add_finetune_arguments(ft)
    ft.set_defaults(run=_finetune)

    pl = commands.add_parser("plan", help="per-device memory and roofline speed of a model on a slice, before booking it")
    pl.add_argument("--model", required=True, help="model preset, e.g. gemma2-27b (configs/models/*.yaml)")
    pl.add_argument("--mesh", required=True, help="mesh sizes, e.g. 'tensor=8' or 'data=2,fsdp=2,tensor=2'")
    pl.add_argument("--chip", required=True, help="v4, v5e, v5p, v6e or h100")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--seq", type=int, default=8192, help="tokens per sequence (prompt + generated)")
    _add_paging_args(pl)
    pl.add_argument("--quant", choices=["int8", "w8a16", "w8a8"], help="int8 = w8a16 (weight-only)")
    pl.add_argument("--kv-cache", default="float", choices=["float", "int8"], help="KV cache dtype (int8: half the bytes)")
    pl.set_defaults(run=_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        sys.exit(f"gemma-jax {args.command}: error: {err}")


if __name__ == "__main__":
    main()
