"""Every parameter of the Gemma 1/2/3 text decoder: our path and shape, logical axes, and its name
and layout in Hugging Face and GGUF checkpoints (see `gemma_jax.models.family.Param`).

Dimension letters: V vocab, D embed, F mlp, N heads, K kv heads, H head_dim, L labels. Gemma 1 has no
post-norms, and HF calls its pre-MLP norm `post_attention_layernorm`; in Gemma 2/3 that same HF
name is the norm *after* attention (and GGUF's `ffn_norm` is the pre-MLP norm in all three).
SmoothQuant (`smooth_from`): q/k/v read the pre-attention norm and gate/up the pre-MLP norm; o
reads the attention output, linear in v's output channels, and down reads gelu(gate) * up,
linear in up's output channels.
"""

from __future__ import annotations

from gemma_jax.models.family import Param
from gemma_jax.models.heads import SCORE_AXES

Z = "zero_centred"  # Gemma's RMSNorm multiplies by (1 + w)
# fmt: off
SCHEMA: tuple[Param, ...] = (
    Param("embedder/embedding", "V D", ("vocab", "embed"), "model.embed_tokens.weight", "V D", "token_embd.weight", int8_in=1),
    Param("layer_{i}/pre_attn_norm/scale", "D", ("norm",), "model.layers.{i}.input_layernorm.weight", "D",
          "blk.{i}.attn_norm.weight", norm=Z),
    Param("layer_{i}/attn/q/w", "N H D", ("q_heads", "head_dim", "embed"), "model.layers.{i}.self_attn.q_proj.weight", "NH D",
          "blk.{i}.attn_q.weight", int8_in=1, linear=True, smooth_from="layer_{i}/pre_attn_norm/scale"),
    Param("layer_{i}/attn/k/w", "K H D", ("kv_heads", "head_dim", "embed"), "model.layers.{i}.self_attn.k_proj.weight", "KH D",
          "blk.{i}.attn_k.weight", int8_in=1, linear=True, smooth_from="layer_{i}/pre_attn_norm/scale"),
    Param("layer_{i}/attn/v/w", "K H D", ("kv_heads", "head_dim", "embed"), "model.layers.{i}.self_attn.v_proj.weight", "KH D",
          "blk.{i}.attn_v.weight", int8_in=1, linear=True, smooth_from="layer_{i}/pre_attn_norm/scale"),
    Param("layer_{i}/attn/o/w", "D N H", ("embed", "q_heads", "head_dim"), "model.layers.{i}.self_attn.o_proj.weight", "D NH",
          "blk.{i}.attn_output.weight", int8_in=2, linear=True, smooth_from="layer_{i}/attn/v/w"),
    Param("layer_{i}/attn/q_norm/scale", "H", ("norm",), "model.layers.{i}.self_attn.q_norm.weight", "H",
          "blk.{i}.attn_q_norm.weight", norm=Z, when="qk_norm"),
    Param("layer_{i}/attn/k_norm/scale", "H", ("norm",), "model.layers.{i}.self_attn.k_norm.weight", "H",
          "blk.{i}.attn_k_norm.weight", norm=Z, when="qk_norm"),
    Param("layer_{i}/post_attn_norm/scale", "D", ("norm",), "model.layers.{i}.post_attention_layernorm.weight", "D",
          "blk.{i}.post_attention_norm.weight", norm=Z, when="post_norms"),
    Param("layer_{i}/pre_ffw_norm/scale", "D", ("norm",), "model.layers.{i}.pre_feedforward_layernorm.weight", "D",
          "blk.{i}.ffn_norm.weight", norm=Z, when="post_norms"),
    Param("layer_{i}/pre_ffw_norm/scale", "D", ("norm",), "model.layers.{i}.post_attention_layernorm.weight", "D",
          "blk.{i}.ffn_norm.weight", norm=Z, when="no_post_norms"),
    Param("layer_{i}/mlp/gate/w", "F D", ("mlp", "embed"), "model.layers.{i}.mlp.gate_proj.weight", "F D",
          "blk.{i}.ffn_gate.weight", int8_in=1, linear=True, smooth_from="layer_{i}/pre_ffw_norm/scale"),
    Param("layer_{i}/mlp/up/w", "F D", ("mlp", "embed"), "model.layers.{i}.mlp.up_proj.weight", "F D",
          "blk.{i}.ffn_up.weight", int8_in=1, linear=True, smooth_from="layer_{i}/pre_ffw_norm/scale"),
    Param("layer_{i}/mlp/down/w", "D F", ("embed", "mlp"), "model.layers.{i}.mlp.down_proj.weight", "D F",
          "blk.{i}.ffn_down.weight", int8_in=1, linear=True, smooth_from="layer_{i}/mlp/up/w"),
    Param("layer_{i}/post_ffw_norm/scale", "D", ("norm",), "model.layers.{i}.post_feedforward_layernorm.weight", "D",
          "blk.{i}.post_ffw_norm.weight", norm=Z, when="post_norms"),
    Param("final_norm/scale", "D", ("norm",), "model.norm.weight", "D", "output_norm.weight", norm=Z),
    # A classifier's head (gemma_jax/models/heads.py): float under int8, and not in GGUF (llama.cpp has no such tensor).
    Param("score/w", "L D", SCORE_AXES, "score.weight", "L D", when="classifier"),
    Param("score/b", "L", SCORE_AXES[:1], "score.bias", "L", when="score_bias"),
)
# fmt: on
WHEN = {
    "post_norms": lambda c: c.use_post_norms,
    "no_post_norms": lambda c: not c.use_post_norms,
    "qk_norm": lambda c: c.use_qk_norm,
    "classifier": lambda c: not c.head.is_lm,
    "score_bias": lambda c: c.head.bias,
}


def dims(config, layer: int | None = None) -> dict[str, int]:
    """Dimension letter -> size (every layer of this family has the same sizes)."""
    return dict(V=config.vocab_size, D=config.embed_dim, F=config.mlp_dim,
                N=config.num_heads, K=config.num_kv_heads, H=config.head_dim, L=config.head.num_labels)  # fmt: skip
