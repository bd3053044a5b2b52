"""How a Google `gemma`-library (Kaggle Flax) checkpoint's tensors become this family's parameters.

Layouts (N heads, K kv heads, D embed, H head_dim, F mlp, V vocab), from the library's modules:

    embedder/input_embedding     [V', D]     V' >= V: 256128 rows for 256000 tokens (padding rows, dropped)
    attn/q_einsum/w              [N, D, H]   with kv_einsum/w [2, K, D, H] (k, v), when K < N
    attn/qkv_einsum/w            [3, N, D, H] when K == N (Gemma 1 7B)
    attn/attn_vec_einsum/w       [N, H, D]   our o is [D, N, H]
    attn/_query_norm, _key_norm  [H]         Gemma 3 QK-norm
    mlp/gating_einsum            [2, D, F], or [2, F, D] ("transposed": Gemma 2 9B/27B); [0] gate, [1] up
    mlp/linear                   [F, D]      our down is [D, F]
    pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm, final_norm: scale [D]

Norm scales mean `1 + scale`, as in HF and ours, and RoPE is split-half in both, so nothing else
changes. Names are the format reader's canonical '/'-joined ones (`checkpoint/gemma_lib.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from gemma_jax.models.family import ParamPath, check_shapes
from gemma_jax.models.gemma.config import GemmaConfig

Shape = tuple[int, ...]
Transform = Callable[[np.ndarray], np.ndarray]
_NORMS = {"pre_attn_norm": "pre_attention_norm", "post_attn_norm": "post_attention_norm",
          "pre_ffw_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm"}  # fmt: skip
MLP_WEIGHTS = ("gating_einsum", "linear")  # stored without a "w" level in nested checkpoints
EMBEDDING = "embedder/input_embedding"  # what every checkpoint of the library holds


def recipe(config: GemmaConfig, shapes: Mapping[str, Shape], where: str) -> dict[ParamPath, tuple[str, Transform]]:
    """For each of our params: the stored tensor it comes from and how to get it into our layout.

    Checks the stored names and shapes against `config` first (raising ValueError on any difference).
    Where the library has two layouts (qkv vs q + kv, transposed gating or not), `shapes` decides.
    """
    N, K, D, H, F, V = (config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim,
                        config.mlp_dim, config.vocab_size)  # fmt: skip
    rows = shapes.get("embedder/input_embedding", (0,))[0]
    if rows < V:
        raise ValueError(f"{where}: the embedding has {rows} rows, fewer than the config's vocab_size {V}")
    gating = shapes.get("layer_0/mlp/gating_einsum")
    transposed = gating == (2, F, D)
    if transposed and F == D:
        raise ValueError(f"{where}: mlp_dim == embed_dim, so the gating einsum's layout is ambiguous")
    fused = "layer_0/attn/qkv_einsum/w" in shapes
    heads = lambda t: t.transpose(0, 2, 1)  # [heads, D, H] -> [heads, H, D]
    gate_up = (lambda i: lambda x: x[i]) if transposed else (lambda i: lambda x: x[i].T)  # -> [F, D]

    expected: dict[str, Shape] = {"embedder/input_embedding": (rows, D), "final_norm/scale": (D,)}
    recipe: dict[ParamPath, tuple[str, Transform]] = {
        ("embedder", "embedding"): ("embedder/input_embedding", lambda x: x[:V]),
        ("final_norm", "scale"): ("final_norm/scale", lambda x: x),
    }
    for i in range(config.num_layers):
        g, ours = f"layer_{i}/", f"layer_{i}"
        if fused:
            expected[g + "attn/qkv_einsum/w"] = (3, N, D, H)
            qkv = [(g + "attn/qkv_einsum/w", lambda x, j=j: heads(x[j])) for j in range(3)]
        else:
            expected[g + "attn/q_einsum/w"] = (N, D, H)
            expected[g + "attn/kv_einsum/w"] = (2, K, D, H)
            qkv = [(g + "attn/q_einsum/w", heads)] + [(g + "attn/kv_einsum/w", lambda x, j=j: heads(x[j])) for j in range(2)]
        for name, entry in zip("qkv", qkv):
            recipe[(ours, "attn", name, "w")] = entry
        expected[g + "attn/attn_vec_einsum/w"] = (N, H, D)
        recipe[(ours, "attn", "o", "w")] = (g + "attn/attn_vec_einsum/w", lambda x: x.transpose(2, 0, 1))
        if config.use_qk_norm:
            for name, stored in (("q_norm", "_query_norm"), ("k_norm", "_key_norm")):
                expected[g + f"attn/{stored}/scale"] = (H,)
                recipe[(ours, "attn", name, "scale")] = (g + f"attn/{stored}/scale", lambda x: x)
        expected[g + "mlp/gating_einsum"] = (2, F, D) if transposed else (2, D, F)
        expected[g + "mlp/linear"] = (F, D)
        recipe[(ours, "mlp", "gate", "w")] = (g + "mlp/gating_einsum", gate_up(0))
        recipe[(ours, "mlp", "up", "w")] = (g + "mlp/gating_einsum", gate_up(1))
        recipe[(ours, "mlp", "down", "w")] = (g + "mlp/linear", lambda x: x.T)
        for name, stored in _NORMS.items():
            if config.use_post_norms or not name.startswith("post"):
                expected[g + f"{stored}/scale"] = (D,)
                recipe[(ours, name, "scale")] = (g + f"{stored}/scale", lambda x: x)
    check_shapes(shapes, expected, f"{where} (as a {config.model_type} gemma-library checkpoint)")
    return recipe
