"""Where gemma_jax keeps files between runs, and the compiled programs kept there.

Before the first token a run traces the Python model, lowers it and compiles it (25-65 s for Gemma 3
270M on a 2-core CPU, minutes for large models on TPU), and every run of the same command does the
same again. `enable_compile_cache` keeps both halves:

- XLA's executables: JAX's persistent compilation cache under `cache_root()/xla`, keyed by the
  program, the backend, the devices and the jax version; a later run loads them instead of compiling.
- The traced programs of the functions marked `cached_program` (prefill and decode): each is exported
  with `jax.export` the first time it runs with a given signature, to `cache_root()/programs`, and a
  later run deserializes it instead of tracing and lowering the model again (~1 s for the 270M
  model's prefill on CPU, growing with depth). Files are jax.export's own serialization (flatbuffers,
  no pickle), written atomically; one that cannot be read is exported again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

_log = logging.getLogger(__name__)
_programs: Path | None = None  # where traced programs are kept; None: not kept


def cache_root() -> Path:
    """`$GEMMA_JAX_CACHE`, else ~/.cache/gemma_jax: the demo checkpoint and compiled programs."""
    return Path(os.environ.get("GEMMA_JAX_CACHE") or Path.home() / ".cache" / "gemma_jax").expanduser()


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Keep compiled and traced programs in `directory` (default `cache_root()`): `xla/` and `programs/`.

    Every program is kept, however fast it compiled: a run compiles dozens of small ones, which
    together cost seconds. Call it before the first compilation; it returns the directory used.
    """
    global _programs
    root = Path(directory or cache_root()).expanduser().absolute()
    (root / "xla").mkdir(parents=True, exist_ok=True)
    (root / "programs").mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    _programs = root / "programs"
    return root


def disable_program_cache() -> None:
    """Trace every program anew (the XLA cache, a jax setting, is left as it is)."""
    global _programs
    _programs = None


class cached_program:  # noqa: N801 - used as a decorator, like jax.jit
    """`jitted(*arrays, **static)`, served from a kept traced program when the cache is on (one process).

    Dynamic arguments are positional, static ones keywords (as `jitted`'s static_argnames). Within a
    process each signature is deserialized or exported once; its wrapper is jitted with `donate_argnums`
    (what `jitted` donates). A program that cannot be exported runs as `jitted` does, traced each run.
    Other attributes (`trace`, `lower`, `_cache_size`) are `jitted`'s.
    """

    def __init__(self, jitted: Any, *, donate_argnums: tuple[int, ...] = ()):
        self.jitted, self.donate_argnums = jitted, donate_argnums
        self.calls: dict[tuple, Callable[..., Any]] = {}
        functools.update_wrapper(self, jitted)

    def __call__(self, *args: Any, **static: Any) -> Any:
        if _programs is None or jax.process_count() > 1:
            return self.jitted(*args, **static)
        leaves, tree = jax.tree.flatten(args)
        seen = (tree, tuple(sorted(static.items())),
                tuple((jnp.shape(x), jnp.result_type(x), getattr(x, "weak_type", False), getattr(x, "sharding", None)) for x in leaves))  # fmt: skip
        if seen not in self.calls:  # ~0.5 ms a call to get here; the file's key (~2 ms) only once
            key = _signature(self.jitted, leaves, tree, static)
            self.calls[seen] = functools.partial(self.jitted, **static) if key is None else \
                _load_or_export(self.jitted, key, args, static, self.donate_argnums)  # fmt: skip
        return self.calls[seen](*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.jitted, name)


@functools.cache
def _code_version() -> str:
    """A digest of gemma_jax's own source: a kept program is only as current as the code that traced it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _signature(jitted: Any, leaves: list, tree: Any, static: dict) -> str | None:
    """The program's key: function, static arguments, argument types and layouts, code, jax and devices.
    None when a static argument has no stable text (an object shown by its address)."""
    statics = repr(sorted(static.items()))
    if " at 0x" in statics:
        return None
    types = [(str(jax.typeof(x)), str(getattr(x, "sharding", ""))) for x in leaves]
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    text = repr((jitted.__module__, jitted.__qualname__, statics, str(tree), types, devices, _code_version(),
                 jax.__version__, jax.lib.__version__))  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _load_or_export(jitted: Any, key: str, args: tuple, static: dict, donate_argnums: tuple[int, ...]) -> Callable[..., Any]:
    path = _programs / f"{jitted.__qualname__}-{key[:32]}.jax"
    exported = None
    if path.is_file():
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception as err:  # noqa: BLE001 - a damaged file is traced again and replaced
            _log.warning("%s: cannot read the kept program (%s); tracing it again", path, err)
    if exported is None:
        try:
            exported = jax.export.export(jitted)(*args, **static)
            data = exported.serialize()
        except Exception as err:  # noqa: BLE001 - e.g. a host callback: runs as traced, every run
            _log.info("%s is not kept between runs: %s", jitted.__qualname__, err)
            return functools.partial(jitted, **static)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    call = lambda *arrays: exported.call(*arrays)
    call.__name__ = call.__qualname__ = jitted.__name__  # the XLA cache's entries keep the program's name
    return jax.jit(call, donate_argnums=donate_argnums)
