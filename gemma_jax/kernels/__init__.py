"""int8 matmuls for quantized Gemma: Pallas kernels (TPU: Mosaic, GPU: Triton) and the plain-XLA reference.

`w8a8_matmul` / `w8a16_matmul` take float activations and int8 weights with per-output-channel
float32 scales; `int8_einsum` maps a projection's einsum onto them; `use_backend` overrides
which implementation runs (see `dispatch`).
"""

from gemma_jax.kernels.dispatch import BACKENDS, Split, resolve_backend, split_of, use_backend, w8a8_matmul, w8a16_matmul
from gemma_jax.kernels.einsum import SCHEMES, int8_einsum, projection_dims
from gemma_jax.kernels.reference import quantize_rows

__all__ = [
    "BACKENDS", "SCHEMES", "Split", "int8_einsum", "projection_dims", "quantize_rows", "resolve_backend", "split_of", "use_backend",
    "w8a8_matmul", "w8a16_matmul",
]  # fmt: skip
