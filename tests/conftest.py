"""Shared fixtures: tiny random `transformers` Gemma models saved as Hugging Face checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for mesh tests; unsharded computations still run on device 0.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import gc

import jax
import pytest
import torch
import transformers


def make_hf_model(
    model_type: str, *, weight_scale: float = 1.0, post_norm_offset: float = 0.0, seed: int = 0, **overrides
) -> transformers.PreTrainedModel:
    """A random tiny Gemma 1/2/3 `transformers` model (eager attention, float32).

    Every weight — norms included — is drawn as N(0, 1) times a per-kind scale, so name and
    layout mappings are all exercised; `weight_scale` multiplies the projections (large values
    push attention and final logits past their soft-caps). A large `post_norm_offset` lets the
    blocks outweigh the tied embedding, so greedy text does not collapse into one repeated token.
    """
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
    if model_type == "gemma2":
        base.update(sliding_window=8, query_pre_attn_scalar=16)
        config, cls = transformers.Gemma2Config(**{**base, **overrides}), transformers.Gemma2ForCausalLM
    elif model_type == "gemma3_text":
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
        base.update(sliding_window=8, query_pre_attn_scalar=16, num_hidden_layers=4, rope_parameters=rope,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
        config, cls = transformers.Gemma3TextConfig(**{**base, **overrides}), transformers.Gemma3ForCausalLM
    else:
        config, cls = transformers.GemmaConfig(**{**base, **overrides}), transformers.GemmaForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else (1.0 if "embed" in name else 0.25 * weight_scale)
            p.copy_(torch.randn_like(p) * scale + (post_norm_offset if "post_" in name else 0.0))
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: save a tiny random HF model and return (torch model, directory)."""

    def make(model_type: str, **kwargs):
        model = make_hf_model(model_type, **kwargs)
        path = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(path)
        return model, path

    return make


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """A random tiny Gemma 2 whose greedy text varies, with a sentencepiece tokenizer: (torch model, dir)."""
    from gemma_jax.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("text-ckpt")
    lines = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read().splitlines()
    tokenizer = train_sentencepiece(lines, path / "tokenizer.model", vocab_size=512)
    model = make_hf_model("gemma2", seed=8, weight_scale=1.5, post_norm_offset=10.0, vocab_size=tokenizer.vocab_size)
    model.save_pretrained(path)
    return model, path


def tiny_tokenizer_model(vocab_size: int) -> bytes:
    """A valid Gemma-style sentencepiece model with only `vocab_size` pieces (specials, then letters),
    for checkpoints whose vocabulary is too small for a trained tokenizer (which needs 256 byte pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    specials = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)]  # CONTROL, CONTROL, CONTROL, UNKNOWN
    letters = [(chr(ord("a") + i % 26) * (1 + i // 26), 1) for i in range(vocab_size - len(specials))]
    for piece, kind in specials + letters:
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size = sp_pb2.TrainerSpec.BPE, vocab_size
    trainer.pad_id, trainer.eos_id, trainer.bos_id, trainer.unk_id = 0, 1, 2, 3
    trainer.pad_piece, trainer.eos_piece, trainer.bos_piece, trainer.unk_piece = (p for p, _ in specials)
    proto.normalizer_spec.name = "identity"
    return proto.SerializeToString()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs when it ends. Every XLA:CPU executable holds memory mappings of
    its JIT-ed code; the whole suite in one process compiles thousands and reached the kernel's vm.max_map_count
    (65,530), after which XLA's compiler segfaulted on the next compile (three CI runs, ~475 tests in)."""
    yield
    jax.clear_caches()
    gc.collect()
