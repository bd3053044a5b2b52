"""Google `gemma` library / Kaggle Flax checkpoints -> ours, checked against transformers.

The library cannot be installed here (see FACTS.md), so these checkpoints are built in its
layout by the test itself, from the weights of random `transformers` models: the layout below
is written from the library's module definitions, independently of `checkpoint/gemma_lib.py`.
After conversion to HF, every tensor must equal the original model's and transformers' logits
must be the original model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from conftest import make_hf_model, tiny_tokenizer_model
from test_convert import assert_same_bits, hf_tensors

from gemma_jax import configs
from gemma_jax.checkpoint.gemma_lib import match_preset
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.convert import convert
from gemma_jax.checkpoint import detect_format

PAD_ROWS = 27  # Google's embeddings have unused rows past HF's vocab (256128 vs 256000)
CASES = {  # name: (model_type, config overrides, gating transposed, Kaggle's flat layout, dtype)
    "gemma2-gqa-flat": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=2), False, True, torch.bfloat16),
    "gemma2-gqa-transposed-nested": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=2), True, False, torch.float32),
    "gemma1-mqa-flat": ("gemma", dict(num_attention_heads=4, num_key_value_heads=1), False, True, torch.float32),
    "gemma1-mha-qkv-flat": ("gemma", dict(num_attention_heads=4, num_key_value_heads=4), False, True, torch.bfloat16),
    "gemma3-qknorm-nested": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=1), True, False, torch.float32),
}


def _google_params(model: transformers.PreTrainedModel, transposed: bool) -> dict[str, np.ndarray]:
    """The library's nested param tree, as '/'-joined names, from a transformers model's weights."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    c = model.config
    N, K, H, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    heads = lambda w, n: w.reshape(n, H, D).transpose(0, 2, 1)  # HF [n*H, D] -> [n, D, H]
    pad = np.random.default_rng(0).standard_normal((PAD_ROWS, D), np.float32)
    out = {"embedder/input_embedding": np.concatenate([sd["model.embed_tokens.weight"], pad]),
           "final_norm/scale": sd["model.norm.weight"]}  # fmt: skip
    for i in range(c.num_hidden_layers):
        p, g = f"model.layers.{i}.", f"layer_{i}/"
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        if K == N:  # the library fuses q, k and v when every head has its own kv
            out[g + "attn/qkv_einsum/w"] = np.stack([heads(q, N), heads(k, K), heads(v, K)])
        else:
            out[g + "attn/q_einsum/w"] = heads(q, N)
            out[g + "attn/kv_einsum/w"] = np.stack([heads(k, K), heads(v, K)])
        out[g + "attn/attn_vec_einsum/w"] = sd[p + "self_attn.o_proj.weight"].T.reshape(N, H, D)
        gate, up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]  # [F, D]
        out[g + "mlp/gating_einsum"] = np.stack([gate, up]) if transposed else np.stack([gate.T, up.T])
        out[g + "mlp/linear"] = sd[p + "mlp.down_proj.weight"].T
        out[g + "pre_attention_norm/scale"] = sd[p + "input_layernorm.weight"]
        if c.model_type == "gemma":  # Gemma 1: HF's post_attention_layernorm is the pre-MLP norm
            out[g + "pre_ffw_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
        else:
            out[g + "post_attention_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
            out[g + "pre_ffw_norm/scale"] = sd[p + "pre_feedforward_layernorm.weight"]
            out[g + "post_ffw_norm/scale"] = sd[p + "post_feedforward_layernorm.weight"]
        if c.model_type == "gemma3_text":
            out[g + "attn/_query_norm/scale"] = sd[p + "self_attn.q_norm.weight"]
            out[g + "attn/_key_norm/scale"] = sd[p + "self_attn.k_norm.weight"]
    return out


def _arrange(params: dict[str, np.ndarray], flat: bool, dtype: np.dtype) -> dict:
    """Kaggle's flat tree ({"transformer/layer_0/mlp/linear": {"w": ...}}) or the library's nested one."""
    tree: dict = {}
    for name, x in params.items():
        x = x.astype(dtype)
        if flat:
            module, leaf = name.rsplit("/", 1) if not name.endswith(("gating_einsum", "linear")) else (name, "w")
            tree.setdefault(f"transformer/{module}", {})[leaf] = x
        else:
            *path, leaf = name.split("/")
            node = tree
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = x
    return tree


@pytest.mark.parametrize("case", list(CASES))
def test_google_checkpoint_converts_to_what_transformers_had(case: str, tmp_path: Path) -> None:
    model_type, overrides, transposed, flat, dtype = CASES[case]
    model = make_hf_model(model_type, **overrides).to(dtype)
    np_dtype = np.dtype("bfloat16") if dtype == torch.bfloat16 else np.dtype(np.float32)
    ckpt = tmp_path / "kaggle" / "ckpt"
    ocp.PyTreeCheckpointer().save(ckpt, _arrange(_google_params(model, transposed), flat, np_dtype))
    tokenizer = tiny_tokenizer_model(model.config.vocab_size)
    (tmp_path / "kaggle" / "tokenizer.model").write_bytes(tokenizer)  # Kaggle puts it beside the checkpoint
    model.save_pretrained(tmp_path / "reference")
    assert detect_format(ckpt) == "gemma-lib"

    config = GemmaConfig.from_hf(model.config.to_dict())
    convert(ckpt, tmp_path / "hf", to="hf", config=config, quiet=True)
    assert_same_bits(hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "reference"))
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer

    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.tensor(np.random.RandomState(0).randint(3, model.config.vocab_size, (2, 20)))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "hf")(tokens).logits, load(tmp_path / "reference")(tokens).logits)


def test_config_is_found_among_the_presets_by_shapes() -> None:
    def google_shapes(c: GemmaConfig, rows: int, transposed: bool) -> dict[str, tuple[int, ...]]:
        N, K, D, H, F = c.num_heads, c.num_kv_heads, c.embed_dim, c.head_dim, c.mlp_dim
        shapes = {"embedder/input_embedding": (rows, D), "final_norm/scale": (D,)}
        for i in range(c.num_layers):
            g = f"layer_{i}/"
            if K == N:
                shapes[g + "attn/qkv_einsum/w"] = (3, N, D, H)
            else:
                shapes |= {g + "attn/q_einsum/w": (N, D, H), g + "attn/kv_einsum/w": (2, K, D, H)}
            shapes |= {g + "attn/attn_vec_einsum/w": (N, H, D), g + "mlp/linear": (F, D),
                       g + "mlp/gating_einsum": (2, F, D) if transposed else (2, D, F)}  # fmt: skip
            norms = ["pre_attention_norm", "pre_ffw_norm"] + ["post_attention_norm", "post_ffw_norm"] * c.use_post_norms
            shapes |= {g + f"{n}/scale": (D,) for n in norms}
            if c.use_qk_norm:
                shapes |= {g + "attn/_query_norm/scale": (H,), g + "attn/_key_norm/scale": (H,)}
        return shapes

    for name, transposed in [("gemma2-2b", False), ("gemma2-9b", True), ("gemma2-27b", True), ("gemma-7b", False)]:
        preset = GemmaConfig.from_preset(name)
        assert name in configs.model_preset_names()
        assert match_preset(google_shapes(preset, 256128, transposed), "ckpt") == preset
    shapes = google_shapes(GemmaConfig.from_preset("gemma2-9b"), 256128, True)
    del shapes["layer_41/mlp/linear"]
    with pytest.raises(ValueError, match="ckpt: gemma-library checkpoints store no config and no shipped preset matches"):
        match_preset(shapes, "ckpt")
