"""Float32 logits of our model against `transformers` (Gemma 1, 2, 3), and the KV-cache decode path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gemma_jax
from gemma_jax.models.gemma.model import Transformer, init_cache

# (model_type, config overrides, weight scale): GQA ratio 1, 2 and 4 (MQA); big weights push
# attention logits past the 50 cap and final logits past the 30 cap.
CASES = {
    "gemma2-gqa2-capped": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=2), 3.0),
    "gemma2-mha": ("gemma2", dict(num_attention_heads=2, num_key_value_heads=2, query_pre_attn_scalar=24), 3.0),
    "gemma2-mqa": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=4), 1.0),
    "gemma3-gqa2": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=2), 1.0),
    "gemma1-mqa": ("gemma", dict(num_attention_heads=4, num_key_value_heads=1), 1.0),
    "gemma1-mha": ("gemma", dict(num_attention_heads=4, num_key_value_heads=4), 1.0),
}
SEQ = 40  # > 2 x sliding window (8)


def _padded_batch(vocab: int):
    """Three rows: full, left-padded by 7, right-padded by 11 (with per-row positions)."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, vocab, (3, SEQ))
    mask = np.ones((3, SEQ), bool)
    mask[1, :7] = False
    mask[2, SEQ - 11 :] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


@pytest.fixture(scope="module", params=list(CASES))
def case(request, hf_checkpoint):
    model_type, overrides, scale = CASES[request.param]
    torch_model, path = hf_checkpoint(model_type, weight_scale=scale, **overrides)
    return request.param, torch_model, gemma_jax.load(path, dtype="float32")


def test_logits_match_transformers_on_padded_batches(case):
    name, torch_model, ours = case
    tokens, mask, positions = _padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        ref = torch_model(
            torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)), position_ids=torch.tensor(positions)
        ).logits.numpy()
    model = Transformer(ours.config)
    (logits, _), state = model.apply(
        {"params": ours.params}, tokens, positions, mask.astype(np.int32), mutable="intermediates"
    )
    logits = np.asarray(logits)
    err = np.abs(logits[mask] - ref[mask]).max()
    assert err <= 1e-4 * np.abs(ref[mask]).max(), f"{name}: max abs diff {err}"
    if name.endswith("capped"):  # the soft-caps are really exercised, not just present
        assert max(float(x) for x in jax.tree.leaves(state)) > 50.0
        uncapped = Transformer(ours.config.replace(final_logit_softcap=None))
        raw, _ = uncapped.apply({"params": ours.params}, tokens, positions, mask.astype(np.int32))
        assert np.abs(np.asarray(raw)[mask]).max() > 30.0


def test_logits_api_matches_full_forward(case):
    _, torch_model, ours = case
    rows = [[5, 9, 13, 2, 7, 11], [4, 8]]  # ragged: right-padded internally
    got = ours.logits(rows)
    with torch.no_grad():
        for i, row in enumerate(rows):
            ref = torch_model(torch.tensor([row])).logits.numpy()[0]
            np.testing.assert_allclose(got[i, : len(row)], ref, atol=1e-4 * np.abs(ref).max())
    assert got.shape == (2, 6, ours.config.vocab_size) and got.dtype == np.float32


def test_prefill_then_decode_reproduces_full_forward(case):
    """Prefill 10 tokens, then decode one at a time to 40 (5x the window) on a left-padded batch."""
    _, _, ours = case
    tokens, mask, positions = _padded_batch(ours.config.vocab_size)
    tokens, mask, positions = tokens[:2], mask[:2], positions[:2]  # full and left-padded rows
    segments = mask.astype(np.int32)
    model = Transformer(ours.config)
    apply = jax.jit(lambda *a: model.apply({"params": ours.params}, *a))
    full, _ = apply(tokens, positions, segments, None, None)
    cache = init_cache(ours.config, 2, SEQ)
    steps, (logits, cache) = [], apply(tokens[:, :10], positions[:, :10], segments[:, :10], cache, None)
    steps.append(logits)
    for t in range(10, SEQ):
        logits, cache = apply(tokens[:, t : t + 1], positions[:, t : t + 1], segments[:, t : t + 1], cache, None)
        steps.append(logits)
    decoded = np.concatenate([np.asarray(s) for s in steps], axis=1)
    full = np.asarray(full)
    np.testing.assert_allclose(decoded[mask], full[mask], rtol=1e-5, atol=1e-5 * np.abs(full[mask]).max())


def test_sliding_window_layers_cache_only_window_slots():
    cfg = gemma_jax.GemmaConfig.from_preset("gemma2-2b")
    cache = jax.eval_shape(lambda: init_cache(cfg, batch=2, max_len=8192, dtype=jnp.bfloat16))
    for i, kind in enumerate(cfg.layer_kinds):
        slots = 4096 if kind == "local" else 8192
        assert cache[f"layer_{i}"]["k"].shape == (2, 4, slots, 256)
        assert cache[f"layer_{i}"]["v"].shape == (2, 4, 256, slots)
        assert cache[f"layer_{i}"]["pos"].shape == (2, slots)
    assert cfg.layer_kinds[:2] == ("local", "global")  # HF: even layers slide


def test_bfloat16_params_and_activations_track_float32(hf_checkpoint):
    _, path = hf_checkpoint("gemma2", seed=3)
    f32 = gemma_jax.load(path, dtype="float32")
    bf16 = gemma_jax.load(path, dtype="bfloat16", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    rows = [list(range(3, 30))]
    a, b = f32.logits(rows), bf16.logits(rows)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
