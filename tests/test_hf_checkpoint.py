"""Hugging Face checkpoint conversion against real `transformers` Gemma models (tiny, random).

The expected layout of each tensor is written out here independently of
`gemma_jax.checkpoint.names`, from how HF's modules use their weights, so a wrong table row
cannot be checked against itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import tiny_tokenizer_model
from gemma_jax.checkpoint import expected_hf_shapes, load_hf, save_hf
from gemma_jax.models.gemma import GemmaConfig

V, D, F, N, H = 128, 32, 64, 4, 16
SHARD = 20_000  # bytes: forces several shards for these tiny models
CASES = [  # (model_type, torch dtype, sharded)
    ("gemma2", torch.bfloat16, True),
    ("gemma2", torch.float32, False),
    ("gemma", torch.bfloat16, False),
    ("gemma", torch.float32, True),
]


def _hf_model(model_type: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N, head_dim=H,
                  attn_implementation="eager")
    if model_type == "gemma2":
        config = transformers.Gemma2Config(**common, num_hidden_layers=3, num_key_value_heads=2,
                                           query_pre_attn_scalar=H, sliding_window=8)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.GemmaConfig(**common, num_hidden_layers=2, num_key_value_heads=1)
        model = transformers.GemmaForCausalLM(config)
    with torch.no_grad():  # norms start at zero; randomise them so a swapped norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    return model.to(dtype)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{'sharded' if c[2] else 'single'}")
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, bool]:
    model_type, dtype, sharded = request.param
    model = _hf_model(model_type, dtype)
    path = tmp_path_factory.mktemp(model_type) / "hf"
    model.save_pretrained(path, **({"max_shard_size": SHARD} if sharded else {}))
    assert (path / "model.safetensors.index.json").exists() == sharded
    return path, model, sharded


def _np(t: torch.Tensor) -> np.ndarray:
    """Torch -> numpy keeping the exact bits (numpy has no native bfloat16)."""
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _expected_params(model: Any) -> dict[str, np.ndarray]:
    """Our layout, flattened to 'a/b/c' keys, derived from how HF uses each weight."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    cfg = model.config
    K = cfg.num_key_value_heads
    out = {"embedder/embedding": sd["model.embed_tokens.weight"], "final_norm/scale": sd["model.norm.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"layer_{i}/"
        # HF: q = x @ W.T viewed as [..., heads, head_dim], so W[h*H + j, d] = ours[h, j, d].
        out[o + "attn/q/w"] = sd[p + "self_attn.q_proj.weight"].reshape(N, H, D)
        out[o + "attn/k/w"] = sd[p + "self_attn.k_proj.weight"].reshape(K, H, D)
        out[o + "attn/v/w"] = sd[p + "self_attn.v_proj.weight"].reshape(K, H, D)
        out[o + "attn/o/w"] = sd[p + "self_attn.o_proj.weight"].reshape(D, N, H)
        for ours, hf in [("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")]:
            out[o + f"mlp/{ours}/w"] = sd[p + f"mlp.{hf}.weight"]
        out[o + "pre_attn_norm/scale"] = sd[p + "input_layernorm.weight"]
        if cfg.model_type == "gemma2":
            out[o + "post_attn_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
            out[o + "pre_ffw_norm/scale"] = sd[p + "pre_feedforward_layernorm.weight"]
            out[o + "post_ffw_norm/scale"] = sd[p + "post_feedforward_layernorm.weight"]
        else:  # Gemma 1's "post_attention_layernorm" is the norm in front of the MLP
            out[o + "pre_ffw_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
    return out


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def _assert_same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.ascontiguousarray(a[k]), np.ascontiguousarray(b[k])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert x.tobytes() == y.tobytes(), k


def _read_dir(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# --- happy paths ------------------------------------------------------------------------------


def test_load_matches_torch_state_dict(ckpt: tuple[Path, Any, bool]) -> None:
    path, model, _ = ckpt
    config, params = load_hf(path)
    _assert_same_bits(_flat(params), _expected_params(model))
    hf = model.config
    assert (config.model_type, config.num_layers, config.num_kv_heads, config.use_post_norms) == (
        hf.model_type, hf.num_hidden_layers, hf.num_key_value_heads, hf.model_type == "gemma2")
    assert config == GemmaConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert GemmaConfig.from_hf(config.to_hf()) == config
    assert expected_hf_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_load_casts_and_calls_put(ckpt: tuple[Path, Any, bool]) -> None:
    path, model, _ = ckpt
    seen: list[tuple[str, ...]] = []

    def put(p: tuple[str, ...], x: np.ndarray) -> np.ndarray:
        seen.append(p)
        return x + 0  # a new object, to check the hook's result is what gets stored

    _, params = load_hf(path, dtype="float32", put=put)
    flat = _flat(params)
    assert sorted("/".join(p) for p in seen) == sorted(flat)
    expected = {k: v.astype(np.float32) for k, v in _expected_params(model).items()}
    _assert_same_bits(flat, expected)


def test_save_matches_transformers(ckpt: tuple[Path, Any, bool], tmp_path: Path) -> None:
    path, model, sharded = ckpt
    config, params = load_hf(path)
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(tiny_tokenizer_model(config.vocab_size))
    out = save_hf(tmp_path / "out", config, params, max_shard_bytes=SHARD if sharded else 2**31,
                  tokenizer_model=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "spm.model"]  # no temp dirs left
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    _assert_same_bits(_read_dir(out), _read_dir(path))
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
        assert index["metadata"]["total_size"] == sum(x.nbytes for x in _read_dir(out).values())
    else:
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.dtype == model.dtype
    ours, theirs = reloaded.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    config2, params2 = load_hf(out)
    assert config2 == config
    _assert_same_bits(_flat(params2), _flat(params))


# --- the tied lm_head -------------------------------------------------------------------------


def _single_file(ckpt: tuple[Path, Any, bool], tmp_path: Path, edit: Any = None) -> Path:
    """A copy of `ckpt` as one model.safetensors, with `edit(tensors)` applied."""
    src, _, _ = ckpt
    dst = tmp_path / "ckpt"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = _read_dir(src)
    if edit is not None:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_lm_head_equal_to_embedding_is_ignored(ckpt: tuple[Path, Any, bool], tmp_path: Path) -> None:
    path = _single_file(ckpt, tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    _assert_same_bits(_flat(load_hf(path)[1]), _flat(load_hf(ckpt[0])[1]))


def test_lm_head_different_from_embedding_is_refused(ckpt: tuple[Path, Any, bool], tmp_path: Path) -> None:
    def untie(t: dict[str, np.ndarray]) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"] * 2

    with pytest.raises(ValueError, match=r"lm_head\.weight.*model\.safetensors.*differs"):
        load_hf(_single_file(ckpt, tmp_path, untie))


# --- bad inputs -------------------------------------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A small valid single-file Gemma 2 checkpoint that tests may break."""
    path = tmp_path / "ckpt"
    _hf_model("gemma2", torch.float32).save_pretrained(path)
    return path


def _edit_tensors(path: Path, edit: Any) -> None:
    with safe_open(path / "model.safetensors", framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf(tmp_path / "nowhere")


def test_missing_config(good: Path) -> None:
    (good / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(good)


def test_invalid_json(good: Path) -> None:
    (good / "config.json").write_text('{"model_type": "gemma2",')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_hf(good)


def test_unknown_model_type(good: Path) -> None:
    hf = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json.*'llama'"):
        load_hf(good)


def test_no_safetensors(good: Path) -> None:
    (good / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights.*model.safetensors"):
        load_hf(good)


def test_shards_without_index(good: Path) -> None:
    (good / "model.safetensors").rename(good / "model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="found model-00001-of-00002.safetensors without an index"):
        load_hf(good)


def test_index_references_missing_shard(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _hf_model("gemma", torch.float32).save_pretrained(path, max_shard_size=SHARD)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"index.json references shard {shard.name}, which does not exist"):
        load_hf(path)


def test_wrong_shape(good: Path) -> None:
    _edit_tensors(good, lambda t: t.update({Q0: t[Q0][:, :-1]}))
    with pytest.raises(ValueError, match=rf"{Q0} in .*model.safetensors has shape \[64, 31\].*\[64, 32\]"):
        load_hf(good)


def test_missing_tensor(good: Path) -> None:
    _edit_tensors(good, lambda t: t.pop(UP1))
    with pytest.raises(ValueError, match=rf"missing tensors {UP1} in model.safetensors"):
        load_hf(good)


def test_unexpected_tensor(good: Path) -> None:
    extra = "model.layers.0.self_attn.q_norm.weight"
    _edit_tensors(good, lambda t: t.update({extra: np.ones(H, np.float32)}))
    with pytest.raises(ValueError, match=rf"unexpected tensors .*{extra} \(in model.safetensors\)"):
        load_hf(good)


def test_config_disagreeing_with_tensors(good: Path) -> None:
    hf = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**hf, "model_type": "gemma"}))  # Gemma 1 has no post-norms
    with pytest.raises(ValueError, match="unexpected tensors .*pre_feedforward_layernorm"):
        load_hf(good)


def test_save_refuses_to_overwrite_unless_asked(good: Path, tmp_path: Path) -> None:
    config, params = load_hf(good)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out"):
        save_hf(dest, config, params)
    save_hf(dest, config, params, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["layer_1"]["mlp"].pop("up"), "params lack layer_1/mlp/up/w"),
        (lambda p: p["layer_0"]["attn"]["q"].update(w=np.zeros((D, N, H + 1))), r"layer_0/attn/q/w has shape"),
        (lambda p: p.update(lm_head={"w": np.zeros((D, V))}), "no Hugging Face name: lm_head/w"),
    ],
)
def test_save_rejects_bad_params(good: Path, tmp_path: Path, edit: Any, message: str) -> None:
    config, params = load_hf(good)
    edit(params)
    with pytest.raises(ValueError, match=message):
        save_hf(tmp_path / "out", config, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
