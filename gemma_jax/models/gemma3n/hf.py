"""Our params from Hugging Face `Gemma3nForCausalLM` tensors and back: the schema's reshapes, in memory
(checkpoint files go through gemma_jax.checkpoint, which reads the same schema)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gemma_jax.models.family import check_shapes
from gemma_jax.models.gemma3n import FAMILY, Gemma3nConfig


def params_from_hf(config: Gemma3nConfig, tensors: Mapping[str, Any]) -> dict:
    """Our params pytree (numpy) from HF tensors by name (a multimodal checkpoint's `model.language_model.`
    prefix mapped to `model.` first). Names the schema does not hold are refused, except `lm_head.weight`
    (tied to the embedding) and the k/v projections and k norm that KV-sharing layers never use."""
    specs = FAMILY.tensor_specs(config)
    unused = lambda name: name == "lm_head.weight" or (name.startswith("model.layers.") and name.split(".")[3] == "self_attn"
                                                       and name.split(".")[4] in ("k_proj", "v_proj", "k_norm"))  # fmt: skip
    found = {name: np.shape(x) for name, x in tensors.items() if name in specs or not unused(name)}
    check_shapes(found, {name: spec.hf_shape for name, spec in specs.items()}, "Gemma 3n tensors")
    return unflatten_dict({spec.path: spec.to_ours(np.asarray(tensors[name])) for name, spec in specs.items()})


def params_to_hf(config: Gemma3nConfig, params: Any) -> dict[str, np.ndarray]:
    """HF tensors by name (contiguous numpy, HF's order) from our params pytree."""
    flat = flatten_dict(params)
    return {name: spec.to_hf(np.asarray(flat[spec.path])) for name, spec in FAMILY.tensor_specs(config).items()}
