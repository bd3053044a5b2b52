"""The embedded demo checkpoint: a tiny *random* Gemma 2 with a tokenizer trained on the fly.

It lets `gemma-jax generate` run on a fresh machine with no downloads. Its weights are random,
so its text is gibberish: it demonstrates the pipeline, not the model. It is written once, as
a Hugging Face directory, into ~/.cache/gemma_jax (or $GEMMA_JAX_CACHE).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from gemma_jax.compile_cache import cache_root
from gemma_jax.checkpoint.hf import save_hf
from gemma_jax.models import init_params
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.tokenizer import train_sentencepiece

TINY_NAME = "tiny"
_CORPUS = Path("/usr/share/common-licenses/GPL-3")  # present on Debian; the package sources otherwise


def tiny_config(vocab_size: int) -> GemmaConfig:
    return GemmaConfig(
        model_type="gemma2", vocab_size=vocab_size, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, mlp_dim=256, query_pre_attn_scalar=32, layer_pattern=("local", "global"), sliding_window=64,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_norms=True, max_position=2048,
    )  # fmt: skip


def tiny_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the tiny demo checkpoint, creating it (atomically) on first use."""
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / "tiny-gemma2-random-v2"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        lines = _CORPUS.read_text().splitlines() if _CORPUS.exists() else _package_text()
        tokenizer = train_sentencepiece(lines, Path(tmp) / "tokenizer.model", vocab_size=512)
        config = tiny_config(tokenizer.vocab_size)
        params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
        try:
            save_hf(target, config, params, tokenizer_model=Path(tmp) / "tokenizer.model")
        except FileExistsError:  # another process (e.g. a multi-process launch) got there first
            pass
    return target


def _package_text() -> list[str]:
    return [line for f in sorted(Path(__file__).parent.glob("*.py")) for line in f.read_text().splitlines()]
