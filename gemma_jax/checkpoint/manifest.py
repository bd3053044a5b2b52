"""Checksums of the checkpoints we write, checked when they are read: damage is an error, never silent.

Every checkpoint we write (converted and quantized Orbax directories, fine-tuning checkpoints,
exports) carries a manifest: each tensor's dtype, shape and checksum, and the SHA-256 of each
small file beside the tensors (our config, the tokenizer). Orbax keeps no checksum of its own:
without one, flipped bytes in a data file load as silently different weights.

The checksum is computed by XLA on the tensor as it sits in memory, host or device, sharded or
not: two sums modulo 2**32 over the tensor's stored bits (as unsigned words), each word weighted
by an odd number drawn from its position. Any change of one word changes both sums, moving or
swapping words changes them too, and integer sums do not depend on how the tensor is split over
devices or in which order the parts are added, so a tensor saved from one mesh checks on
another. It guards against damage, not against tampering (it is not cryptographic). A
tensor loaded in a wider dtype (bfloat16 stored, float32 loaded) is checked by casting it back,
which is exact.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST_FILE = "checksums.json"
FORMAT, VERSION, ALGORITHM = "gemma_jax-checksums", 1, "wsum32x2"
Entry = dict[str, Any]  # {"dtype": "bfloat16", "shape": [2, 3], "checksum": "0123456789abcdef"}
_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}  # item size -> the unsigned word its bits are read as


def tensor_entry(x: Any) -> Entry:
    """The manifest entry of array `x` (numpy or jax, any sharding): its dtype, shape and checksum."""
    return {"dtype": np.dtype(x.dtype).name, "shape": list(x.shape), "checksum": checksum(x)}


def checksum(x: Any, dtype: Any = None) -> str:
    """16 hex digits: the two position-weighted sums of `x`'s bits as `dtype` (default: its own dtype)."""
    dtype = np.dtype(dtype or x.dtype)
    if dtype.itemsize not in _WORDS:
        raise ValueError(f"no checksum for {dtype} tensors")
    a, b = np.asarray(_sums(x, dtype=dtype))
    return f"{int(a):08x}{int(b):08x}"


@functools.partial(jax.jit, static_argnames="dtype")
def _sums(x: jax.Array, dtype: np.dtype) -> jax.Array:
    words = jax.lax.bitcast_convert_type(x.astype(dtype), _WORDS[dtype.itemsize]).astype(jnp.uint32)
    strides = np.cumprod((1, *x.shape[::-1]))[:-1][::-1] if x.ndim else ()
    index = sum((jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(s % 2**32) for d, s in enumerate(strides)),
                jnp.zeros(x.shape, jnp.uint32))  # fmt: skip
    spread = (index + np.uint32(1)) * np.uint32(0x9E3779B9)  # golden-ratio hashing of the position
    rotated = (words << 13) | (words >> 19)
    return jnp.stack([jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32),
                      jnp.sum(rotated * (spread | np.uint32(1)), dtype=jnp.uint32)])  # fmt: skip


def file_digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def manifest_json(tensors: Mapping[str, Entry], files: Mapping[str, str] = {}) -> dict[str, Any]:
    """A manifest as JSON data: the tensors' entries (see `tensor_entry`) and the files' SHA-256 digests."""
    return {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM, "files": dict(files), "tensors": dict(tensors)}


def write_manifest(root: Path, tensors: Mapping[str, Entry], files: Iterable[str]) -> None:
    """Write `root`/checksums.json: the tensors' entries and the digests of `root`'s `files` (those present)."""
    head = manifest_json({}, {name: file_digest(root / name) for name in files if (root / name).is_file()})
    del head["tensors"]
    lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in tensors.items())
    (root / MANIFEST_FILE).write_text(json.dumps(head)[:-1] + ', "tensors": {\n' + lines + "\n}}\n")  # a tensor a line


class Manifest:
    """A checkpoint's checksums; `check_*` raise ValueError naming the checkpoint and what is damaged."""

    def __init__(self, root: Path, data: Any, *, where: Path, hint: str = ""):
        """`data`: `manifest_json`'s layout, as read from `where` (which a damaged one is reported as);
        `hint` ends the message of a damaged checkpoint (what the user can do)."""
        try:
            if (data["format"], data["version"], data["algorithm"]) != (FORMAT, VERSION, ALGORITHM):
                raise ValueError(f"format {data['format']!r} version {data['version']!r} {data['algorithm']!r}")
            tensors, files = data["tensors"], data["files"]
            for entry in tensors.values():
                if not (isinstance(entry["dtype"], str) and isinstance(entry["checksum"], str)
                        and all(isinstance(n, int) for n in entry["shape"])):  # fmt: skip
                    raise ValueError(f"bad entry {entry!r}")
            if not all(isinstance(v, str) for v in files.values()):
                raise ValueError("bad file digests")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where} is damaged ({type(e).__name__}: {e})") from e
        self.root, self.tensors, self.files, self.hint = root, tensors, files, hint

    @classmethod
    def read(cls, root: Path, hint: str = "") -> Manifest | None:
        """`root`'s checksums.json; None when it has none (written before checksums were kept)."""
        file = root / MANIFEST_FILE
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_text())
        except ValueError as e:
            raise ValueError(f"{file} is damaged ({type(e).__name__}: {e})") from e
        return cls(root, data, where=file, hint=hint)

    def check_files(self) -> None:
        for name, digest in self.files.items():
            file = self.root / name
            if not file.is_file() or file_digest(file) != digest:
                raise self._damaged(f"{name} is missing or does not match its checksum")

    def check_layout(self, stored: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """The stored tensors (name -> shape, dtype, from the checkpoint's metadata) are those the manifest lists."""
        if set(stored) != set(self.tensors):
            odd = sorted(set(stored) ^ set(self.tensors))
            raise self._damaged(f"tensor {odd[0]} is in only one of the checkpoint's metadata and {MANIFEST_FILE}")
        for name, (shape, dtype) in stored.items():
            entry = self.tensors[name]
            if (list(shape), np.dtype(dtype).name) != (entry["shape"], entry["dtype"]):
                raise self._damaged(f"tensor {name} is stored as {np.dtype(dtype).name} {list(shape)}, but "
                                    f"{MANIFEST_FILE} says {entry['dtype']} {entry['shape']}")  # fmt: skip

    def check_tensor(self, name: str, x: Any) -> None:
        """`x`, tensor `name` as loaded (in its stored dtype or a wider one), has its recorded checksum."""
        if not self.matches(name, x):
            raise self._damaged(f"tensor {name} does not match its checksum")

    def matches(self, name: str, x: Any) -> bool:
        entry = self.tensors.get(name)
        return entry is not None and checksum(x, entry["dtype"]) == entry["checksum"]

    def _damaged(self, what: str) -> ValueError:
        return ValueError(f"{self.root}: checkpoint is damaged: {what}{self.hint}")


def exact_widening(stored: Any, loaded: Any) -> bool:
    """Whether casting `stored` to `loaded` is exact, so a loaded tensor can be checked by casting it back."""
    stored, loaded = np.dtype(stored), np.dtype(loaded)
    return stored == loaded or (jnp.issubdtype(stored, jnp.floating) and jnp.promote_types(stored, loaded) == loaded)
