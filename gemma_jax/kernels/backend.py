"""Which kernels a traced program runs, and on what mesh: one frozen value, never module state.

`Kernels` travels with the model (a field of every module that calls a kernel or pins a layout)
and is part of the static argument of every `jax.jit` (see `gemma_jax.runtime.Runtime`), so two
calls asking for different backends or meshes are two compiled programs, each exactly what its
caller asked for, and nothing read at trace time can differ from what the cache key says.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from gemma_jax.sharding import Layout, constrain

INT8_BACKENDS = ("xla", "tpu", "gpu")  # int8 matmuls: plain XLA, Mosaic (TPU), Triton (GPU)
# attention: XLA; "splash": Pallas on TPU (splash attention, ragged paged decode); "gpu": Pallas paged decode on GPU
ATTENTION = ("xla", "splash", "gpu")
INT8_ENV = "GEMMA_JAX_INT8_BACKEND"  # read once, when `for_platform` builds the value, never while tracing
ATTENTION_ENV = "GEMMA_JAX_ATTENTION"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The backends and activation layout of a traced program (hashable: a jit static argument).

    The default is the portable choice (XLA everywhere, one device); `for_platform` picks the
    fast one for the device at hand. `interpret` runs Pallas kernels in interpret mode (how CPU
    tests check them); off on a CPU, they lower for real, for `jax.export` to a TPU or GPU.
    """

    layout: Layout | None = None  # activations are pinned to it (None: one device, no constraints)
    int8: str = "xla"
    attention: str = "xla"
    interpret: bool = False

    def __post_init__(self) -> None:
        if self.int8 not in INT8_BACKENDS:
            raise ValueError(f"unknown int8 backend {self.int8!r}; choose one of {', '.join(INT8_BACKENDS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention implementation {self.attention!r}; choose one of {', '.join(ATTENTION)}")

    @classmethod
    def for_platform(
        cls, layout: Layout | None = None, *, int8: str | None = None, attention: str | None = None,
        interpret: bool | None = None,
    ) -> Kernels:  # fmt: skip
        """The defaults for the first device: Mosaic int8 on TPU v5e and later and splash attention on TPU,
        XLA elsewhere; `$GEMMA_JAX_INT8_BACKEND` and `$GEMMA_JAX_ATTENTION` override them (the GPU paged
        decode kernel is opt-in until timed on a GPU). Arguments override both."""
        device = jax.devices()[0]
        return cls(
            layout=layout,
            int8=int8 or os.environ.get(INT8_ENV) or platform_default(device.platform, device.device_kind),
            attention=attention or os.environ.get(ATTENTION_ENV) or ("splash" if device.platform == "tpu" else "xla"),
            interpret=device.platform == "cpu" if interpret is None else interpret,
        )

    @property
    def mesh_layout(self) -> Layout | None:
        """The layout when it spans more than one device: where GSPMD partitions what is traced."""
        return self.layout if self.layout is not None and self.layout.mesh.size > 1 else None

    @property
    def cpu_unsharded(self) -> bool:
        """Whether the program runs on one CPU device, where the CPU-specific orderings of `layers.project`
        and `sampling.argmax` pay off (on a mesh, GSPMD partitions the plain forms)."""
        return jax.default_backend() == "cpu" and self.mesh_layout is None

    def constrain(self, x: jax.Array, axes) -> jax.Array:
        """Pin an activation's layout by logical axis names (identity without a layout)."""
        return constrain(x, axes, self.layout)


def platform_default(platform: str, device_kind: str) -> str:
    """Pallas on TPU v5e and later; XLA on TPU v4 (no int8 MXU speed-up), on GPU until the Triton kernel is
    measured against XLA's cuBLASLt int8 path, and on CPU."""
    return "tpu" if platform == "tpu" and "v4" not in device_kind.lower() else "xla"
