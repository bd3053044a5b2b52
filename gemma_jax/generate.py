"""Batched autoregressive generation: one compiled program per shape bucket.

Prefill and the whole decode loop (`lax.while_loop`) are a single `jax.jit` program keyed on
(batch bucket, prompt-length bucket, new-token bucket, sampler), so generating never retraces
per token and prompts of nearby lengths share a compilation. Prompts are right-padded; every
row keeps its own positions, so a row's tokens do not depend on the rest of the batch.

Host code can watch tokens as they are produced (streaming, stop strings) through an
`io_callback` that also returns which rows to stop.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from gemma_jax.config import GemmaConfig
from gemma_jax.model import Transformer, init_cache
from gemma_jax.sampling import Sampler
from sharding import Layout, activate, constrain, to_host

# (tokens [B] int32, emitted [B] bool) -> rows to stop [B] bool. Called once per generated step.
TokenCallback = Callable[[np.ndarray, np.ndarray], np.ndarray]
_MAX_STOP_IDS = 8
_callbacks: dict[int, TokenCallback] = {}
_handles = itertools.count()


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    finish_reasons: list[str]  # "stop" (stop token or stop string) or "length"


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two so that nearby shapes share one compilation."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def generate(
    config: GemmaConfig,
    params: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    dtype: Any = jnp.float32,
    on_tokens: TokenCallback | None = None,
    layout: Layout | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt (lists of token ids).

    With a `layout`, params must already be placed on its mesh; the cache and activations
    are sharded by its rules, and the batch is padded to a multiple of its data axes.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    longest = max(map(len, prompts))
    if longest >= config.max_position:
        raise ValueError(f"prompt of {longest} tokens does not fit the context of {config.max_position} tokens")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if len(stop_ids) > _MAX_STOP_IDS:
        raise ValueError(f"at most {_MAX_STOP_IDS} stop token ids are supported, got {len(stop_ids)}")
    max_new = min(max_new_tokens, config.max_position - longest)

    batch, length, new = bucket(len(prompts), 1), bucket(longest), bucket(max_new)
    if layout is not None:  # the batch must split evenly over the data-parallel axes
        data = layout.mesh.shape["data"] * layout.mesh.shape["fsdp"]
        batch = -(-batch // data) * data
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones(batch, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
        lengths[row] = len(prompt)
    done = np.arange(batch) >= len(prompts)  # bucket padding rows never run
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(batch))
    stops = np.full(_MAX_STOP_IDS, -1, np.int32)
    stops[: len(stop_ids)] = stop_ids

    handle = next(_handles)
    if on_tokens is not None:
        _callbacks[handle] = lambda tok, emitted: on_tokens(tok[: len(prompts)], emitted[: len(prompts)])
    try:
        out, stopped = _generate(
            params, tokens, lengths, keys, np.int32(max_new), np.float32(temperature), np.float32(top_p),
            stops, done, np.int32(handle),
            config=config, dtype=dtype, sampler=sampler, cache_len=length + new, out_len=new,
            streaming=on_tokens is not None, layout=layout,
        )  # fmt: skip
        out, stopped = to_host(out), to_host(stopped)
    finally:
        _callbacks.pop(handle, None)
    rows = range(len(prompts))
    return Generation([out[r][out[r] >= 0].tolist() for r in rows], ["stop" if stopped[r] else "length" for r in rows])


def _host_callback(handle: np.ndarray, tokens: np.ndarray, emitted: np.ndarray) -> np.ndarray:
    return np.asarray(_callbacks[int(handle)](tokens, emitted), dtype=bool)


_STATIC = ("config", "dtype", "sampler", "cache_len", "out_len", "streaming", "layout")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(*args, layout: Layout | None, **static):
    """Prefill, then decode until every row stopped or `max_new` tokens. Returns (tokens [B out_len], stopped [B])."""
    with activate(layout):
        out, done = _prefill_and_decode(*args, **static)
        return constrain(out, (None, None)), constrain(done, (None,))  # replicated: every host reads all


def _prefill_and_decode(
    params, tokens, lengths, keys, max_new, temperature, top_p, stop_ids, done, handle,
    *, config: GemmaConfig, dtype: Any, sampler: Sampler, cache_len: int, out_len: int, streaming: bool,
):  # fmt: skip
    model = Transformer(config, dtype)
    forward = lambda *args: model.apply({"params": params}, *args)
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    cache = init_cache(config, batch, cache_len, dtype)
    logits, cache = forward(tokens, positions, segments, cache, lengths - 1)

    def choose(logits, step):
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        return sampler(logits, step_keys, temperature, top_p)

    def record(tok, step, done, out):
        is_stop = jnp.isin(tok, stop_ids)
        emitted = ~done & ~is_stop
        out = out.at[:, step].set(jnp.where(emitted, tok, -1))
        stopped = done | is_stop
        if streaming:
            shape = jax.ShapeDtypeStruct(done.shape, jnp.bool_)
            stopped |= io_callback(_host_callback, shape, handle, tok, emitted, ordered=True)
        return stopped, out

    def body(state):
        step, tok, cache, done, out = state
        ones = jnp.ones((batch, 1), jnp.int32)
        logits, cache = forward(tok[:, None], (lengths + step - 1)[:, None], ones, cache, jnp.zeros(batch, jnp.int32))
        tok = choose(logits, step)
        done, out = record(tok, step, done, out)
        return step + 1, tok, cache, done, out

    tok = choose(logits, 0)
    out = jnp.full((batch, out_len), -1, jnp.int32)
    done, out = record(tok, 0, done, out)
    cond = lambda state: (state[0] < max_new) & ~jnp.all(state[3])
    _, _, _, done, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, done, out))
    return out, done
