"""int8 Pallas kernels (interpret mode on CPU) against the plain-XLA reference; gradients; TPU/GPU lowering."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models.gemma.model import Transformer, init_cache
from gemma_jax.models import init_params, param_axes
from gemma_jax.kernels import Kernels, backend, gpu, int8_einsum, quantize_rows, reference, split_of, tpu
from gemma_jax.kernels import w8a8_matmul, w8a16_matmul

# (M, K, N): M = 1 and decode-sized rows, K and N off the 128 grid, several blocks per axis.
SHAPES = [(1, 128, 128), (1, 300, 200), (5, 256, 384), (33, 200, 130), (64, 384, 256), (130, 512, 136)]
SMALL_TPU = tpu.Blocks(bm=32, bk=128, bn=128)  # forces multi-block grids (and K accumulation) on test shapes
SMALL_GPU = gpu.GpuBlocks(bm=16, bk=64, bn=32)
KERNELS = {"tpu": (tpu.matmul, SMALL_TPU), "gpu": (gpu.matmul, SMALL_GPU)}
GEMMA2 = ("gemma2-2b", "gemma2-9b", "gemma2-27b")


def _operands(m, k, n, transposed, seed=0):
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k) if transposed else (k, n)), jnp.int8)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    return xq, wq, x, ws


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_reference(kernel, transposed, shape):
    """Exact int32 accumulation; W8A8 and W8A16 scaled outputs to float tolerance (f32 and bf16 activations)."""
    matmul, blocks = KERNELS[kernel]
    xq, wq, x, ws = _operands(*shape, transposed)
    run = lambda *a, **kw: matmul(*a, w_transposed=transposed, blocks=blocks, interpret=True, **kw)
    np.testing.assert_array_equal(run(xq, wq), reference.int8_matmul(xq, wq, w_transposed=transposed))

    _, xs = quantize_rows(x)
    want = reference.w8a8(xq, xs, wq, ws, w_transposed=transposed)
    np.testing.assert_allclose(run(xq, wq, xs, ws), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        xd = x.astype(dtype)
        want = reference.w8a16(xd, wq, ws, w_transposed=transposed)
        got = run(xd, wq, None, ws, out_dtype=dtype).astype(jnp.float32)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_zero_rows_give_zeros_not_nan(backend):
    """All-zero activation rows (padding tokens) and an all-zero weight channel stay finite and exact zeros."""
    _, wq, x, ws = _operands(4, 256, 128, False)
    x = x.at[1].set(0.0).at[3].set(0.0)
    ws = ws.at[5].set(0.0)
    for fn in (w8a8_matmul, w8a16_matmul):
        y = np.asarray(fn(x, wq, ws, kernels=Kernels(int8=backend, interpret=True)))
        assert np.isfinite(y).all()
        assert not y[[1, 3]].any() and not y[:, 5].any()
    xq, xs = quantize_rows(x)
    assert not np.asarray(xq)[[1, 3]].any() and not np.asarray(xs)[[1, 3]].any()


def test_activation_quantization_is_per_row_absmax():
    x = jnp.asarray([[0.5, -1.0, 0.25], [3.0, 0.0, -1.5]], jnp.float32)
    xq, xs = quantize_rows(x)
    np.testing.assert_array_equal(xq, [[64, -127, 32], [127, 0, -64]])  # 63.5 and -63.5 round to even
    np.testing.assert_allclose(xs[:, 0], [1.0 / 127, 3.0 / 127])


def _ste_w8a8(x, wq, ws):
    """Reference W8A8 with the straight-through estimator: forward quantized, gradient as if x were exact."""
    xq, xs = quantize_rows(x)
    x_hat = x + jax.lax.stop_gradient(xq.astype(jnp.float32) * xs - x)
    return reference.contract(x_hat, wq.astype(jnp.float32), False, jnp.float32) * ws


@pytest.mark.parametrize("backend", ["xla", "tpu"])
def test_gradients_match_reference(backend):
    """Custom VJP: dx and dws against autodiff of the reference (STE for W8A8's activation rounding)."""
    _, wq, x, ws = _operands(24, 256, 136, False, seed=3)
    probe = jnp.asarray(np.random.default_rng(4).normal(size=(24, 136)), jnp.float32)
    cases = {
        "w8a16": (w8a16_matmul, lambda x, ws: reference.w8a16(x, wq, ws)),
        "w8a8": (w8a8_matmul, lambda x, ws: _ste_w8a8(x, wq, ws)),
    }
    for name, (fn, ref) in cases.items():
        kernels = Kernels(int8=backend, interpret=True)
        ours = jax.grad(lambda x, ws: jnp.sum(fn(x, wq, ws, kernels=kernels) * probe), argnums=(0, 1))(x, ws)
        want = jax.grad(lambda x, ws: jnp.sum(ref(x, ws) * probe), argnums=(0, 1))(x, ws)
        for got, exp in zip(ours, want):
            np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4 * np.abs(exp).max(), err_msg=name)


def test_gradient_of_transposed_weight_matches_dense():
    """The tied head's [N K] layout: dx equals the dense gradient through the dequantized weight."""
    _, wq, x, ws = _operands(8, 128, 64, True)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(8, 64)), jnp.float32)
    dense = wq.astype(jnp.float32) * ws[:, None]  # [N K]
    got = jax.grad(lambda x: jnp.sum(w8a16_matmul(x, wq, ws, w_transposed=True) * probe))(x)
    want = jax.grad(lambda x: jnp.sum((x @ dense.T) * probe))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_einsum_maps_projections_to_matmuls():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 8)), jnp.float32)  # B T N H
    wq = jnp.asarray(rng.integers(-127, 128, (16, 4, 8)), jnp.int8)  # D N H
    ws = jnp.asarray(rng.uniform(0.01, 0.02, 16), jnp.float32)
    want = jnp.einsum("BTNH,DNH->BTD", x, wq.astype(jnp.float32) * ws[:, None, None])
    np.testing.assert_allclose(int8_einsum("BTNH,DNH->BTD", x, wq, ws, scheme="w8a16"), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="contracted dims last"):
        int8_einsum("BTD,DF->BTF", x[..., 0, :], wq[0], ws[:8], scheme="w8a16")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        int8_einsum("BTNH,DNH->BTD", x, wq, ws, scheme="w4a16")


def test_backend_dispatch_is_overridable(monkeypatch):
    assert Kernels.for_platform().int8 == "xla"  # CPU default
    assert Kernels.for_platform(int8="tpu").int8 == "tpu"
    monkeypatch.setenv("GEMMA_JAX_INT8_BACKEND", "gpu")
    assert Kernels.for_platform().int8 == "gpu"
    assert Kernels.for_platform(int8="tpu").int8 == "tpu"  # an explicit argument wins
    with pytest.raises(ValueError, match="unknown int8 backend"):
        Kernels(int8="cuda")
    monkeypatch.setenv("GEMMA_JAX_INT8_BACKEND", "mosaic")
    with pytest.raises(ValueError, match="unknown int8 backend"):
        Kernels.for_platform()


def _model_shapes(preset: str) -> set[tuple[int, int]]:
    """(K, N) of every int8 matmul in the model (weights stored [N K]): q, k/v, o, gate/up, down, tied head."""
    c = GemmaConfig.from_preset(preset)
    D, F = c.embed_dim, c.mlp_dim
    return {(D, c.num_heads * c.head_dim), (D, c.num_kv_heads * c.head_dim), (c.num_heads * c.head_dim, D),
            (D, F), (F, D), (D, c.vocab_size)}  # fmt: skip


DECODE_M, PREFILL_M = (1, 16, 64), (512, 2048, 8192)


@pytest.mark.parametrize("preset", GEMMA2)
def test_tpu_kernels_lower_for_tpu(preset):
    """Every W8A8 / W8A16 kernel configuration of Gemma 2 (decode and prefill M, bf16 activations) lowers to Mosaic."""
    S = jax.ShapeDtypeStruct
    for k, n in sorted(_model_shapes(preset)):
        w = S((n, k), jnp.int8)
        for m in DECODE_M + PREFILL_M:
            common = dict(w_transposed=True, out_dtype=jnp.bfloat16)
            w8a8 = lambda x, xs, w, ws: tpu.matmul(x, w, xs, ws, **common)
            w8a16 = lambda x, w, ws: tpu.matmul(x, w, None, ws, **common)
            for fn, args in ((w8a8, (S((m, k), jnp.int8), S((m, 1), jnp.float32), w, S((n,), jnp.float32))),
                             (w8a16, (S((m, k), jnp.bfloat16), w, S((n,), jnp.float32)))):  # fmt: skip
                text = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()
                assert "tpu_custom_call" in text, (preset, m, k, n)


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
@pytest.mark.parametrize("preset", GEMMA2)
def test_quantized_model_lowers_for_tpu(preset, scheme):
    """The int8 model itself (real dims, one local + one global layer) exported for TPU: prefill and a
    decode step each run every projection and the tied head as a Mosaic kernel."""
    config = GemmaConfig.from_preset(preset).replace(num_layers=2)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), jnp.bfloat16, quant=scheme))
    net = Transformer(config, jnp.bfloat16, jnp.bfloat16, quant=scheme, kernels=Kernels(int8="tpu", interpret=False))

    def forward(params, tokens, cache):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        last = jnp.full(tokens.shape[:1], tokens.shape[1] - 1)
        return net.apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache, last, tokens.shape[1] > 1)

    for batch, length in ((2, 1024), (8, 1)):  # prefill M = 2048, decode M = 8
        cache = jax.eval_shape(lambda: init_cache(config, batch, 2048, jnp.bfloat16))
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        text = jax.export.export(jax.jit(forward), platforms=("tpu",))(params, tokens, cache).mlir_module()
        calls = re.findall(r"call @(matmul\w*)\(", text)  # each distinct kernel is one private function
        assert len(calls) == 7 * config.num_layers + 1, (batch, length, calls)
        assert text.count("custom_call @tpu_custom_call") == len(set(calls))


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_sharded_quantized_model_lowers_for_tpu(scheme):
    """On a (data=2, tensor=4) mesh the int8 model still lowers to Mosaic kernels, one per projection, run per
    shard: partial sums meet in all-reduces and no weight is all-gathered."""
    from gemma_jax.sharding import INFERENCE, Layout, make_mesh, tree_shardings

    config = GemmaConfig.from_preset("gemma2-9b").replace(num_layers=2)
    layout = Layout(make_mesh("data=2,tensor=4"), INFERENCE)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), jnp.bfloat16, quant=scheme))
    shardings = tree_shardings(layout, param_axes(config, scheme), params)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    net = Transformer(config, jnp.bfloat16, jnp.bfloat16, quant=scheme, kernels=Kernels(layout, int8="tpu", interpret=False))

    def forward(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return net.apply({"params": params}, tokens, positions, jnp.ones_like(tokens))[0]

    for batch, length in ((2, 512), (8, 1)):
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=layout.sharding(("act_batch", None), (batch, length)))
        exported = jax.export.export(jax.jit(forward), platforms=("tpu",))(params, tokens)
        text = exported.mlir_module()
        assert exported.nr_devices == 8 and len(re.findall(r"call @(matmul\w*)\(", text)) == 7 * config.num_layers + 1
        assert "tpu_custom_call" in text and "all_reduce" in text and "all_gather" not in text


@pytest.mark.parametrize("preset", GEMMA2)
def test_gpu_kernels_lower_for_cuda(preset):
    """The Triton variant lowers too (compiled to PTX only by XLA on a GPU), one M per block regime."""
    S = jax.ShapeDtypeStruct
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for k, n in sorted(_model_shapes(preset)):
        w = S((n, k), jnp.int8)
        for m in (1, 512):
            fn = lambda x, w, ws: gpu.matmul(x, w, None, ws, w_transposed=True, out_dtype=jnp.bfloat16)
            exported = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=triton)
            assert "triton" in exported(S((m, k), jnp.bfloat16), w, S((n,), jnp.float32)).mlir_module()


def test_default_blocks_fit_gemma_shapes_without_weight_padding():
    """Gemma's K and N are multiples of 128, so the planner never copies a weight to pad it."""
    for preset in GEMMA2:
        for k, n in _model_shapes(preset):
            for m in DECODE_M + PREFILL_M:
                target = tpu.default_blocks(m)
                assert tpu._fit(k, target.bk, 128)[1] == k and tpu._fit(n, target.bn, 128)[1] == n
                bm, mp = tpu._fit_rows(m, target.bm)
                assert mp % bm == 0 and mp - m < 32 + (0 if m <= 128 else bm)


def test_platform_defaults():
    """Pallas on TPU v5e+ (per shard on a mesh); XLA on v4 (no int8 MXU gain), GPU (kernel unmeasured) and CPU."""
    assert backend.platform_default("tpu", "TPU v5 lite") == "tpu"
    assert backend.platform_default("tpu", "TPU v6e") == "tpu"
    assert backend.platform_default("tpu", "TPU v4") == "xla"
    assert backend.platform_default("gpu", "NVIDIA H100 80GB HBM3") == "xla"
    assert backend.platform_default("cpu", "cpu") == "xla"


def test_split_follows_the_layout():
    """Which mesh axes split rows, contraction and output; None where shard_map cannot express the layout."""
    from gemma_jax.sharding import INFERENCE, TRAINING, Layout, make_mesh

    assert split_of(("embed", "q_heads", "head_dim"), (64, 8, 16), (0,), 4, None) is None  # no layout
    layout = Layout(make_mesh("data=2,tensor=4"), INFERENCE)
    q = split_of(("embed", "q_heads", "head_dim"), (64, 8, 16), (0,), 4, layout)
    o = split_of(("q_heads", "head_dim", "embed"), (8, 16, 64), (0, 1), 4, layout)
    assert (q.m, q.k, q.n) == (("data",), (), ("tensor",)) and (o.m, o.k, o.n) == (("data",), ("tensor",), ())
    assert split_of(("embed", "q_heads", "head_dim"), (64, 8, 16), (0,), 3, layout).m == ()  # 3 rows: not split
    layout = Layout(make_mesh("fsdp=2,tensor=4"), TRAINING)
    up = split_of(("embed", "mlp"), (64, 32), (0,), 4, layout)  # embed on fsdp, which also splits rows: gathered
    assert (up.m, up.k, up.n) == (("fsdp",), (), ("tensor",))
    layout = Layout(make_mesh("data=2,tensor=4"), (("head_dim", ("tensor",)),))
    assert split_of(("embed", "q_heads", "head_dim"), (64, 3, 16), (0,), 4, layout) is None  # trailing dim split
