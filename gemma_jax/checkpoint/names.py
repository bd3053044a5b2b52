"""The one table mapping Hugging Face Gemma tensor names and layouts to our parameter pytree.

Loading and saving both read `_TABLE`, so the two directions cannot drift apart: each row
gives the HF name, our path, both shapes (as dimension letters) and whether HF stores the
tensor as a torch ``Linear`` weight (the projections, which compressed-tensors quantizes).
Our weights keep HF's ``[out, in]`` order with the head dims split out (q ``[N*H, D]`` is our
``[N, H, D]``), so converting either way is a reshape, never a transpose.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gemma_jax.config import GemmaConfig

ParamPath = tuple[str, ...]

# Dimension letters: V vocab, D embed, F mlp, N heads, K kv heads, H head_dim, L labels; "NH" = N*H.
# `when`: the row exists only for configs meeting this condition (see _WHEN; None: always).
# Gemma 1 has no post-norms, and HF calls its pre-MLP norm `post_attention_layernorm`;
# in Gemma 2/3 that same HF name is the norm *after* attention.
# fmt: off
_TABLE: tuple[tuple[str, str, str, str, bool, str | None], ...] = (
    # HF name template                                      our path template                 HF      ours     Linear when
    ("model.embed_tokens.weight",                           "embedder/embedding",              "V D",  "V D",   False,  None),
    ("model.layers.{i}.input_layernorm.weight",             "layer_{i}/pre_attn_norm/scale",   "D",    "D",     False,  None),
    ("model.layers.{i}.self_attn.q_proj.weight",            "layer_{i}/attn/q/w",              "NH D", "N H D", True,   None),
    ("model.layers.{i}.self_attn.k_proj.weight",            "layer_{i}/attn/k/w",              "KH D", "K H D", True,   None),
    ("model.layers.{i}.self_attn.v_proj.weight",            "layer_{i}/attn/v/w",              "KH D", "K H D", True,   None),
    ("model.layers.{i}.self_attn.o_proj.weight",            "layer_{i}/attn/o/w",              "D NH", "D N H", True,   None),
    ("model.layers.{i}.self_attn.q_norm.weight",            "layer_{i}/attn/q_norm/scale",     "H",    "H",     False,  "qk_norm"),
    ("model.layers.{i}.self_attn.k_norm.weight",            "layer_{i}/attn/k_norm/scale",     "H",    "H",     False,  "qk_norm"),
    ("model.layers.{i}.post_attention_layernorm.weight",    "layer_{i}/post_attn_norm/scale",  "D",    "D",     False,  "post_norms"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight",   "layer_{i}/pre_ffw_norm/scale",    "D",    "D",     False,  "post_norms"),
    ("model.layers.{i}.post_attention_layernorm.weight",    "layer_{i}/pre_ffw_norm/scale",    "D",    "D",     False,  "no_post_norms"),
    ("model.layers.{i}.mlp.gate_proj.weight",               "layer_{i}/mlp/gate/w",            "F D",  "F D",   True,   None),
    ("model.layers.{i}.mlp.up_proj.weight",                 "layer_{i}/mlp/up/w",              "F D",  "F D",   True,   None),
    ("model.layers.{i}.mlp.down_proj.weight",               "layer_{i}/mlp/down/w",            "D F",  "D F",   True,   None),
    ("model.layers.{i}.post_feedforward_layernorm.weight",  "layer_{i}/post_ffw_norm/scale",   "D",    "D",     False,  "post_norms"),
    ("model.norm.weight",                                   "final_norm/scale",                "D",    "D",     False,  None),
    ("score.weight",                                        "score/w",                         "L D",  "L D",   False,  "classifier"),
    ("score.bias",                                          "score/b",                         "L",    "L",     False,  "score_bias"),
)
# fmt: on
_WHEN = {
    None: lambda c: True,
    "post_norms": lambda c: c.use_post_norms,
    "no_post_norms": lambda c: not c.use_post_norms,
    "qk_norm": lambda c: c.use_qk_norm,
    "classifier": lambda c: not c.head.is_lm,  # a classification head (see models/heads.py), kept in float
    "score_bias": lambda c: c.head.bias,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One table row resolved for a config (and layer): names, shapes and the layout conversion."""

    hf_name: str
    path: ParamPath
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    linear: bool

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """HF layout -> ours, C-contiguous so later device transfers and saves see plain memory."""
        return np.ascontiguousarray(x.reshape(self.shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Ours -> HF layout, C-contiguous: safetensors writes raw memory and ignores strides."""
        return np.ascontiguousarray(x.reshape(self.hf_shape))


def _shape(spec: str, dims: dict[str, int]) -> tuple[int, ...]:
    """"NH D" -> (N*H, D): a word of letters is the product of those dimensions."""
    return tuple(math.prod(dims[c] for c in word) for word in spec.split())


def check_layer_count(config: GemmaConfig, stored: int, where: object) -> None:
    """Refuse a config with more layers than the checkpoint stores tensors, before anything is built per layer.

    The layer count comes from a header: four edited bytes can make it 10^9, and the tables built
    per layer (ours, gguf's name map) would then fill the memory. Every layer has several tensors,
    so a true config never has more layers than its checkpoint has tensors; smaller mismatches are
    then reported tensor by tensor.
    """
    if config.num_layers > stored:
        raise ValueError(f"{where}: the config says {config.num_layers} layers, "
                         f"but the checkpoint holds only {stored} tensors")  # fmt: skip


def tensor_specs(config: GemmaConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint for `config` holds, keyed by HF name, in HF's layer order."""
    dims = dict(V=config.vocab_size, D=config.embed_dim, F=config.mlp_dim,
                N=config.num_heads, K=config.num_kv_heads, H=config.head_dim, L=config.head.num_labels)

    specs = [
        TensorSpec(hf.format(i=i), tuple(ours.format(i=i).split("/")), _shape(hf_shape, dims), _shape(shape, dims), linear)
        for hf, ours, hf_shape, shape, linear, when in _TABLE
        if _WHEN[when](config)
        for i in (range(config.num_layers) if "{i}" in hf else [None])
    ]
    # HF's order (embedding, layer by layer, final norm) so that shards hold whole layers;
    # the sort is stable, keeping table order within a layer.
    return {s.hf_name: s for s in sorted(specs, key=lambda s: _position(s.path, config.num_layers))}


def _position(path: ParamPath, num_layers: int) -> int:
    head = path[0]
    if head.startswith("layer_"):
        return int(head.removeprefix("layer_"))
    return -1 if head == "embedder" else num_layers


def expected_hf_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for checking a checkpoint is complete and matches `config`."""
    return {name: s.hf_shape for name, s in tensor_specs(config).items()}
