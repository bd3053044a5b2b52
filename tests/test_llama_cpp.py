"""Cross-checks against llama.cpp (through llama-cpp-python), the engine our GGUF exports are for.

- Tiny random Gemma 2 and Gemma 3 models with a real sentencepiece tokenizer, exported by
  `save_gguf` as f32 and q8_0, load in llama.cpp, and its logits match ours over 100 tokens,
  many sliding windows long, fed in batches of 16 (so llama.cpp's KV cache is used too).
- Gemma 3n: llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python sdist, at
  $LLAMA_CPP_SOURCE) writes the tensors and gemma3n keys our export writes, and our importer reads its
  file to transformers' logits; llama.cpp runs our f32 and q8_0 exports of a tiny model of the shape it
  hard-codes to our logits computed with its arithmetic.
- The real Gemma 3 270M: the tokenizers agree; its weights exported by us as F32 give llama.cpp
  our logits and our greedy text on every prompt; on the packaged Q4_K_M file, which llama.cpp
  runs with quantized arithmetic, greedy texts agree up to near-ties; and `gemma_jax.perplexity`
  agrees within 1% with llama-perplexity's algorithm run on llama.cpp's logits.

Every test is marked `llama_cpp`, which the default run deselects. Run them (~3 min on 2 cores) with

    python -m pytest -m llama_cpp tests/test_llama_cpp.py -s    # -s prints the measured numbers

llama-cpp-python must be built for this CPU (a native build segfaults at the first eval here):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF" \
        pip install "llama-cpp-python>=0.3,<0.4"

Without it these tests fail (they do not skip) with that command in the message.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax.checkpoint.gguf import load_gguf, save_gguf
from gemma_jax.checkpoint.resolve import packaged_gemma3_270m
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models.gemma.model import Transformer
from gemma_jax.perplexity import perplexity
from gemma_jax.tokenizer import Tokenizer
from test_gguf import CORPUS, _forward, _tiny  # same-directory test module (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.llama_cpp

try:
    import llama_cpp
except ImportError as e:  # fail (not skip) when these tests are selected; collection must not break the default run
    llama_cpp, _IMPORT_ERROR = None, f"{type(e).__name__}: {e}"

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF" '
           'pip install "llama-cpp-python>=0.3,<0.4"')  # fmt: skip
# Half the cores, as llama-cpp-python's default: ggml's threads spin at barriers, so one that another
# process preempts stalls the rest (here 2 threads ran 15x slower than 1 while the other core was busy).
THREADS = max(1, (os.cpu_count() or 2) // 2)
GGML_TYPE_F32 = 0  # KV-cache type for the f32 comparisons (llama.cpp's default F16 cache rounds K and V)


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp_available() -> None:
    if llama_cpp is None:
        pytest.fail(f"the llama_cpp tests need llama-cpp-python ({_IMPORT_ERROR}); install it with: {INSTALL}",
                    pytrace=False)  # fmt: skip


def _llama(path: Path, *, n_ctx: int, n_batch: int = 512, f32_cache: bool = False, **kwargs: Any) -> "llama_cpp.Llama":
    cache = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=THREADS, n_threads_batch=THREADS,
        logits_all=True, verbose=False, **cache, **kwargs,
    )  # fmt: skip


def _llama_logits(llm: "llama_cpp.Llama", ids: list[int]) -> np.ndarray:
    """llama.cpp's float32 logits [T V] for exactly `ids` (llama.cpp adds no BOS to an eval)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


# --- llama.cpp's own arithmetic, emulated on our side --------------------------------------------
# ggml's CPU backend computes GELU from a table of fp16 values (so an F32 file is not float32
# end to end), and a matmul first converts its activations to the weight's "vec_dot_type": Q8_0
# blocks for Q8_0 weights, fp16 for F16 weights. Emulating these takes the rest of the difference
# down to float32 rounding, and, for Q8_0, to the rounding flips that such rounding amplifies.

_gelu, _einsum = jax.nn.gelu, jnp.einsum


def _f16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float16).astype(jnp.float32)


def _ggml_gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """ggml's GELU (GGML_GELU_FP16): the fp16 result for fp16(x), from a table; 0 below -10, x above 10."""
    assert approximate
    return jnp.where(x <= -10, 0.0, jnp.where(x >= 10, x, _f16(_gelu(_f16(x), approximate=True))))


def _q8_0_blocks(x: jax.Array) -> jax.Array:
    """ggml's quantize_row_q8_0 and back: per block of 32, d = absmax / 127, q = round(x / d), x' = q * fp16(d)."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = jnp.abs(blocks).max(-1, keepdims=True) / 127
    q = jnp.round(blocks * jnp.where(d > 0, 1 / d, 0))
    return (q * _f16(d)).reshape(x.shape)


def _ggml_einsum(eqn: str, x: jax.Array, w: jax.Array, **kwargs: Any) -> jax.Array:
    """A weight contraction (the weight's subscripts have no batch axis) sees its activations as a
    q8_0 GGUF stores that weight: Q8_0 blocks along the contraction, or fp16 where the contraction
    is not whole blocks (save_gguf, like llama.cpp's converter, stores such a matrix as F16)."""
    x_dims, w_dims = eqn.split("->")[0].split(",")
    if "B" in w_dims:  # attention: activations on both sides (an F32 KV cache)
        return _einsum(eqn, x, w, **kwargs)
    contracted = "".join(d for d in x_dims if d in w_dims)
    assert x_dims.endswith(contracted), eqn  # contracted axes trailing: they make ggml's rows
    k = math.prod(x.shape[-len(contracted) :])
    rows = x.reshape(*x.shape[: -len(contracted)], k)
    rows = _q8_0_blocks(rows) if k % 32 == 0 else _f16(rows)
    return _einsum(eqn, rows.reshape(x.shape), w, **kwargs)


def _forward_ggml(config: GemmaConfig, params: Any, ids: list[int], *, q8_0: bool = False) -> np.ndarray:
    """Our float32 logits [T V] computed with ggml's GELU, and with `q8_0` its activation rounding for a q8_0 file."""
    tokens = jnp.asarray([ids], jnp.int32)
    positions, segments = jnp.arange(len(ids))[None], jnp.ones_like(tokens)

    def forward(p: Any) -> jax.Array:
        return Transformer(config, jnp.float32).apply({"params": p}, tokens, positions, segments)[0]

    with pytest.MonkeyPatch.context() as patch:  # a fresh jit traces with the patched functions
        patch.setattr(jax.nn, "gelu", _ggml_gelu)
        if q8_0:
            patch.setattr(jnp, "einsum", _ggml_einsum)
        return np.asarray(jax.jit(forward)(params))[0]


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(max |diff| / max |logit|, top-1 agreement)."""
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    return rel, float((ours.argmax(-1) == theirs.argmax(-1)).mean())


# --- tiny random models, exported by save_gguf -------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(text_checkpoint) -> Tokenizer:
    """conftest's sentencepiece tokenizer, trained on GPL-3 (512 pieces, byte fallback, turn markers)."""
    return Tokenizer.from_file(text_checkpoint[1] / "tokenizer.model")


@pytest.fixture(scope="module")
def tiny_models(text_checkpoint, tokenizer) -> dict[str, tuple[GemmaConfig, Any]]:
    """Gemma 2 from conftest (head_dim 16, window 8, every matrix Q8_0 in a q8_0 file; post-norm weights
    near 10 make it ill-conditioned), Gemma 2 and Gemma 3 from test_gguf (head_dim 256, window 4, an
    F16 down-projection in the q8_0 files)."""
    text = gemma_jax.load(text_checkpoint[1], dtype="float32")
    return {
        "gemma2": (text.config, text.params),
        "gemma2-hd256": _tiny("gemma2", tokenizer.vocab_size),
        "gemma3": _tiny("gemma3_text", tokenizer.vocab_size),
    }


def _ids(tokenizer: Tokenizer, n: int) -> list[int]:
    return tokenizer.encode(CORPUS.read_text()[2000:], add_bos=True)[:n]


# Found with llama-cpp-python 0.3.36 (max |logit diff| / max |logit|; "gemma2" is the ill-conditioned one):
#   f32 file vs ours:                                  1.3e-3, 9.6e-5, 7.3e-5 (gemma2, gemma2-hd256, gemma3)
#   f32 file vs ours with ggml's GELU:                 1.4e-4, 3.3e-5, 2.0e-5
#   q8_0 file vs ours on its weights, ggml's rounding: 2.9e-2, 6.8e-3, 3.4e-3 (a rounding flip in one
#       Q8_0 activation block moves that block by 1/254 of its absmax: no bit-level agreement)
#   q8_0 file vs ours in f32:                          4.3e-1, 1.3e-2, 5.6e-3
F32, F32_GGML, Q8_GGML = 5e-3, 5e-4, 5e-2


@pytest.mark.parametrize("name", ["gemma2", "gemma2-hd256", "gemma3"])
def test_tiny_exports_match_llama_cpp(name, tiny_models, tokenizer, tmp_path):
    config, params = tiny_models[name]
    ids = _ids(tokenizer, 100)
    assert len(ids) == 100 and ids[0] == tokenizer.bos_id and len(ids) > 5 * config.sliding_window
    # n_batch 16: the 100 tokens go in as 7 batches, so most attention reads llama.cpp's KV cache.
    llama = lambda path: _llama(path, n_ctx=config.max_position, n_batch=16, f32_cache=True)  # noqa: E731
    f32 = save_gguf(tmp_path / "f32.gguf", config, params, tokenizer, type="f32")
    q8 = save_gguf(tmp_path / "q8_0.gguf", config, params, tokenizer, type="q8_0")
    theirs, theirs_q8 = _llama_logits(llama(f32), ids), _llama_logits(llama(q8), ids)
    ours = _forward(config, params, ids)
    ours_q8 = _forward_ggml(config, load_gguf(q8)[1], ids, q8_0=True)  # the dequantized Q8_0 weights
    got = {
        "f32 vs ours": _compare(ours, theirs),
        "f32 vs ours with ggml's GELU": _compare(_forward_ggml(config, params, ids), theirs),
        "q8_0 vs ours on its weights, ggml's rounding": _compare(ours_q8, theirs_q8),
        "q8_0 vs ours in f32": _compare(ours, theirs_q8),
        "(quantization alone: ours on the q8_0 weights, ggml's rounding, vs ours)": _compare(ours, ours_q8),
    }
    print(f"\n{name} (max |logit| {np.abs(ours).max():.1f}), max |logit diff| / max |logit| and top-1 agreement:")
    for what, (rel, agree) in got.items():
        print(f"  {what}: {rel:.1e}, {agree:.0%}")
    assert got["f32 vs ours"][0] < F32 and got["f32 vs ours"][1] == 1
    assert got["f32 vs ours with ggml's GELU"][0] < F32_GGML
    assert got["q8_0 vs ours on its weights, ggml's rounding"][0] < Q8_GGML
    # Loosely: llama.cpp's q8_0 is as far from the f32 model as quantization takes ours (within 2x).
    assert got["q8_0 vs ours in f32"][0] < 2 * _compare(ours, ours_q8)[0]


# --- the real Gemma 3 270M ---------------------------------------------------------------------
# Its packaged file is Q4_K_M. Ours runs the dequantized weights in float32; llama.cpp runs the
# quantized ones and rounds activations to 8 bits per block (Q8_K / Q8_0) in every matmul, which on
# Gemma's outlier-heavy activations moves logits by ~0.2 on average (max |logit| ~45). So:
#   - exported by us as F32, the same weights give llama.cpp our logits (~1e-3) and our greedy text;
#   - on the Q4_K_M file itself, greedy texts agree until a near-tie that this noise decides.

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The GNU General Public License is",
    "Water boils at",
    "The best way to learn a new language is",
    "In 1969, the first",
    "import numpy as np\n",
]
NEW_TOKENS = 32
# Q4_K_M: where the texts part, llama.cpp's pick is within this many logits of ours in our logits.
# Found (llama-cpp-python 0.3.36, this CPU): 3 of 8 texts equal; divergences at margins 0.01-0.45.
NEAR_TIE = 0.75


@pytest.fixture(scope="module")
def real_path() -> Path:
    return packaged_gemma3_270m()


@pytest.fixture(scope="module")
def real_ours(real_path) -> gemma_jax.Gemma:
    return gemma_jax.load(real_path, dtype="float32")


@pytest.fixture(scope="module")
def real_llama(real_path) -> "llama_cpp.Llama":
    return _llama(real_path, n_ctx=512)


@pytest.fixture(scope="module")
def real_greedy(real_ours) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, our greedy new tokens) for PROMPTS."""
    prompts = [real_ours.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    return prompts, real_ours.generate(prompts, max_new_tokens=NEW_TOKENS)


def _llama_greedy(llm: "llama_cpp.Llama", ids: list[int], stops: set[int]) -> list[int]:
    """llama.cpp's greedy continuation (its temp=0 sampler), stop token excluded, as ours."""
    new: list[int] = []
    llm.reset()
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if t in stops or len(new) == NEW_TOKENS:
            break
        new.append(t)
    return new


def test_real_tokenizer_matches_llama_cpp(real_ours, real_llama):
    tok = real_ours.tokenizer
    for text in PROMPTS + [CORPUS.read_text()]:
        assert real_llama.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, add_bos=True)


def test_real_f32_export_matches_llama_cpp(real_ours, real_greedy, tmp_path):
    """The real weights, written by save_gguf as F32: llama.cpp's logits past the 512-token sliding
    window match ours, and its greedy text equals ours on every prompt."""
    model, tok = real_ours, real_ours.tokenizer
    path = save_gguf(tmp_path / "gemma3-270m-f32.gguf", model.config, model.params, tok, type="f32")
    llm = _llama(path, n_ctx=768, f32_cache=True)
    ids = tok.encode(CORPUS.read_text(), add_bos=True)[:530]
    assert len(ids) > model.config.sliding_window
    rel, agree = _compare(_forward(model.config, model.params, ids), _llama_logits(llm, ids))
    print(f"\nreal 270M as F32 GGUF, {len(ids)} tokens: max |logit diff| / max |logit| {rel:.1e}, "
          f"top-1 agreement {agree:.1%}")  # fmt: skip
    assert rel < 3e-3 and agree == 1  # found 1.0e-3 (8e-4 on shorter texts)
    stops = set(model.stop_ids())
    for text, prompt, ours in zip(PROMPTS, *real_greedy):
        theirs = _llama_greedy(llm, prompt, stops)
        assert ours == theirs, f"{text!r}: ours {tok.decode(ours)!r}, llama.cpp {tok.decode(theirs)!r}"
        assert llm.detokenize(theirs).decode() == tok.decode(ours)
    llm.close()


def test_real_q4_k_m_greedy_matches_llama_cpp(real_ours, real_llama, real_greedy):
    """The packaged Q4_K_M file as llama.cpp runs it: the same text up to a near-tie."""
    model, tok, stops = real_ours, real_ours.tokenizer, set(real_ours.stop_ids())
    diverged = []  # (prompt text, the common prefix, our next token, llama.cpp's)
    for text, prompt, ours in zip(PROMPTS, *real_greedy):
        theirs = _llama_greedy(real_llama, prompt, stops)
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert at is not None or ours == theirs, f"{text!r}: one side stopped early"
        parted = "" if at is None else f", llama.cpp from token {at}: {tok.decode(theirs[at:])!r}"
        print(f"{text!r} -> {tok.decode(ours)!r}{parted}")
        if at is not None:
            diverged.append((text, prompt + ours[:at], ours[at], theirs[at]))
    print(f"Q4_K_M greedy: {len(PROMPTS) - len(diverged)} of {len(PROMPTS)} texts equal over {NEW_TOKENS} tokens")
    if diverged:  # our logits where the texts part, one batch
        rows = model.logits([d[1] for d in diverged])
        for (text, prefix, mine, its), logits in zip(diverged, rows):
            logits = logits[len(prefix) - 1]
            rank = int((logits > logits[its]).sum())
            print(f"  {text!r}: llama.cpp's {tok.decode([its])!r} is our #{rank + 1}, "
                  f"{logits[mine] - logits[its]:.3f} below our {tok.decode([mine])!r}")  # fmt: skip
            assert logits[mine] - logits[its] < NEAR_TIE, f"{text!r}: not a near-tie"


def _llama_logits_from(llm: "llama_cpp.Llama", ids: list[int], first: int) -> np.ndarray:
    """llama.cpp's logits [len(ids) - first, V] at positions first.. of `ids` as a fresh sequence, with
    only those rows requested (as llama-perplexity requests them: the head is most of this model's cost)."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, i >= first
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
        rows = len(ids) - first
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(rows * llm.n_vocab(),))
        return logits.reshape(rows, -1)
    finally:
        llama_cpp.llama_batch_free(batch)
        llm.n_tokens = 0  # the high-level API's view of the now-stale cache


def test_real_perplexity_matches_llama_cpp(real_ours, real_llama):
    """gemma_jax.perplexity against llama-perplexity's algorithm on llama.cpp's logits of the Q4_K_M file."""
    text, ctx = CORPUS.read_text(), 512
    ours = perplexity(real_ours, text, ctx=ctx)
    tokens = real_llama.tokenize(text.encode(), add_bos=True, special=False)  # llama-perplexity: the whole text, BOS
    first, nll = ctx // 2, []
    for start in range(0, len(tokens) // ctx * ctx, ctx):
        chunk = [real_llama.token_bos()] + tokens[start + 1 : start + ctx]  # BOS in each chunk's first slot
        logits = _llama_logits_from(real_llama, chunk, first)[:-1]  # positions first..ctx-2 predict chunk[first+1:]
        top = logits.max(-1)
        logz = top + np.log(np.exp(logits - top[:, None]).sum(-1, dtype=np.float64))
        nll.extend(logz - logits[np.arange(len(logits)), chunk[first + 1 :]])
    theirs = math.exp(np.mean(nll))
    print(f"\nperplexity of GPL-3 ({len(tokens)} tokens, ctx {ctx}, {len(nll)} scored): "
          f"ours {ours.ppl:.4f} +/- {ours.error:.4f}, llama.cpp {theirs:.4f}, ratio {ours.ppl / theirs:.5f}")  # fmt: skip
    assert ours.tokens_scored == len(nll)
    assert abs(ours.ppl / theirs - 1) < 0.01


# --- Gemma 3n (arch gemma3n): llama.cpp's converter reads the same, and llama.cpp runs our export ---
# llama.cpp (0.3.36, src/models/gemma3n.cpp) reads no Gemma 3n key but the sliding-window pattern and
# hard-codes E2B/E4B's values: 4 AltUp streams (stream 0 active), LAuReL rank 64, per-layer width 256,
# keys and values in the first 20 layers only, sparsity 0.95 on the first 10 layers, soft-cap 30. The
# smallest model it runs as transformers does has exactly those (here 5 layers, no KV sharing).
# Its activation sparsity divides the variance by F - 1 where transformers divides by F (unbiased=False).

LLAMA_CPP_SOURCE = Path(os.environ.get("LLAMA_CPP_SOURCE", "/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp"))
GET_SOURCE = ("pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36, extract it and set "
              "LLAMA_CPP_SOURCE to its vendor/llama.cpp")  # fmt: skip


def _llama_cpp_convert(hf_dir: Path, out: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (f32), with the gguf-py beside it."""
    import subprocess
    import sys

    script = LLAMA_CPP_SOURCE / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.fail(f"no llama.cpp converter at {script}: {GET_SOURCE}", pytrace=False)
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_SOURCE / "gguf-py")}
    done = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _hf_gemma3n(tmp: Path, **overrides: Any) -> tuple[Any, Path]:
    """A random tiny Gemma3nForCausalLM saved with conftest's 512-piece sentencepiece tokenizer beside it.
    Post-norms near 1, not test_gemma3n's 3: its float32 logits then agree with transformers' to 7e-6, not 8e-5,
    so that the comparisons below measure llama.cpp, not this model's conditioning."""
    import torch
    from gemma_jax.tiny import tiny_checkpoint
    from test_gemma3n import make_hf_model

    model = make_hf_model(**{"vocab_size": 512, "vocab_size_per_layer_input": 512, "laurel_rank": 64, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_" in name and "norm" in name:
                p /= 3.0
    model.save_pretrained(tmp / "hf")
    (tmp / "hf" / "tokenizer.model").write_bytes((tiny_checkpoint(tmp / "cache") / "tokenizer.model").read_bytes())
    return model, tmp / "hf"


def test_gemma3n_llama_cpp_converter_output_imports_and_matches_our_export(tmp_path):
    """The same HF checkpoint through llama.cpp's converter and through ours: the same tensors (names, shapes,
    F32 values), the same gemma3n.* keys (values equal but for the float32 sparsity quantiles, which the
    converter computes in float32 arithmetic), and our importer reads its file to transformers' logits."""
    import gguf
    import torch
    from test_gemma3n import CASES, ours

    model, hf = _hf_gemma3n(tmp_path, **CASES["altup4-share2-sparse"])
    theirs_path = _llama_cpp_convert(hf, tmp_path / "theirs.gguf")
    config, params = ours(model)
    mine_path = save_gguf(tmp_path / "ours.gguf", config, params, Tokenizer.from_file(hf / "tokenizer.model"))
    rows = [[2, 5, 9, 13, 7, 11, 40, 41, 60, 3, 500, 17, 8, 8, 99, 300]]
    with torch.no_grad():
        want = model(torch.tensor(rows)).logits.numpy()
    got = gemma_jax.load(theirs_path, dtype="float32").logits(rows)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\nllama.cpp's converter -> our importer vs transformers: max |diff| / max |logit| {err:.1e}")
    assert err < 1e-4

    theirs, mine = gguf.GGUFReader(theirs_path), gguf.GGUFReader(mine_path)
    tensors = lambda r: {t.name: t for t in r.tensors}  # noqa: E731
    assert sorted(tensors(mine)) == sorted(tensors(theirs))
    for name, t in tensors(theirs).items():
        m = tensors(mine)[name]
        assert (m.tensor_type, list(m.shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(m.data.view(np.uint8), t.data.view(np.uint8)), name
    keys = lambda r: {k: f for k, f in r.fields.items() if k.startswith("gemma3n.")}  # noqa: E731
    assert sorted(keys(mine)) == sorted(keys(theirs))
    for key, field in keys(theirs).items():
        ours_field = keys(mine)[key]
        assert ours_field.types == field.types, key
        if key == "gemma3n.activation_sparsity_scale":
            np.testing.assert_allclose(ours_field.contents(), field.contents(), rtol=1e-6)
        else:
            assert ours_field.contents() == field.contents(), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):  # the converter types user-defined pieces NORMAL, we keep them
        assert mine.fields[key].contents() == theirs.fields[key].contents(), key


def _ggml_gaussian_top_k(x: jax.Array, sparsity: float) -> jax.Array:
    """llama.cpp's activation sparsity: its fixed multiplier Φ⁻¹(0.95) in float32, the deviation over F - 1."""
    assert sparsity == 0.95, "llama.cpp runs 0.95 on the first 10 layers, whatever the file says"
    mean, std = jnp.mean(x, axis=-1, keepdims=True), jnp.std(x, axis=-1, keepdims=True, ddof=1)
    return jax.nn.relu(x - (mean + std * np.float32(1.6448533535003662)))


def _forward_3n(config: Any, params: Any, ids: list[int], *, llama_cpp: bool = False, q8_0: bool = False) -> np.ndarray:
    """Our Gemma 3n float32 logits [T V]; with `llama_cpp`, in llama.cpp's arithmetic: ggml's GELU, its
    activation sparsity, and with `q8_0` its activation rounding."""
    from gemma_jax.models.gemma3n import Transformer as Gemma3n
    from gemma_jax.models.gemma3n import model as gemma3n_model

    tokens = jnp.asarray([ids], jnp.int32)

    def forward(p: Any) -> jax.Array:
        return Gemma3n(config).apply({"params": p}, tokens, jnp.arange(len(ids))[None], jnp.ones_like(tokens))[0]

    with pytest.MonkeyPatch.context() as patch:  # a fresh jit traces with the patched functions
        if llama_cpp:
            patch.setattr(jax.nn, "gelu", _ggml_gelu)
            patch.setattr(gemma3n_model, "gaussian_top_k", _ggml_gaussian_top_k)
        if q8_0:
            patch.setattr(jnp, "einsum", _ggml_einsum)
        return np.asarray(jax.jit(forward)(params))[0]


# Found with llama-cpp-python 0.3.36 (5 layers, MLP 128, 100 tokens in batches of 16; max |logit diff| / max |logit|):
#   ours vs transformers: 7.1e-6; f32 file vs ours with llama.cpp's arithmetic: 7.8e-5 (with ggml's GELU
#   but transformers' sparsity: 4.4e-4); q8_0 file likewise: 1.7e-2; f32 file vs transformers: 7.3e-2, top-1 98%
#   (the sparsity cutoff, over 5% of 128 units, moves by sqrt(128/127) and so do the kept activations).
def test_gemma3n_export_matches_llama_cpp(tokenizer, tmp_path):
    import torch
    from test_gemma3n import ours

    layers = 5
    model, _ = _hf_gemma3n(tmp_path, vocab_size=tokenizer.vocab_size, vocab_size_per_layer_input=tokenizer.vocab_size,
                           num_hidden_layers=layers, altup_num_inputs=4, num_kv_shared_layers=0,
                           activation_sparsity_pattern=[0.95] * layers, hidden_size_per_layer_input=256, hidden_size=64,
                           intermediate_size=128, head_dim=32, num_attention_heads=2, num_key_value_heads=1, sliding_window=4)  # fmt: skip
    config, params = ours(model)
    ids = _ids(tokenizer, 100)
    assert len(ids) == 100 and len(ids) > 5 * config.sliding_window
    llama = lambda path: _llama(path, n_ctx=config.max_position, n_batch=16, f32_cache=True)  # noqa: E731
    f32 = save_gguf(tmp_path / "f32.gguf", config, params, tokenizer, type="f32")
    q8 = save_gguf(tmp_path / "q8_0.gguf", config, params, tokenizer, type="q8_0")
    theirs, theirs_q8 = _llama_logits(llama(f32), ids), _llama_logits(llama(q8), ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()[0]
    ours_f32 = _forward_3n(config, params, ids)
    got = {
        "ours vs transformers": _compare(ours_f32, want),
        "f32 vs ours with llama.cpp's arithmetic": _compare(_forward_3n(config, params, ids, llama_cpp=True), theirs),
        "q8_0 vs ours on its weights, llama.cpp's arithmetic": _compare(
            _forward_3n(config, load_gguf(q8)[1], ids, llama_cpp=True, q8_0=True), theirs_q8),
        "f32 vs transformers": _compare(want, theirs),
    }
    print(f"\ngemma3n (max |logit| {np.abs(want).max():.1f}), max |logit diff| / max |logit| and top-1 agreement:")
    for what, (rel, agree) in got.items():
        print(f"  {what}: {rel:.1e}, {agree:.0%}")
    assert got["ours vs transformers"][0] < 1e-4
    assert got["f32 vs ours with llama.cpp's arithmetic"][0] < F32_GGML and got["f32 vs transformers"][1] > 0.9
    assert got["q8_0 vs ours on its weights, llama.cpp's arithmetic"][0] < Q8_GGML
