"""The paged KV cache and decode reading only filled blocks: same tokens as the dense cache, pages shared by
short and long requests, the Pallas ragged paged attention kernel equal to the XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.api import Gemma
from gemma_jax.engine import Engine, Request
from gemma_jax.generate import generate
from gemma_jax.kernels import Kernels
from gemma_jax.models import build, init_cache, init_params
from gemma_jax.models.attention import attention_mask, decode_attention
from gemma_jax.models.kv_cache import layer_cache, paged_cache, table_width, write_cache
from gemma_jax.sampling import Sampler
from gemma_jax.sharding import INFERENCE, Layout, make_mesh

from test_kv_cache import GEMMA, GEMMA3N

GREEDY = Sampler.create(0.0, None, None)


def _model(config, kv_cache="float"):
    return Gemma(config, init_params(config, jax.random.PRNGKey(1)), compute_dtype="float32", kv_cache=kv_cache)


def _prompts(config, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, config.vocab_size, n).tolist() for n in lengths]


def _dense_attention(q, k, v, k_pos, position, window, soft_cap):
    """The plain softmax a decode step must equal: q [B K G H], k/v [B S K H], key positions [B S]."""
    logits = jnp.einsum("BKGH,BSKH->BKGS", q, k)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    mask = attention_mask(position[:, None], k_pos, window, None)[:, 0]
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("BKGS,BSKH->BKGH", probs, v)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_decode_attention_over_filled_blocks_equals_the_dense_softmax(window, paged, monkeypatch):
    """Rows at different positions (one far past the window, one short), blocks of 8 keys: the online
    softmax over filled blocks equals the softmax over every key, capped logits included (60 slots: the last
    block of 8 overlaps the one before)."""
    monkeypatch.setattr("gemma_jax.models.kv_cache.DECODE_BLOCK", 8)
    B, K, G, H, max_len, page = 3, 2, 2, 16, 60, 4
    position = jnp.array([58, 3, 21])
    rng = np.random.RandomState(0)
    k, v = (jnp.asarray(rng.randn(B, max_len, K, H).astype(np.float32) * 3) for _ in range(2))
    q = jnp.asarray(rng.randn(B, K, G, H).astype(np.float32) * 3)
    k_pos = jnp.where(jnp.arange(max_len) <= position[:, None], jnp.arange(max_len), -1)  # B S: what is written
    slots = max_len if window is None else window
    cache = layer_cache(B, slots, K, H, jnp.float32, None)
    if paged:
        W = table_width(slots, max_len, page)
        dense = {"layer_0": cache}
        cache = paged_cache(dense, max_len, page, {W: 1 + B * W}, B, None)["layer_0"]
        cache["pages"] = jnp.asarray(1 + np.random.RandomState(1).permutation(B * W).reshape(B, W))  # any pages
    cache = write_cache(cache, k, v, k_pos)
    got = decode_attention(q, cache, position, window, 20.0, Kernels())
    want = _dense_attention(q, k, v, k_pos, position, window, 20.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _paged_layer(window, B=2, K=2, H=128, max_len=96, page=8, position=(70, 9), dtype=jnp.float32):
    """A paged layer cache (float32 or int8) holding positions 0..position[b] of random keys/values, and queries [B K 2 H]."""
    rng = np.random.RandomState(0)
    k, v = (jnp.asarray(rng.randn(B, max_len, K, H).astype(np.float32)) for _ in range(2))
    q = jnp.asarray(rng.randn(B, K, 2, H).astype(np.float32))
    position = jnp.array(position)
    k_pos = jnp.where(jnp.arange(max_len) <= position[:, None], jnp.arange(max_len), -1)
    slots = max_len if window is None else window
    W = table_width(slots, max_len, page)
    cache = paged_cache({"l": layer_cache(B, slots, K, H, dtype, None)}, max_len, page, {W: 1 + B * W}, B, None)["l"]
    cache["pages"] = jnp.asarray(1 + np.arange(B * W)[::-1].reshape(B, W))
    return q, write_cache(cache, k, v, k_pos), position


@pytest.mark.parametrize("window", [None, 24])
def test_ragged_paged_attention_kernel_inputs_give_the_xla_result(window, monkeypatch):
    """What we hand Pallas' ragged paged attention (ring tables rotated to the oldest visible key, lengths
    counted from there, soft-cap, window), run through the kernel's own reference implementation, equals
    the XLA path. (Neither Pallas interpreter of jax 0.10 runs the kernel; the next test lowers it for TPU.)"""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel

    reference = lambda *args, num_kv_pages_per_block=None, num_queries_per_block=None, **kw: kernel.ref_ragged_paged_attention(*args, **kw)
    monkeypatch.setattr("gemma_jax.kernels.paged_attention.ragged_paged_attention", reference)
    q, cache, position = _paged_layer(window)
    xla = decode_attention(q, cache, position, window, 30.0, Kernels())
    pallas = decode_attention(q, cache, position, window, 30.0, Kernels(attention="splash"))
    np.testing.assert_allclose(pallas, xla, rtol=2e-5, atol=2e-5)


def test_ragged_paged_attention_kernel_lowers_for_tpu():
    """The decode step with the kernel lowers to a Mosaic call for a TPU v5e (the kernel's lowering asks for the
    chip, which an abstract mesh names here; jax keeps AbstractDevice private)."""
    from jax._src.mesh import AbstractDevice

    q, cache, position = _paged_layer(24)
    step = jax.jit(lambda q, cache, position: decode_attention(q, cache, position, 24, 30.0, Kernels(attention="splash")))
    chip = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))
    with jax.sharding.use_abstract_mesh(chip):
        exported = jax.export.export(step, platforms=("tpu",))(q, cache, position)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8], ids=["float", "int8"])
@pytest.mark.parametrize("mesh", [None, "data=2,tensor=4"])
def test_gpu_paged_decode_kernel_equals_the_xla_path(window, dtype, mesh):
    """Our Pallas GPU kernel (interpret mode: a program per row and KV head, pages loaded by table id from the
    interleaved pool, ring tables rotated, soft-cap, window, int8 scales; on a mesh, per shard of rows and
    heads) equals the XLA block path."""
    q, cache, position = _paged_layer(window, dtype=dtype, position=(70, 9, 40, 95), B=4, K=4)
    layout = None if mesh is None else Layout(make_mesh(mesh), INFERENCE)
    xla = decode_attention(q, cache, position, window, 30.0, Kernels())
    step = jax.jit(lambda q, cache, position: decode_attention(q, cache, position, window, 30.0,
                                                               Kernels(layout=layout, attention="gpu", interpret=True)))  # fmt: skip
    np.testing.assert_allclose(step(q, cache, position), xla, rtol=2e-5, atol=2e-5)


def test_gpu_paged_decode_kernel_lowers_for_cuda():
    """The decode step with the GPU kernel lowers to one Triton call per layer for CUDA (no GPU here to run it;
    Triton calls carry no serialization guarantee, so export is told to accept this one)."""
    q, cache, position = _paged_layer(24)
    step = jax.jit(lambda q, cache, position: decode_attention(q, cache, position, 24, 30.0, Kernels(attention="gpu")))
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = jax.export.export(step, platforms=("cuda",), disabled_checks=triton)(q, cache, position).mlir_module()
    assert module.count("__gpu$xla.gpu.triton") == 1 and "gemma_paged_decode_attention" in module


ENGINE_CASES = [(GEMMA, "float", "xla"), (GEMMA, "int8", "xla"), (GEMMA3N, "float", "xla"), (GEMMA3N, "int8", "xla"),
                (GEMMA, "float", "gpu"), (GEMMA3N, "int8", "gpu")]  # fmt: skip


@pytest.mark.parametrize("config,kv_cache,attention", ENGINE_CASES,
                         ids=[f"{c.model_type}-{kv}-{a}" for c, kv, a in ENGINE_CASES])  # fmt: skip
def test_engine_on_pages_emits_what_generate_emits(config, kv_cache, attention, monkeypatch):
    """Greedy tokens of every request through the paged engine (3 slots, pages of 4, rings on the sliding-window
    layers, prompts longer than the window; decode by XLA or by the GPU kernel in interpret mode) equal
    per-prompt `generate` on the dense cache."""
    monkeypatch.setenv("GEMMA_JAX_ATTENTION", attention)
    model = _model(config, kv_cache)
    assert model.runtime.kernels.attention == attention
    prompts = _prompts(config, [3, 13, 7, 1, 17, 9])
    engine = Engine(model, slots=3, max_len=32, sampler=GREEDY, page_size=4)
    finished = {f.id: f.tokens for f in engine.run([Request(f"r{i}", p, 10) for i, p in enumerate(prompts)])}
    for i, prompt in enumerate(prompts):
        want = generate(model.config, model.params, [prompt], max_new_tokens=10, sampler=GREEDY,
                        runtime=model.runtime).tokens[0]  # fmt: skip
        assert finished[f"r{i}"] == want, i
    assert all(len(pages) == n - 1 for pages, n in zip(engine.free_pages.values(), engine.capacity.values()))  # all back


def test_admission_is_by_free_pages_and_pages_return_when_requests_end():
    """A budget of 64 tokens in pages of 8: two short requests run beside each other, a long one waits until
    they are done; the dense per-slot cache would hold one 64-token slot."""
    model = _model(GEMMA)
    engine = Engine(model, slots=4, max_len=64, sampler=GREEDY, page_size=8, kv_tokens=64)
    short = [Request(f"s{i}", p, 8) for i, p in enumerate(_prompts(GEMMA, [10, 12, 9]))]  # 3 pages each
    long = Request("long", _prompts(GEMMA, [40])[0], 16)  # 7 pages
    assert engine.fit(short + [long]) == 2  # 8 pages in all: the third short one no longer fits
    engine.admit(short[:2])
    assert engine.running == 2 and engine.fit([long]) == 0 and engine.fit([long], releasing=[0, 1]) == 1
    seen = set()
    for _ in engine.run([short[2], long]):
        seen.add(engine.running)
    with pytest.raises(ValueError, match="max_len"):
        engine.fit([Request("huge", [5] * 60, 8)])
    with pytest.raises(ValueError, match="kv_tokens"):
        Engine(model, slots=2, max_len=64, sampler=GREEDY, kv_tokens=32)


def test_admission_returns_first_tokens_and_a_request_can_end_there():
    """The prefill samples each request's first token, so `admit` hands it over before any decode step; a request
    of one new token ends at admission and its slot and pages are free at once."""
    model = _model(GEMMA)
    prompts = _prompts(GEMMA, [10, 7])
    want = [generate(model.config, model.params, [p], max_new_tokens=3, sampler=GREEDY, runtime=model.runtime).tokens[0]
            for p in prompts]  # fmt: skip
    engine = Engine(model, slots=2, max_len=32, sampler=GREEDY, page_size=8)
    free = {w: len(pages) for w, pages in engine.free_pages.items()}
    first = engine.admit([Request("one", prompts[0], 1), Request("three", prompts[1], 3)])
    assert [(o.request.id, o.slot, o.tokens, o.finish_reason) for o in first] == [("one", 0, want[0][:1], "length"),
                                                                              ("three", 1, want[1][:1], None)]  # fmt: skip
    assert engine.free_slots() == [0] and engine.running == 1
    rest = engine.step()
    assert [(o.request.id, o.tokens, o.finish_reason) for o in rest] == [("three", want[1][1:], "length")]
    assert {w: len(pages) for w, pages in engine.free_pages.items()} == free


def test_decode_reads_only_the_blocks_rows_filled(monkeypatch):
    """The decode step's loop runs over filled blocks only: a cache 16 times larger costs no more blocks."""
    monkeypatch.setattr("gemma_jax.models.kv_cache.DECODE_BLOCK", 8)
    counts = []
    real = jax.lax.fori_loop

    def counting(lo, hi, body, init):
        counts.append(hi)
        return real(lo, hi, body, init)

    monkeypatch.setattr("gemma_jax.models.attention.jax.lax.fori_loop", counting)
    model = build(GEMMA)
    params = init_params(GEMMA, jax.random.PRNGKey(0))
    for max_len in (32, 512):
        cache = init_cache(GEMMA, 1, max_len)
        tokens = jnp.ones((1, 12), jnp.int32)
        _, cache = model.apply({"params": params}, tokens, jnp.arange(12)[None], tokens, cache, fresh_cache=True)
        counts.clear()
        model.apply({"params": params}, tokens[:, :1], jnp.array([[12]]), tokens[:, :1], cache)
        assert [int(c) for c in counts] == [1, 2, 1]  # local (6-slot ring), global (13 of max_len), local


def test_plan_sizes_the_engine_paged_cache():
    """`plan --kv-tokens` counts the bytes the engine allocates (pools with the null page, rings, tables)."""
    from gemma_jax.plan import plan

    model = _model(GEMMA)
    engine = Engine(model, slots=4, max_len=64, sampler=GREEDY, page_size=8, kv_tokens=96)
    allocated = sum(x.nbytes for layer in engine.state.cache.values() for x in layer.values())
    planned = plan(GEMMA, {}, chip="v5e", batch=4, seq=64, param_dtype="float32", page_size=8, kv_tokens=96)
    assert planned.cache_bytes == allocated
    dense = plan(GEMMA, {}, chip="v5e", batch=4, seq=64, param_dtype="float32")
    assert planned.cache_bytes < dense.cache_bytes  # global layer: 96 tokens of pages against 4 x 64 dense slots
