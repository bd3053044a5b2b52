"""Next-token choice: greedy, or temperature sampling restricted by top-k and top-p.

The static part of the choice (`Sampler`) is a compile-time key; temperature and top-p are
traced values, so changing them never recompiles. `RowSampler` makes every setting traced and
per row, so that one compiled step serves requests with different settings (the server).
A sampler is called with the traced settings as a dict (`temperature`, `top_p`, and for
`RowSampler` `top_k`), scalars or one value per row.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp


Array = jax.Array
# jax.random.PRNGKey keeps a seed's low 32 bits (without x64): larger seeds would alias smaller ones.
SEED_LIMIT = 2**32


def check_seed(seed: int) -> int:
    """The seed, if it names a distinct PRNG stream: an integer in [0, 2**32)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, {SEED_LIMIT - 1}], got {seed!r}")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class Sampler:
    greedy: bool = True
    top_k: int | None = None
    use_top_p: bool = False

    @classmethod
    def create(cls, temperature: float, top_k: int | None, top_p: float | None) -> Sampler:
        """Validate user sampling arguments (errors name the argument) and build the static sampler."""
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if temperature == 0:
            return cls()
        return cls(greedy=False, top_k=top_k, use_top_p=top_p is not None and top_p < 1)

    def __call__(self, logits: Array, keys: Array, settings: dict[str, Array], blockwise: bool = False) -> Array:
        """logits [B V] float32, keys [B] PRNG keys -> token ids [B] int32."""
        temperature, top_p = _column(settings["temperature"]), _column(settings["top_p"])
        if self.greedy:
            return argmax(logits, blockwise).astype(jnp.int32)
        if self.top_k is not None:
            logits, ids = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))  # sorted, descending
        elif self.use_top_p:
            ids = jnp.argsort(-logits, axis=-1)
            logits = jnp.take_along_axis(logits, ids, axis=-1)
        else:
            ids = None
        logits = logits / temperature
        if self.use_top_p:
            logits = _nucleus(logits, top_p)
        choice = jax.vmap(jax.random.categorical)(keys, logits)
        return (choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RowSampler:
    """Each row's own temperature (0: greedy), top_k (0: all tokens) and top_p, all traced.

    Greedy rows take exactly `argmax`, and a batch of greedy rows skips the vocabulary sort.
    A row with top_p < 1 and no top_k draws what `Sampler(use_top_p=True)` draws from the same key.
    """

    def __call__(self, logits: Array, keys: Array, settings: dict[str, Array], blockwise: bool = False) -> Array:
        temperature, top_p, top_k = settings["temperature"], settings["top_p"], settings["top_k"]
        greedy = argmax(logits, blockwise).astype(jnp.int32)

        def sample(logits: Array) -> Array:
            ids = jnp.argsort(-logits, axis=-1)
            logits = jnp.take_along_axis(logits, ids, axis=-1) / _column(jnp.where(temperature > 0, temperature, 1))
            rank = jnp.arange(logits.shape[-1])
            logits = jnp.where((_column(top_k) > 0) & (rank >= _column(top_k)), -jnp.inf, logits)
            logits = jnp.where(_column(top_p) >= 1, logits, _nucleus(logits, _column(top_p)))
            choice = jax.vmap(jax.random.categorical)(keys, logits)
            return jnp.where(temperature > 0, jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0], greedy).astype(jnp.int32)

        return jax.lax.cond(jnp.all(temperature <= 0), lambda _: greedy, sample, logits)


def _nucleus(sorted_logits: Array, top_p: Array) -> Array:
    """Keep the smallest prefix of candidates (sorted, descending) whose probability mass reaches top_p."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)


def _column(x: Array) -> Array:
    """A scalar or per-row [B] setting as a column that broadcasts against [B V]."""
    return jnp.reshape(x, (-1, 1))


_ARGMAX_BLOCK = 1024


def argmax(logits: Array, blockwise: bool = False) -> Array:
    """[B V] -> [B]: the first index of each row's largest logit, as `jnp.argmax`.

    On one CPU device, XLA's argmax over a 262k vocabulary is one scalar pass (4.4 ms at batch 16
    here); the max of each 1024-logit block vectorizes, leaving an argmax over blocks and one
    inside the winning block (0.9 ms). `blockwise` asks for that (`Kernels.cpu_unsharded`).
    """
    B, V = logits.shape
    if not blockwise or V % _ARGMAX_BLOCK:
        return jnp.argmax(logits, axis=-1)
    blocks = logits.reshape(B, V // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # the first block holding the max
    inside = jnp.argmax(jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0], axis=-1)
    return best * _ARGMAX_BLOCK + inside
