"""The int8 KV cache: half the bytes, logits through it close to the float cache's, for every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax.models import build, init_cache, init_params
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models.gemma3n import Gemma3nConfig
from gemma_jax.models.kv_cache import layer_cache, read_cache, write_cache
from gemma_jax.plan import plan

GEMMA = GemmaConfig(
    model_type="gemma2", vocab_size=256, embed_dim=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
    mlp_dim=128, query_pre_attn_scalar=32, layer_pattern=("local", "global"), sliding_window=6, use_post_norms=True,
    attn_logit_softcap=50.0, final_logit_softcap=30.0,
)  # fmt: skip
GEMMA3N = Gemma3nConfig(
    vocab_size=256, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64,
    layer_pattern=("local", "global"), sliding_window=5, per_layer_vocab_size=256, per_layer_dim=8, altup_num_inputs=2,
    num_kv_shared_layers=2, laurel_rank=4,
)  # fmt: skip


def test_int8_entries_are_within_half_a_step_of_the_float_ones():
    cache = layer_cache(2, 8, 2, 16, jnp.int8, None)
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 2, 16)) * (i + 1) for i in range(2))
    k = k.at[1, 2].set(0.0)  # a zero token stays exactly zero
    cache = write_cache(cache, k, v, jnp.tile(jnp.arange(5), (2, 1)))
    keys, values = read_cache(cache, jnp.float32)  # [B K S H], [B K H S]
    for got, want, scale in ((keys[:, :, :5], k.transpose(0, 2, 1, 3), cache["k_scale"]),
                             (values[..., :5].transpose(0, 1, 3, 2), v.transpose(0, 2, 1, 3), cache["v_scale"])):  # fmt: skip
        assert np.all(np.abs(got - want) <= scale[:, :, :5, None] / 2 + 1e-6)
    assert not np.asarray(keys[1, :, 2]).any()


@pytest.mark.parametrize("config", [GEMMA, GEMMA3N], ids=["gemma2", "gemma3n"])
def test_prefill_and_decode_through_an_int8_cache_track_the_float_cache(config):
    """A 12-token prefill (longer than every window) and 12 decode steps: logits through the int8 cache stay within
    5% of the largest logit of the float cache's (random tiny models; the real 270M: benchmarks/kv_cache.py), with the
    same argmax at nearly every step."""
    params = init_params(config, jax.random.PRNGKey(0))
    model = build(config)
    apply = jax.jit(lambda *a, fresh=False: model.apply({"params": params}, *a, fresh_cache=fresh), static_argnames="fresh")
    tokens = np.random.RandomState(0).randint(3, config.vocab_size, (2, 24)).astype(np.int32)
    positions, segments = np.tile(np.arange(24, dtype=np.int32), (2, 1)), np.ones_like(tokens)
    runs = {}
    for dtype in (jnp.float32, jnp.int8):
        cache = init_cache(config, 2, 32, dtype)
        logits, cache = apply(tokens[:, :12], positions[:, :12], segments[:, :12], cache, None, fresh=True)
        steps = [logits]
        for t in range(12, 24):
            logits, cache = apply(tokens[:, t : t + 1], positions[:, t : t + 1], segments[:, t : t + 1], cache, None)
            steps.append(logits)
        runs[jnp.dtype(dtype).name] = np.concatenate([np.asarray(s) for s in steps], axis=1)
    want, got = runs["float32"], runs["int8"]
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()
    assert np.mean(got[:, 12:].argmax(-1) == want[:, 12:].argmax(-1)) >= 0.9
    assert not np.array_equal(got[:, 12:], want[:, 12:])  # the decode steps did read the int8 entries


def test_int8_cache_through_the_api_and_plan():
    params = init_params(GEMMA, jax.random.PRNGKey(1))
    floats = gemma_jax.Gemma(GEMMA, params, compute_dtype="float32")
    int8 = gemma_jax.Gemma(GEMMA, params, compute_dtype="float32", kv_cache="int8")
    cache = jax.eval_shape(lambda: int8.runtime.init_cache(2, 64))
    assert {leaf.dtype for layer in cache.values() for leaf in (layer["k"], layer["v"])} == {jnp.dtype(jnp.int8)}
    prompts = [[2, 17, 33, 9, 41], [2, 5]]
    same = [a == b for a, b in zip(floats.generate(prompts, max_new_tokens=8), int8.generate(prompts, max_new_tokens=8))]
    assert sum(same) >= 1  # random weights: near-ties may flip a token, but not every row
    sizes = {kv: plan(GemmaConfig.from_preset("gemma2-9b"), {"tensor": 4}, chip="v5e", batch=16, seq=8192, kv_cache=kv)
             for kv in ("float", "int8")}  # fmt: skip
    assert 0.49 <= sizes["int8"].cache_bytes / sizes["float"].cache_bytes <= 0.52  # bf16 -> int8 + f32 scales per token/head


def test_generate_command_with_an_int8_cache(text_checkpoint, capsys):
    from gemma_jax.cli import main

    main(["generate", "--ckpt", str(text_checkpoint[1]), "--kv-cache", "int8", "--prompt", "The licence", "--max-new-tokens", "4",
          "--no-compile-cache"])  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out.strip() and "4 new tokens" in captured.err and "tokens/s" in captured.err
