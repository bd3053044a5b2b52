"""Decode that reads only filled blocks, and the engine's paged KV cache (issue #17), side by side in one run.

    PYTHONPATH=. python benchmarks/paged.py --ckpt gemma3-270m

1. Decode step time (batch --batch, one new token, float32, the jitted model call on a dense cache)
   with 128 tokens filled, in a cache of 256 and of 8192 slots; and, for contrast, the 8192 cache
   read whole as one block (what every step did before: attention over all slots, filled or not).
   Target: 8192 within 1.5x of 256.
2. Concurrency at a fixed KV budget: --short requests of 64 prompt tokens and --long requests of
   4096, --new-tokens each, greedy, through the engine with the dense per-slot memory model (each
   slot reserves max_len tokens: budget // max_len slots) and with pages (budget in pages shared by
   --slots rows). Reports the most sequences running at once and whether every request's tokens are
   identical. Target: >= 4x. The model is a random one of --ckpt's shape cut to --layers layers
   (the memory accounting does not depend on the weights; prefilling 4096-token prompts through the
   full 270M takes minutes on two CPU cores), or the real checkpoint with --layers 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma_jax
from gemma_jax.engine import Engine, Request
from gemma_jax.models import init_params
from gemma_jax.models import kv_cache
from gemma_jax.runtime import Runtime
from gemma_jax.sampling import Sampler


@functools.partial(jax.jit, static_argnames=("runtime", "fresh"), donate_argnames=("cache",))
def _step(params, tokens, positions, cache, *, runtime: Runtime, fresh: bool):
    logits, cache = runtime.model().apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache, fresh_cache=fresh)
    return logits, cache


def step_time(model, batch: int, filled: int, cache_len: int, repeats: int) -> float:
    """Best seconds of one decode step at position `filled` after a prefill of `filled` tokens."""
    runtime = model.runtime
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, model.config.vocab_size, (batch, filled + 1)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(filled + 1, dtype=jnp.int32), tokens.shape)
    _, cache = _step(model.params, tokens[:, :filled], positions[:, :filled], runtime.init_cache(batch, cache_len), runtime=runtime, fresh=True)
    best = float("inf")
    for i in range(repeats + 1):  # the first call compiles; each call rewrites the same slot (the cache is donated)
        start = time.perf_counter()
        _, cache = jax.block_until_ready(_step(model.params, tokens[:, filled:], positions[:, filled:], cache, runtime=runtime, fresh=False))
        best = best if i == 0 else min(best, time.perf_counter() - start)
    return best


def concurrency(model, requests: list[Request], *, slots: int, max_len: int, kv_tokens: int, page_size: int):
    """(most sequences running at once, {id: tokens}) for `requests` through one engine."""
    engine = Engine(model, slots=slots, max_len=max_len, sampler=Sampler.create(0.0, None, None), page_size=page_size,
                    kv_tokens=kv_tokens)  # fmt: skip
    most, out = 0, {}
    queue = list(requests)
    while queue or engine.running:
        admitted = engine.fit(queue)
        outputs = engine.admit(queue[:admitted])
        del queue[:admitted]
        most = max(most, engine.running)
        for o in outputs + (engine.step() if engine.running else []):
            out.setdefault(o.request.id, []).extend(o.tokens)
    return most, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="gemma3-270m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=2, help="concurrency part: layers of the random model (0: the real one)")
    parser.add_argument("--short", type=int, default=30)
    parser.add_argument("--long", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=32)
    args = parser.parse_args()
    model = gemma_jax.load(args.ckpt, dtype="float32")

    rows = [(f"cache {n}, {'one block of all slots' if whole else 'filled blocks'}", n, whole)
            for n, whole in ((256, False), (8192, False), (8192, True))]  # fmt: skip
    times = {}
    for name, n, whole in rows:
        kv_cache.DECODE_BLOCK = n if whole else 256
        times[name] = step_time(model, args.batch, 128, n, args.repeats)
    kv_cache.DECODE_BLOCK = 256
    base = times[rows[0][0]]
    print(f"## decode step, {args.ckpt}, batch {args.batch}, 128 tokens filled, float32 (best of {args.repeats})")
    print("| cache | step ms | vs cache 256 |\n| --- | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.2f} | {t / base:.2f}x |")

    config = model.config if args.layers == 0 else dataclasses.replace(model.config, num_layers=args.layers)
    small = model if args.layers == 0 else gemma_jax.Gemma(config, init_params(config, jax.random.PRNGKey(0)), compute_dtype="float32")
    rng = np.random.RandomState(1)
    lengths = [4096] * args.long + [64] * args.short
    order = rng.permutation(len(lengths))
    requests = [Request(f"r{i}", rng.randint(3, config.vocab_size, lengths[i]).tolist(), args.new_tokens) for i in order]
    max_len = 4096 + args.new_tokens
    budget = 2 * max_len  # KV tokens per global layer: two dense slots' worth
    dense_slots = budget // max_len
    dense = concurrency(small, requests, slots=dense_slots, max_len=max_len, kv_tokens=budget, page_size=max_len)
    paged = concurrency(small, requests, slots=args.slots, max_len=max_len, kv_tokens=budget, page_size=args.page_size)
    same = dense[1] == paged[1]
    print(f"\n## concurrency, KV budget {budget} tokens per global layer, {args.long} requests of 4096 + {args.short} of 64 "
          f"prompt tokens, {args.new_tokens} new each, {config.num_layers} layers")  # fmt: skip
    print("| cache | slots | page | most running at once | vs dense |\n| --- | ---: | ---: | ---: | ---: |")
    print(f"| dense per slot (max_len {max_len} reserved) | {dense_slots} | {max_len} | {dense[0]} | 1.00x |")
    print(f"| paged | {args.slots} | {args.page_size} | {paged[0]} | {paged[0] / dense[0]:.2f}x |")
    print(f"identical tokens for all {len(requests)} requests: {same}")


if __name__ == "__main__":
    main()
