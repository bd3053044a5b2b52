"""Batched autoregressive generation: compiled prefill plus a compiled decode loop.

Two `jax.jit` programs per shape bucket (batch, prompt length, new tokens, sampler): `_prefill`
fills the KV cache and samples each row's first token; `_decode` runs a `lax.while_loop` of
decode steps. Each row's first token is emitted by the prefill itself, so a stream shows it
before the decode program even runs (time to first token = one prefill). Nothing retraces per
token. Prompts are right-padded and each row keeps its own positions, step counter and PRNG
stream, so a row's tokens do not depend on the rest of the batch.

Without a host callback, one `_decode` call runs to the end. With one (streaming, stop
strings), `_decode` runs in chunks of `chunk` steps and the host reads the new tokens between
chunks and may stop rows. This keeps host round-trips out of the compiled loop, which matters
on sharded meshes and multi-host pods, and is the step a continuous-batching engine reuses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.compile_cache import cached_program
from gemma_jax.models import Config, family_of
from gemma_jax.runtime import Runtime
from gemma_jax.sampling import Sampler, check_seed
from gemma_jax.sharding import Layout, to_host

# New tokens [B, n] (-1 where a row emitted nothing) -> rows to stop [B] bool.
TokenCallback = Callable[[np.ndarray], np.ndarray]
_MAX_STOP_IDS = 8


class DecodeState(NamedTuple):
    cache: dict  # the family's KV cache (see models.init_cache)
    token: jax.Array  # [B] the last token emitted (or the stop token that ended the row), not yet in the cache
    position: jax.Array  # [B] position of `token`
    count: jax.Array  # [B] tokens emitted so far
    done: jax.Array  # [B] finished: stop token, host stop, or length limit
    stopped: jax.Array  # [B] finished by a stop token or the host (not by length)
    keys: jax.Array  # [B, 2] per-row PRNG keys


try:  # kept programs (compile_cache) hold DecodeState trees
    jax.export.register_namedtuple_serialization(DecodeState, serialized_name="gemma_jax.DecodeState")
except ValueError:  # this module imported again in the same interpreter: its first class keeps the name
    pass


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    finish_reasons: list[str]  # "stop" (stop token or stop string) or "length"


def sampling_args(temperature: float, top_p: float, stop_ids: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The traced sampling inputs of `_prefill`/`_decode`; stop ids padded to a fixed size (one compilation)."""
    if len(stop_ids) > _MAX_STOP_IDS:
        raise ValueError(f"at most {_MAX_STOP_IDS} stop token ids are supported, got {len(stop_ids)}")
    stops = np.full(_MAX_STOP_IDS, -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    return dict(temperature=np.float32(temperature), top_p=np.float32(top_p), stop_ids=stops)


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two so that nearby shapes share one compilation."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def check_max_new_tokens(max_new_tokens: int) -> int:
    """The limit, if it is a positive integer (zero would finish every request empty, at once)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return max_new_tokens


def generate(
    config: Config,
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
    chunk: int = 8,
    layout: Layout | None = None,
    quant: str | None = None,
    runtime: Runtime | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt (lists of token ids).

    `on_tokens` sees every `chunk` steps' new tokens and returns rows to stop. With a `layout`,
    params must already be on its mesh; cache and activations are sharded by its rules and
    the batch is padded to a multiple of its data-parallel axes. `runtime` (default: from
    config, dtype, layout and quant with the platform's kernels) is what the programs compile for.
    """
    runtime = runtime or Runtime.create(config, dtype, layout=layout, quant=quant)
    layout = runtime.layout
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    longest = max(map(len, prompts))
    if longest >= config.max_position:
        raise ValueError(f"prompt of {longest} tokens does not fit the context of {config.max_position} tokens")
    max_new = min(check_max_new_tokens(max_new_tokens), config.max_position - longest)

    batch, length, new = bucket(len(prompts), 1), bucket(longest), bucket(max_new)
    if layout is not None:  # the batch must split evenly over the data-parallel axes
        batch = -(-batch // layout.divisor("act_batch")) * layout.divisor("act_batch")
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones(batch, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
        lengths[row] = len(prompt)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(check_seed(seed)), jnp.arange(batch))
    limits = np.where(np.arange(batch) < len(prompts), max_new, 0).astype(np.int32)  # padding rows: done at once
    sampling = sampling_args(temperature, top_p, stop_ids)
    static = dict(runtime=runtime, sampler=sampler)

    state, out = _prefill(params, tokens, lengths, keys, limits, sampling, cache_len=length + new, **static)
    outputs, host_stop = [], np.zeros(batch, bool)
    while True:
        out = to_host(out)
        outputs.append(out)
        if on_tokens is not None:
            host_stop[: len(prompts)] |= np.asarray(on_tokens(out[: len(prompts)]), bool)
        if np.all(to_host(state.done) | host_stop) or (on_tokens is None and len(outputs) == 2):
            break
        state, out = _decode(params, state, limits, host_stop, sampling, out_len=new if on_tokens is None else chunk, **static)
    out, stopped = np.concatenate(outputs, axis=1), to_host(state.stopped) | host_stop
    rows = range(len(prompts))
    return Generation([out[r][out[r] >= 0].tolist() for r in rows], ["stop" if stopped[r] else "length" for r in rows])


_STATIC = ("runtime", "sampler")


def _sample(runtime: Runtime, sampler: Sampler, logits, keys, count, sampling) -> jax.Array:
    step_keys = jax.vmap(jax.random.fold_in)(keys, count)  # per-row stream: batch-independent
    return sampler(logits, step_keys, sampling, blockwise=runtime.kernels.cpu_unsharded)


def _emit(state: DecodeState, out: jax.Array, i, limits, stop_ids) -> tuple[DecodeState, jax.Array]:
    """Column i of `out` gets each live row's sampled token (-1: none); a stop token or the length limit ends the row."""
    is_stop = jnp.isin(state.token, stop_ids)
    emitted = ~state.done & ~is_stop
    out = out.at[:, i].set(jnp.where(emitted, state.token, -1))
    count = state.count + emitted
    stopped = state.stopped | (~state.done & is_stop)
    return state._replace(count=count, stopped=stopped, done=state.done | is_stop | (count >= limits)), out


@cached_program
@functools.partial(jax.jit, static_argnames=_STATIC + ("cache_len",))
def _prefill(params, tokens, lengths, keys, limits, sampling, *, runtime: Runtime, sampler, cache_len) -> tuple[DecodeState, jax.Array]:
    """Run the prompts through the model, filling a fresh cache, and sample and emit each row's first token.
    Returns (state, tokens [B 1])."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    cache = runtime.init_cache(batch, cache_len)
    logits, cache = runtime.model().apply({"params": params}, tokens, positions, segments, cache, lengths - 1, fresh_cache=True)
    count = jnp.zeros(batch, jnp.int32)
    token = _sample(runtime, sampler, logits, keys, count, sampling)
    state = DecodeState(cache, token, lengths, count, limits <= 0, jnp.zeros(batch, bool), keys)
    state, out = _emit(state, jnp.full((batch, 1), -1, jnp.int32), 0, limits, sampling["stop_ids"])
    return _pin(runtime, state), runtime.constrain(out, (None, None))


def _pin(runtime: Runtime, state: DecodeState) -> DecodeState:
    """Give every field of the state one fixed layout, so that `_decode` returns the state laid out as it
    received it and its next call reuses the compiled program (left to XLA, a data mesh came back with
    rows split where prefill had replicated them, and the second call recompiled the whole loop).
    done/stopped are read by every host after each call, so they stay replicated."""
    constrain, axes = runtime.constrain, family_of(runtime.config).cache_axes
    rows = lambda x: constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    stacked = lambda x, k: (None,) * (x.ndim - len(axes[k])) + axes[k]  # a scanned model's layers lead with a layers axis
    cache = {name: {k: constrain(x, stacked(x, k)) for k, x in layer.items()} for name, layer in state.cache.items()}
    return DecodeState(cache, rows(state.token), rows(state.position), rows(state.count),
                       constrain(state.done, (None,)), constrain(state.stopped, (None,)), rows(state.keys))  # fmt: skip


@functools.partial(cached_program, donate_argnums=(1,))
@functools.partial(jax.jit, static_argnames=_STATIC + ("out_len",), donate_argnames=("state",))
def _decode(params, state: DecodeState, limits, host_stop, sampling, *, runtime: Runtime, sampler, out_len):
    """Decode and emit tokens until every row is done or `out_len` steps ran. Returns (state, tokens [B out_len])."""
    model = runtime.model()

    def advance(state: DecodeState) -> DecodeState:
        ones = jnp.ones_like(state.token)[:, None]
        logits, cache = model.apply({"params": params}, state.token[:, None], state.position[:, None], ones, state.cache, jnp.zeros_like(state.token))
        token = _sample(runtime, sampler, logits, state.keys, state.count, sampling)
        # Finished rows stay where they are (rewriting their last entry), so what a step reads follows the live rows.
        return state._replace(cache=cache, token=token, position=state.position + ~state.done)

    def body(carry):
        i, state, out = carry
        state, out = _emit(advance(state), out, i, limits, sampling["stop_ids"])
        return i + 1, state, out

    stopped = state.stopped | (host_stop & ~state.done)
    state = state._replace(done=state.done | host_stop, stopped=stopped)
    # Advance only while some row is live (no `cond` inside the loop: one there makes XLA copy the whole KV cache every step).
    cond = lambda carry: (carry[0] < out_len) & ~jnp.all(carry[1].done)
    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, jnp.full((state.token.shape[0], out_len), -1, jnp.int32)))
    return _pin(runtime, state), runtime.constrain(out, (None, None))  # replicated: every host reads all
