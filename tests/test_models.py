"""The model-family seam: the schema agrees with the modules, old checkpoints load, no import cycles."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import gemma_jax
from gemma_jax.checkpoint import registry
from gemma_jax.models import FAMILIES, family_of
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models.gemma3n import Gemma3nConfig

DATA = Path(__file__).parent / "data"
PACKAGE = Path(gemma_jax.__file__).parent

CONFIGS = {
    "gemma": GemmaConfig(model_type="gemma", vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=4,
                         head_dim=8, mlp_dim=24, query_pre_attn_scalar=8),
    "gemma2": GemmaConfig(model_type="gemma2", vocab_size=32, embed_dim=16, num_layers=3, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_dim=24, query_pre_attn_scalar=8, layer_pattern=("local", "global"),
                          sliding_window=4, attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_norms=True),
    "gemma3_text": GemmaConfig(model_type="gemma3_text", vocab_size=32, embed_dim=16, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=8, mlp_dim=24, query_pre_attn_scalar=8, sliding_window=4,
                               layer_pattern=("local", "global"), use_post_norms=True, use_qk_norm=True),
    # Gemma 3n: 3 AltUp streams, the last 2 layers sharing KV (no k/v/k_norm), per-layer MLP widths
    "gemma3n": Gemma3nConfig(vocab_size=32, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8,
                             mlp_dim=(24, 16, 24, 16), layer_pattern=("local", "global"), sliding_window=4,
                             per_layer_vocab_size=24, per_layer_dim=4, altup_num_inputs=3, num_kv_shared_layers=2,
                             laurel_rank=4, activation_sparsity=(0.95, 0.0, 0.0, 0.0)),
    "gemma3n-2-streams": Gemma3nConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=2,
                                       head_dim=8, mlp_dim=24, layer_pattern=("local", "global"), sliding_window=4,
                                       per_layer_vocab_size=32, per_layer_dim=4, altup_num_inputs=2, laurel_rank=2),
}  # fmt: skip


@pytest.mark.parametrize("quant", [None, "w8a16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_schema_is_exactly_what_the_module_creates(name, quant):
    """Every path, shape, dtype kind and logical axis the Flax module creates is the schema's, and nothing else."""
    config = CONFIGS[name]
    family = family_of(config)
    axes = flatten_dict(family.param_axes(config, quant))
    shapes = flatten_dict(jax.eval_shape(lambda: family.init_params(config, jax.random.PRNGKey(0), quant=quant)))
    expected = {}
    for spec in family.tensor_specs(config).values():
        int8 = quant is not None and spec.param.int8_in is not None
        expected[spec.path] = (spec.shape, spec.param.axes, np.int8 if int8 else np.float32)
        if int8:  # the f32 scale beside the int8 weight, over the weight's output dims
            out = len(spec.shape) - spec.param.int8_in
            expected[spec.path[:-1] + ("scale",)] = (spec.shape[:out], spec.param.axes[:out], np.float32)
    found = {p: (tuple(shapes[p].shape), axes[p], np.dtype(shapes[p].dtype).type) for p in shapes}
    assert found == expected
    for path, (_, path_axes, _) in expected.items():  # logical axes from the schema alone, without a config
        assert family.logical_axes(path) == path_axes


def test_schema_names_are_unique_in_every_format():
    for config in CONFIGS.values():
        specs = family_of(config).tensor_specs(config).values()
        gguf = lambda s: (s.gguf_name, s.index) if s.param.gguf_stacked else s.gguf_name  # a stack: one name, its slices
        for key in (lambda s: s.hf_name, gguf, lambda s: s.path):
            names = [key(s) for s in specs if key(s) is not None]  # None: not in that format (a classifier's head in GGUF)
            assert len(names) == len(set(names))


def test_a_checkpoint_written_before_the_family_seam_loads_with_the_same_logits(tmp_path):
    """tests/data/orbax-v2-d528620: an Orbax checkpoint written by commit d528620 (before gemma_jax.models
    existed), with the logits that commit computed from it."""
    ckpt = shutil.copytree(DATA / "orbax-v2-d528620", tmp_path / "old")
    model = gemma_jax.load(ckpt, dtype="float32")
    logits = model.logits([[2, 5, 9, 11, 40, 3, 7, 8, 60, 1], [2, 33, 12, 5]])
    np.testing.assert_allclose(logits, np.load(DATA / "orbax-v2-d528620.logits.npy"), rtol=1e-6, atol=1e-6)


def test_every_format_module_registers_itself():
    assert registry.sources() == ("hf", "compressed-tensors", "orbax", "gemma-lib", "gguf")
    assert set(registry.targets()) == {"hf", "compressed-tensors", "orbax", "gguf"}
    assert [f.name for f in FAMILIES] == ["gemma", "gemma3n"]


def _modules() -> list[str]:
    return sorted(
        ".".join(("gemma_jax", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py"  # runs a command when imported
    )


def test_every_module_imports_first_without_a_cycle():
    """Each module imported first, in a fresh interpreter state: an import cycle fails for some entry point."""
    script = (
        "import importlib, sys\n"
        "import jax, flax, orbax.checkpoint, numpy, safetensors, gguf, optax\n"
        f"for name in {_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'gemma_jax' or m.startswith('gemma_jax.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        sys.exit(f'{name}: {e}')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_function_local_imports_of_our_own_modules():
    """Imports of gemma_jax inside functions are how cycles get hidden; only the command-line parsers defer
    them (so that `gemma-jax --help` does not import jax)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in ("cli.py", "train/cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    module = getattr(inner, "module", None) if isinstance(inner, ast.ImportFrom) else None
                    names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [module or ""]
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and any(n.startswith("gemma_jax") for n in names):
                        found.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert not found
