"""int8 matmuls for quantized Gemma: Pallas kernels (TPU: Mosaic, GPU: Triton) and the plain-XLA reference.

`w8a8_matmul` / `w8a16_matmul` take float activations and int8 weights with per-output-channel
float32 scales; `int8_einsum` maps a projection's einsum onto them; a `Kernels` value says which
implementation runs (see `backend`).
"""

from gemma_jax.kernels.backend import INT8_BACKENDS, Kernels
from gemma_jax.kernels.dispatch import Split, split_of, w8a8_matmul, w8a16_matmul
from gemma_jax.kernels.einsum import SCHEMES, int8_einsum, projection_dims
from gemma_jax.kernels.reference import quantize_rows

__all__ = [
    "INT8_BACKENDS", "Kernels", "SCHEMES", "Split", "int8_einsum", "projection_dims", "quantize_rows", "split_of",
    "w8a8_matmul", "w8a16_matmul",
]  # fmt: skip
