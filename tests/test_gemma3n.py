"""Gemma 3n (text) against `transformers`' Gemma3nForCausalLM: float32 logits on several tiny configs
(AltUp streams, KV sharing, activation sparsity, sliding windows far shorter than the sequence),
padded batches, prefill + decode, greedy generation, loading a saved checkpoint; int8; the schema's HF
and GGUF names; the config (tests/test_models.py checks the schema against the module's init)."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

import gemma_jax
from gemma_jax import generate as gen
from gemma_jax import models
from gemma_jax.kernels import Kernels
from gemma_jax.models.family import ConfigError
from gemma_jax.models.gemma3n import FAMILY, SCHEMA, Gemma3nConfig, Transformer, init_cache
from gemma_jax.checkpoint.hf import params_from_hf, params_to_hf
from gemma_jax.models.gemma3n.model import gaussian_top_k
from gemma_jax.plan import CHIPS, plan
from gemma_jax.quant import quantize_weight
from gemma_jax.sampling import Sampler

LOCAL, GLOBAL = "sliding_attention", "full_attention"
# Tiny configs (transformers' key names). Windows of 3-5 against sequences of 16-40 tokens.
CASES = {
    # 2 streams, no KV sharing, dense, every fifth layer global as in the real models
    "altup2-dense": dict(altup_num_inputs=2, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * 5,
                         num_hidden_layers=5, sliding_window=4, intermediate_size=[64, 48, 64, 40, 56]),
    # 4 streams, the last 2 of 5 layers share KV (one local, one global), sparse first 2 layers
    "altup4-share2-sparse": dict(altup_num_inputs=4, num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.6, 0.0, 0.0, 0.0],
                                 num_hidden_layers=5, sliding_window=3, layer_types=[LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL]),
    # 3 streams, active stream 1, no output scale, soft-cap 10, ids past the per-layer table,
    # the last 3 of 6 layers share (two of them reading one local source). Seed 1: seed 0 draws a model
    # whose float32 logits are 1e-4 off its own float64 ones in transformers too (too ill-conditioned to compare)
    "altup3-share3-active1": dict(seed=1, altup_num_inputs=3, altup_active_idx=1, altup_correct_scale=False, num_kv_shared_layers=3,
                                  activation_sparsity_pattern=[0.8] + [0.0] * 5, num_hidden_layers=6, sliding_window=5,
                                  final_logit_softcapping=10.0, vocab_size_per_layer_input=60,
                                  layer_types=[LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL]),
}  # fmt: skip
SEQ = 16  # >= 3 x every window above


def make_hf_model(seed: int = 0, **overrides) -> transformers.Gemma3nForCausalLM:
    """A random tiny Gemma3nForCausalLM (eager attention, float32). Every weight is random — norms
    around 1, AltUp's output scale (zeros at init) included — so every mapping is exercised. Post-norms
    around 3 let the layers outweigh the tied embedding, so greedy text does not repeat one token."""
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=256, vocab_size_per_layer_input=101, hidden_size_per_layer_input=8,
                laurel_rank=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    config = transformers.Gemma3nTextConfig(**{**base, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3nForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) * (3.0 if "post_" in name else 1.0) if "norm" in name else 0.25 * torch.randn_like(p))
    return model


def ours(model: transformers.Gemma3nForCausalLM) -> tuple[Gemma3nConfig, dict]:
    """Our config (from the model's config.json dict) and params (through the schema)."""
    config = Gemma3nConfig.from_hf(json.loads(model.config.to_json_string()))
    return config, params_from_hf(config, {k: v.numpy() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, transformers model, our config, our params, our jitted forward: one compilation per shape)."""
    model = make_hf_model(**CASES[request.param])
    config, params = ours(model)
    forward = Transformer(config)
    apply = jax.jit(lambda *a, fresh=False: forward.apply({"params": params}, *a, fresh_cache=fresh), static_argnames="fresh")
    return request.param, model, config, params, apply


def _padded_batch(vocab: int, seq: int = SEQ):
    """Three rows: full, left-padded by 5, right-padded by 4 (with per-row positions)."""
    tokens = np.random.RandomState(0).randint(3, vocab, (3, seq))
    mask = np.ones((3, seq), bool)
    mask[1, :5] = False
    mask[2, seq - 4 :] = False
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _close(got, want, what: str, tol: float = 1e-4) -> float:
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= tol, f"{what}: max |Δlogit| / max |logit| = {err:.2e}"
    return err


def test_logits_match_transformers_on_padded_batches(case):
    name, model, config, _, forward = case
    tokens, mask, positions = _padded_batch(config.vocab_size)
    tokens[0, 3] = config.vocab_size - 1  # past the per-layer table in "altup3-share3-active1"
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions)).logits.numpy()  # fmt: skip
    logits, cache = forward(tokens, positions, mask.astype(np.int32))
    assert cache is None
    _close(np.asarray(logits)[mask], ref[mask], name)
    for row in range(3):  # each padded row equals the row alone, unpadded
        with torch.no_grad():
            alone = model(torch.tensor(tokens[row][mask[row]][None])).logits.numpy()[0]
        _close(np.asarray(logits)[row][mask[row]], alone, f"{name} row {row}")


def test_gaussian_top_k_keeps_the_expected_share():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 4096)) * 3.0 + 1.0
    kept = float(jnp.mean(gaussian_top_k(x, 0.95) > 0))
    assert 0.04 < kept < 0.06


def test_prefill_chunk_then_decode_reproduce_full_forward(case):
    """Prefill 6 tokens into an empty cache (more than any window), add a chunk of 3 (cache + chunk), then
    decode one token at a time on the padded batch: every step equals the full forward, KV-sharing layers
    included (in the prefill they read their source's whole chunk, not its window-sized ring)."""
    name, _, config, _, forward = case
    prompt, chunk = 6, 3
    tokens, mask, positions = _padded_batch(config.vocab_size)
    segments = mask.astype(np.int32)
    full = np.asarray(forward(tokens, positions, segments)[0])
    cache = init_cache(config, 3, SEQ)
    assert set(cache) == {f"layer_{i}" for i in range(config.num_layers) if config.kv_source(i) == i}
    assert (len(cache) < config.num_layers) == (config.num_kv_shared_layers > 0)
    logits, cache = forward(tokens[:, :prompt], positions[:, :prompt], segments[:, :prompt], cache, fresh=True)
    steps = [np.asarray(logits)]
    cut = slice(prompt, prompt + chunk)
    logits, cache = forward(tokens[:, cut], positions[:, cut], segments[:, cut], cache)
    steps.append(np.asarray(logits))
    for t in range(prompt + chunk, SEQ):
        logits, cache = forward(tokens[:, t : t + 1], positions[:, t : t + 1], segments[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    _close(np.concatenate(steps, axis=1)[mask], full[mask], name)


def test_greedy_generation_matches_transformers_through_generate_py(case):
    """`gemma_jax.generate` runs this family through the registry: prompts of different lengths in one
    batch (right-padded), 3+ windows of new tokens."""
    name, model, config, params, _ = case
    prompts, new = [[2, 17, 33, 5, 71, 9, 42, 11, 60], [2, 40, 41]], 18
    got = gen.generate(config, params, prompts, max_new_tokens=new, sampler=Sampler(), stop_ids=(config.eos_id,)).tokens
    for prompt, tokens in zip(prompts, got):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=1, pad_token_id=0)
        want = out[0, len(prompt) :].tolist()
        assert tokens == (want[: want.index(1)] if 1 in want else want), name
    assert len(got[0]) >= 3 * config.sliding_window and len(set(got[0])) > 3, got  # long, not one repeated token


def test_int8_weights_and_remat_run_the_same_model():
    """int8 weights where the schema says (per-output-channel scales; the per-layer table's rows too)
    compute what their dequantized float values compute (the random tiny models are too chaotic for a
    bound against the float weights themselves); rematerialised blocks compute what plain ones do."""
    config, params = ours(make_hf_model(**CASES["altup4-share2-sparse"]))
    tokens, mask, positions = _padded_batch(config.vocab_size)
    args = (tokens, positions, mask.astype(np.int32))
    run = lambda model: jax.jit(lambda p: model.apply({"params": p}, *args)[0])
    forward = run(Transformer(config))
    int8, dequantized = flatten_dict(params), flatten_dict(params)
    for spec in FAMILY.tensor_specs(config).values():
        if (n := spec.param.int8_in) is not None:
            q, scale = quantize_weight(int8[spec.path], tuple(range(len(spec.shape) - n, len(spec.shape))))
            int8[spec.path], int8[spec.path[:-1] + ("scale",)] = q, scale
            dequantized[spec.path] = q.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * n)
    want = np.asarray(forward(unflatten_dict(dequantized)))[mask]
    _close(np.asarray(forward(unflatten_dict(int8)))[mask], want, "int8 weights")
    remat = run(Transformer(config, remat="block"))(params)  # fresh_cache stays a static argument
    _close(np.asarray(remat)[mask], np.asarray(forward(params))[mask], "remat", tol=1e-6)


def test_splash_attention_computes_what_xla_does():
    """The TPU default for whole sequences (Pallas splash attention, interpret mode here), KV-sharing
    layers reading their source's chunk, on a 128-token batch with a right-padded row."""
    config, params = ours(make_hf_model(**CASES["altup4-share2-sparse"]))
    tokens = np.random.RandomState(0).randint(3, config.vocab_size, (2, 128))
    positions, segments = np.broadcast_to(np.arange(128), (2, 128)), np.ones_like(tokens)
    segments[1, 100:] = 0
    run = lambda kernels: jax.jit(lambda p: Transformer(config, kernels=kernels).apply({"params": p}, tokens, positions, segments)[0])
    xla, splash = run(Kernels())(params), run(Kernels(attention="splash", interpret=True))(params)
    _close(np.asarray(splash)[segments > 0], np.asarray(xla)[segments > 0], "splash")


def test_a_saved_transformers_checkpoint_loads_through_gemma_jax_load(tmp_path, monkeypatch):
    """End to end as a user: save_pretrained, then gemma_jax.load by a relative path; logits match."""
    model = make_hf_model(**CASES["altup4-share2-sparse"])
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    loaded = gemma_jax.load("ckpt", dtype="float32")
    assert isinstance(loaded.config, Gemma3nConfig)
    rows = [[2, 5, 9, 13, 7, 11, 40, 41, 60, 3], [2, 8]]
    got = loaded.logits(rows)
    with torch.no_grad():
        for i, row in enumerate(rows):
            _close(got[i, : len(row)], model(torch.tensor([row])).logits.numpy()[0], f"row {i}")


# --- the parameter schema (tests/test_models.py checks it against the module's init) ------------


def test_schema_names_every_hf_tensor_and_round_trips(case):
    name, model, config, params, _ = case
    tensors = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    back = params_to_hf(config, params)
    assert set(back) == set(tensors), name
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[3, 3\]"):
        params_from_hf(config, {**tensors, "model.layers.0.mlp.gate_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"missing tensors model.norm.weight"):
        params_from_hf(config, {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match=r"unexpected tensors model.layers.0.extra.weight"):
        params_from_hf(config, {**tensors, "model.layers.0.extra.weight": np.zeros(3)})
    shared = [i for i in range(config.num_layers) if config.kv_source(i) != i]  # real checkpoints keep their unused k/v
    extra = {f"model.layers.{i}.self_attn.k_proj.weight": np.zeros(3) for i in shared}
    assert set(flatten_dict(params_from_hf(config, {**tensors, **extra}))) == set(flatten_dict(params))


def test_schema_gguf_names_are_llama_cpp_names():
    gguf = pytest.importorskip("gguf")
    config = Gemma3nConfig.from_preset("gemma3n-e2b")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, config.num_layers)
    for spec in FAMILY.tensor_specs(config).values():
        if spec.path[0].startswith("altup_"):  # GGUF stacks the AltUp projections: one tensor per set (HF name without the stream)
            assert spec.param.gguf_stacked and "{i}" not in spec.param.gguf
            stack = re.sub(r"\.\d+\.weight$", "", spec.hf_name)
            assert spec.gguf_name == names.get_name(stack) + ".weight", spec.hf_name
        else:  # ".weight" on correct_output_scale too, as llama.cpp reads it
            assert spec.gguf_name == names.get_name(spec.hf_name.removesuffix(".weight")) + ".weight", spec.hf_name
    assert all(row.norm == "plain" for row in SCHEMA if row.path.endswith("norm/scale"))


# --- config ----------------------------------------------------------------------------------------


def test_kv_sharing_reads_the_layer_transformers_stores():
    hf = transformers.Gemma3nTextConfig(intermediate_size=8192, num_hidden_layers=30, num_kv_shared_layers=10,
                                        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20)  # fmt: skip
    config = Gemma3nConfig.from_hf(hf.to_dict())
    assert config == Gemma3nConfig.from_preset("gemma3n-e2b")  # transformers' E2B variant (its converter's)
    stores = {hf.layer_types[i]: i for i, mode in enumerate(hf.kv_sharing_modes) if mode == "store"}
    for i, mode in enumerate(hf.kv_sharing_modes):
        assert config.kv_source(i) == (stores[hf.layer_types[i]] if mode == "reuse" else i)
    assert Gemma3nConfig.from_hf(transformers.Gemma3nTextConfig().to_dict()) == Gemma3nConfig.from_preset("gemma3n-e4b")


@pytest.mark.parametrize("preset", ["gemma3n-e2b", "gemma3n-e4b"])
def test_presets_round_trip_through_config_json_that_transformers_loads(preset):
    config = Gemma3nConfig.from_preset(preset)
    hf = json.loads(json.dumps(config.to_hf()))
    assert Gemma3nConfig.from_hf(hf) == config
    loaded = transformers.AutoConfig.for_model(**hf)
    assert isinstance(loaded, transformers.Gemma3nTextConfig)
    assert Gemma3nConfig.from_hf(loaded.to_dict()) == config
    multimodal = {"model_type": "gemma3n", "text_config": {k: v for k, v in hf.items() if k != "model_type"}, "vision_config": {}}
    assert Gemma3nConfig.from_hf(multimodal) == config == models.config_from_hf(multimodal) == models.preset(preset)
    assert hash(config) == hash(Gemma3nConfig.from_hf(hf))  # hashable: a static jit argument


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(intermediate_size=[64, 64]), "intermediate_size"),
        (dict(activation_sparsity_pattern=[1.0] + [0.0] * 4), "activation_sparsity_pattern"),
        (dict(num_kv_shared_layers=5), "num_kv_shared_layers"),
        (dict(num_kv_shared_layers=1, layer_types=[LOCAL] * 4 + [GLOBAL]), "num_kv_shared_layers"),  # no earlier global
        (dict(altup_num_inputs=0), "altup_num_inputs"),
        (dict(altup_active_idx=4), "altup_active_idx"),
        (dict(hidden_size_per_layer_input="8"), "hidden_size_per_layer_input"),
        (dict(rope_parameters={"full_attention": {"rope_type": "yarn"}}), "rope_parameters.full_attention"),
        (dict(hidden_activation="relu"), "hidden_activation"),
        (dict(model_type="gemma3"), "model_type"),
        (dict(model_type="gemma3n", text_config=[]), "text_config"),
    ],
)
def test_bad_config_json_names_the_key(change, key):
    hf = {**Gemma3nConfig.from_hf(make_hf_model(**CASES["altup2-dense"]).config.to_dict()).to_hf(), **change}
    with pytest.raises(ConfigError) as err:
        Gemma3nConfig.from_hf(hf)
    assert err.value.field == key, str(err.value)


# --- the family in the rest of gemma_jax: formats, meshes, multimodal checkpoints, jobs, plan ------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved Gemma3nForCausalLM (KV sharing, sparsity, 4 streams) with a tokenizer beside it."""
    from gemma_jax.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("g3n")
    model = make_hf_model(**CASES["altup4-share2-sparse"], vocab_size=512, vocab_size_per_layer_input=512)
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.model").write_bytes((tiny_checkpoint(root / "cache") / "tokenizer.model").read_bytes())
    return model, root / "hf"


def test_hf_to_orbax_to_hf_is_bit_exact(saved, tmp_path):
    from safetensors.numpy import load_file

    from gemma_jax.convert import convert

    _, hf = saved
    convert(hf, tmp_path / "orbax", to="orbax", quiet=True)
    convert(tmp_path / "orbax", tmp_path / "back", to="hf", quiet=True)
    before, after = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(after) == set(before) - {"lm_head.weight"}  # the tied head is not stored twice
    for name, x in after.items():
        assert x.dtype == before[name].dtype and np.array_equal(x.view(np.uint8), before[name].view(np.uint8)), name


def test_sharded_logits_on_the_8_device_mesh_equal_one_device(saved):
    from gemma_jax.sharding import make_mesh

    _, hf = saved
    rows = [[2, 5, 9, 13, 7, 11, 40, 41, 60, 3, 17, 19, 23, 29, 31, 37], [2, 8, 300, 7]]
    one = gemma_jax.load(hf, dtype="float32").logits(rows)
    for spec in ("data=2,tensor=4", "fsdp=2,tensor=4"):
        sharded = gemma_jax.load(hf, dtype="float32", mesh=make_mesh(spec), rules="inference" if "data" in spec else "training")
        assert sharded.params["layer_0"]["attn"]["q"]["w"].sharding.num_devices == 8
        np.testing.assert_allclose(sharded.logits(rows), one, rtol=1e-5, atol=1e-5 * np.abs(one).max(), err_msg=spec)


def test_a_multimodal_checkpoint_loads_its_language_model_only(saved, tmp_path, capfd):
    """A Gemma3nForConditionalGeneration layout: the text stack under model.language_model., towers beside it,
    the text config as `text_config`: gemma_jax reads the language model, says so, and leaves the rest."""
    from safetensors.numpy import load_file, save_file

    model, hf = saved
    text = load_file(hf / "model.safetensors")
    mm = tmp_path / "mm"
    mm.mkdir()
    tensors = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in text.items() if k.startswith("model.")}
    tensors |= {"model.vision_tower.timm_model.conv_stem.weight": np.ones((4, 3, 3, 3), np.float32),
                "model.audio_tower.conformer.0.norm.weight": np.ones(8, np.float32),
                "model.embed_vision.embedding.weight": np.ones((6, 32), np.float32)}  # fmt: skip
    save_file(tensors, mm / "model.safetensors")
    text_config = json.loads((hf / "config.json").read_text())
    config = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text_config,
              "vision_config": {"model_type": "gemma3n_vision"}, "audio_config": {"model_type": "gemma3n_audio"}}  # fmt: skip
    (mm / "config.json").write_text(json.dumps(config))
    (mm / "tokenizer.model").write_bytes((hf / "tokenizer.model").read_bytes())
    rows = [[2, 5, 9, 13, 7, 11, 40], [2, 8]]
    want = gemma_jax.load(hf, dtype="float32").logits(rows)
    capfd.readouterr()
    got = gemma_jax.load(mm, dtype="float32").logits(rows)
    assert "reading its language model only (3 other tensors not read)" in capfd.readouterr().err
    np.testing.assert_array_equal(got, want)


def test_lora_fine_tuning_and_int8_run_on_gemma3n(saved, tmp_path):
    from gemma_jax.quantize import quantize_checkpoint
    from gemma_jax.train.config import TrainConfig
    from gemma_jax.train.run import finetune

    _, hf = saved
    text = "\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(12)) for i in range(200))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()))
    cfg = TrainConfig(ckpt=str(hf), data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "run"), steps=12, seq_len=32,
                      batch_size=8, learning_rate=1e-2, warmup_steps=2, lora_rank=4, save_every=12, eval_every=0,
                      export=("hf",), export_dtype="float32", mesh="fsdp=2")  # fmt: skip
    result = finetune(cfg, devices=jax.devices()[:2], progress=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the adapters learn
    merged = gemma_jax.load(result.export["hf"], dtype="float32")
    assert isinstance(merged.config, Gemma3nConfig)

    quantize_checkpoint(hf, tmp_path / "int8", scheme="w8a16", dtype="float32", quiet=True)
    q, f = gemma_jax.load(tmp_path / "int8"), gemma_jax.load(hf, dtype="float32")
    assert q.params["layer_0"]["attn"]["q"]["w"].dtype == jnp.int8
    rows = [[2, 5, 9, 13, 7, 11, 40, 41]]
    assert np.mean(q.logits(rows).argmax(-1) == f.logits(rows).argmax(-1)) >= 0.75


def test_plan_sizes_the_real_e4b(capsys):
    from gemma_jax.cli import main

    main(["plan", "--model", "gemma3n-e4b", "--chip", "v5e", "--mesh", "tensor=4", "--batch", "8", "--seq", "4096"])
    out = capsys.readouterr().out
    assert "largest parameter per_layer_embedder/embedding [262144, 8960]" in out and "fits" in out


def test_plan_decode_reads_rows_of_the_per_layer_table_not_all_of_it():
    """A decode step gathers B rows of the per-layer embedding [262144, 8960] (1.09 GiB per device on tensor=4):
    memory-bound at batch 1 and a short context, its speed is bandwidth over the other weights' bytes."""
    e4b = plan(Gemma3nConfig.from_preset("gemma3n-e4b"), {"tensor": 4}, chip="v5e", batch=1, seq=128)
    table = 262144 * 8960 * 2 // 4
    assert e4b.decode_bound == "memory"
    assert e4b.decode_tokens_per_s == pytest.approx(CHIPS["v5e"].bandwidth / (e4b.param_bytes - table), rel=0.01)
    assert any("per_layer_embedder/embedding only the rows" in note for note in e4b.assumptions)


# --- GGUF (llama.cpp's arch gemma3n): export, import, both ways bit-exact in f32 --------------------


@pytest.fixture(scope="module")
def saved_for_gguf(tmp_path_factory):
    """A saved Gemma3nForCausalLM that GGUF holds: LAuReL rank 64 (GGUF records no rank), a per-layer
    table as long as the vocabulary (llama.cpp indexes it by token id); KV sharing, sparsity, 4 streams."""
    from gemma_jax.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("g3n-gguf")
    model = make_hf_model(**CASES["altup4-share2-sparse"], vocab_size=512, vocab_size_per_layer_input=512, laurel_rank=64)
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.model").write_bytes((tiny_checkpoint(root / "cache") / "tokenizer.model").read_bytes())
    return model, root / "hf"


def test_gguf_export_from_the_command_line_imports_bit_exact(saved_for_gguf, tmp_path, monkeypatch):
    """`gemma-jax convert --to gguf` by relative paths, then back to HF: every tensor bit-equal, the same
    config, and gemma_jax.load of the GGUF gives the HF checkpoint's logits bit for bit."""
    import subprocess
    import shutil

    from safetensors.numpy import load_file

    from gemma_jax.convert import convert

    model, hf = saved_for_gguf
    shutil.copytree(hf, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    done = subprocess.run(["gemma-jax", "convert", "ckpt", "m.gguf", "--to", "gguf", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    convert("m.gguf", "back", to="hf", quiet=True)
    before, after = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(after) == set(before) - {"lm_head.weight"}
    for name, x in after.items():
        assert x.dtype == before[name].dtype and np.array_equal(x.view(np.uint8), before[name].view(np.uint8)), name
    config = Gemma3nConfig.from_hf(json.loads((hf / "config.json").read_text()))
    assert Gemma3nConfig.from_hf(json.loads((tmp_path / "back" / "config.json").read_text())) == config
    rows = [[2, 5, 9, 13, 7, 11, 40, 41, 60, 3, 500, 17], [2, 8]]
    from_gguf, from_hf = gemma_jax.load("m.gguf", dtype="float32"), gemma_jax.load("ckpt", dtype="float32")
    assert from_gguf.config == config
    np.testing.assert_array_equal(from_gguf.logits(rows), from_hf.logits(rows))
    with torch.no_grad():
        _close(from_gguf.logits(rows[:1])[0], model(torch.tensor(rows[:1])).logits.numpy()[0], "gguf vs transformers")


@pytest.mark.parametrize("kind", ["q8_0", "bf16", "f16"])
def test_gguf_quantized_exports_restore_within_a_step(kind, saved_for_gguf, tmp_path):
    """The stacked AltUp projections are quantized as one tensor and sliced back per stream."""
    import gguf

    from gemma_jax.checkpoint.gguf import load_gguf, save_gguf
    from gemma_jax.tokenizer import Tokenizer
    from test_gguf import _assert_restored

    model, hf = saved_for_gguf
    config, params = ours(model)
    tokenizer = Tokenizer.from_file(hf / "tokenizer.model")
    path = save_gguf(tmp_path / "m.gguf", config, params, tokenizer, type=kind)
    got_config, got, _ = load_gguf(path)
    assert got_config == config
    _assert_restored(params, got, kind)
    types = {t.name: (t.tensor_type.name, list(t.shape)) for t in gguf.GGUFReader(path).tensors}
    assert types["altup_proj.weight"] == ({"q8_0": "Q8_0", "bf16": "BF16", "f16": "F16"}[kind], [32, 32, 3])


def test_gguf_export_refuses_what_gguf_cannot_record(saved_for_gguf, tmp_path):
    """GGUF has no key for LAuReL's rank: a reload (and llama.cpp) would read 64."""
    from gemma_jax.checkpoint.gguf import save_gguf
    from gemma_jax.tokenizer import Tokenizer

    model, hf = saved_for_gguf
    config = ours(model)[0]
    tokenizer = Tokenizer.from_file(hf / "tokenizer.model")
    changed = dataclasses.replace(config, laurel_rank=4)
    params = unflatten_dict({s.path: np.zeros(s.shape, np.float32) for s in FAMILY.tensor_specs(changed).values()})
    with pytest.raises(ValueError, match=r"^GGUF \(gemma3n\) cannot represent this config: laurel_rank=4 \(GGUF gives 64\)$"):
        save_gguf(tmp_path / "m.gguf", changed, params, tokenizer)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("per_layer_vocab", [500, 530])
def test_gguf_per_layer_table_gets_one_row_per_token_id(per_layer_vocab, tmp_path):
    """As in the real E2B/E4B (262144 rows for 262400 ids): ids past the table read row 0, and GGUF's table has
    one row per id (llama.cpp indexes it so). The export's rows past the table copy row 0, and a longer
    table loses rows no id reads: the reloaded model gives every id the logits it gave."""
    from gemma_jax.checkpoint.gguf import load_gguf, save_gguf
    from gemma_jax.tiny import tiny_checkpoint
    from gemma_jax.tokenizer import Tokenizer

    model = make_hf_model(**CASES["altup4-share2-sparse"], vocab_size=512, vocab_size_per_layer_input=per_layer_vocab, laurel_rank=64)
    config, params = ours(model)
    tokenizer = Tokenizer.from_file(tiny_checkpoint(tmp_path / "cache") / "tokenizer.model")
    got_config, got, _ = load_gguf(save_gguf(tmp_path / "m.gguf", config, params, tokenizer))
    assert got_config == dataclasses.replace(config, per_layer_vocab_size=512)
    table, got_table = params["per_layer_embedder"]["embedding"], got["per_layer_embedder"]["embedding"]
    np.testing.assert_array_equal(got_table[: min(per_layer_vocab, 512)], table[:512])
    np.testing.assert_array_equal(got_table[per_layer_vocab:], np.broadcast_to(table[:1], got_table[per_layer_vocab:].shape))
    tokens = np.array([[2, 5, 499, 500, 505, 511, 9, 13]])
    run = lambda c, p: np.asarray(Transformer(c).apply({"params": p}, tokens, np.arange(8)[None], np.ones_like(tokens))[0])  # noqa: E731
    np.testing.assert_array_equal(run(got_config, got), run(config, params))


def test_gguf_import_refuses_edited_sizes_in_one_line(saved_for_gguf, tmp_path):
    """A layer count of 10^9 is refused before a config is built per layer; a stack of the wrong length names its tensor."""
    from gemma_jax.checkpoint.gguf import load_gguf, save_gguf
    from gemma_jax.tokenizer import Tokenizer
    from test_fuzz_loaders import _edit_gguf

    model, hf = saved_for_gguf
    config, params = ours(model)
    base = save_gguf(tmp_path / "m.gguf", config, params, Tokenizer.from_file(hf / "tokenizer.model"))
    layers = _edit_gguf(base, tmp_path / "layers.gguf", {"gemma3n.block_count value": 10**9})
    with pytest.raises(ValueError, match=r"layers.gguf: the config says 1000000000 layers, but the checkpoint holds only 121 tensors$"):
        load_gguf(layers)
    stack = _edit_gguf(base, tmp_path / "stack.gguf", {"altup_proj.weight dim 2": 2})
    with pytest.raises(ValueError, match=r"stack.gguf: tensor altup_proj.weight has shape \[2, 32, 32\] \(2048 elements\), "
                                         r"but the metadata implies \[3, 32, 32\] \(3072\)$"):
        load_gguf(stack)


@pytest.mark.parametrize("preset", ["gemma3n-e2b", "gemma3n-e4b"])
def test_real_configs_round_trip_through_gguf_metadata(preset):
    """The released sizes are what llama.cpp hard-codes (rank 64, width 256, KV from the first 20 layers);
    their GGUF keys give the config back, with the per-layer table one row per id."""
    from gemma_jax.models.gemma3n import gguf_meta

    config = Gemma3nConfig.from_preset(preset)
    assert (config.laurel_rank, config.per_layer_dim, config.num_layers - config.num_kv_shared_layers) == (64, 256, 20)
    meta = {"general.architecture": "gemma3n", "tokenizer.ggml.tokens": [""] * config.vocab_size, **gguf_meta.metadata_for(config)}
    assert gguf_meta.config_from_metadata(meta) == dataclasses.replace(config, per_layer_vocab_size=config.vocab_size)
