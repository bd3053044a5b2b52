"""Perplexity through the KV cache, float against int8 (issue #17: within +0.5%), and the KV bytes, in one run.

    python benchmarks/kv_cache.py --ckpt gemma3-270m --text-file /usr/share/common-licenses/GPL-3 --ctx 512 --chunk 32

`gemma-jax perplexity` scores llama.cpp's way (disjoint windows, BOS first, the second half of
each scored) with one full forward, which never reads a cache. Here the same windows go through
the cache as generation does: the first half is prefilled into an empty cache, then the second
half is fed `--chunk` tokens at a time, each chunk attending over the cache (float, or int8 with
per-token-and-head scales) plus itself. The float cache must give the full forward's perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gemma_jax
from gemma_jax.api import load_tokenizer
from gemma_jax.perplexity import score_windows, windows
from gemma_jax.runtime import Runtime


@functools.partial(jax.jit, static_argnames=("runtime", "fresh"))
def _run(params, tokens, positions, cache, *, runtime: Runtime, fresh: bool):
    """Logits [1 T V] and the updated cache for one chunk of a window."""
    return runtime.model().apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache, fresh_cache=fresh)


def cached_nll(model: gemma_jax.Gemma, runtime: Runtime, window: np.ndarray, chunk: int) -> np.ndarray:
    """-log p of the window's tokens half .. ctx-1, predicted by logits that read the cache."""
    ctx, half = len(window), len(window) // 2
    cache = runtime.init_cache(1, ctx)
    tokens, positions = window[None], np.arange(ctx, dtype=np.int32)[None]
    logits, cache = _run(model.params, tokens[:, :half], positions[:, :half], cache, runtime=runtime, fresh=True)
    outs = [logits[:, -1:]]  # predicts token `half`
    for start in range(half, ctx - 1, chunk):
        end = min(start + chunk, ctx - 1)
        logits, cache = _run(model.params, tokens[:, start:end], positions[:, start:end], cache, runtime=runtime, fresh=False)
        outs.append(logits)
    logp = jax.nn.log_softmax(jnp.concatenate(outs, axis=1)[0], axis=-1)  # predictions of tokens half .. ctx-1
    return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(window[half:, None]), axis=-1)[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="gemma3-270m")
    parser.add_argument("--text-file", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=32)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.ckpt)
    text = Path(args.text_file).read_text()
    chunks, scored = windows(tokenizer.encode(text, add_bos=True), args.ctx, None, tokenizer.bos_id)  # as `perplexity`
    model = gemma_jax.load(args.ckpt, dtype="float32")
    full = score_windows(model, chunks, scored)
    rows = [("full forward (no cache)", full.ppl, None)]
    for kv in ("float", "int8"):
        runtime = dataclasses.replace(model.runtime, kv_cache=kv)
        nll = np.concatenate([cached_nll(model, runtime, w, args.chunk)[-scored:] for w in chunks])
        cache = jax.eval_shape(lambda: runtime.init_cache(1, args.ctx))
        per_token = sum(x.size * x.dtype.itemsize for layer in cache.values() for x in layer.values()) / args.ctx
        rows.append((f"through a {kv} cache, chunks of {args.chunk}", float(np.exp(nll.mean())), per_token))
    base = rows[1][1]
    print(f"{len(chunks)} windows of {args.ctx} tokens from {args.text_file}, {args.ckpt}, float32 compute")
    print("| scoring | perplexity | vs float cache | KV bytes per token |")
    print("| --- | ---: | ---: | ---: |")
    for name, ppl, per_token in rows:
        print(f"| {name} | {ppl:.4f} | {ppl / base - 1:+.2%} | {'' if per_token is None else f'{per_token:,.0f}'} |")


if __name__ == "__main__":
    main()
