"""Classification heads against transformers' Gemma{,2,3Text}ForSequenceClassification and
Gemma{,2}ForTokenClassification (tiny random checkpoints): config, loading, scores, pooling."""

from __future__ import annotations

import json
import shutil
import subprocess

import jax
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from conftest import make_hf_model
from gemma_jax.api import load
from gemma_jax.models import family_of
from gemma_jax.models.gemma.config import GemmaConfig
from gemma_jax.models.heads import MULTI, REGRESSION, SEQUENCE, SINGLE, TOKEN, Head, pool_index

ARCH = {
    ("gemma", SEQUENCE): transformers.GemmaForSequenceClassification,
    ("gemma2", SEQUENCE): transformers.Gemma2ForSequenceClassification,
    ("gemma3_text", SEQUENCE): transformers.Gemma3TextForSequenceClassification,
    ("gemma", TOKEN): transformers.GemmaForTokenClassification,
    ("gemma2", TOKEN): transformers.Gemma2ForTokenClassification,
}
LABELS = ("neg", "neutral", "pos")


def make_classifier(model_type: str, task: str, *, labels=LABELS, seed: int = 0, **config) -> transformers.PreTrainedModel:
    """A random tiny transformers classifier: conftest's decoder, plus a random score (and bias)."""
    base = make_hf_model(model_type, seed=seed, **config)
    hf_config = base.config
    hf_config.id2label = dict(enumerate(labels))
    hf_config.label2id = {v: k for k, v in hf_config.id2label.items()}
    model = ARCH[model_type, task](hf_config).eval()
    model.model.load_state_dict(base.model.state_dict())
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        for p in model.score.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """Factory: (torch model, directory) of a saved tiny classifier, cached per arguments."""
    made = {}

    def make(model_type: str, task: str, **kwargs):
        key = (model_type, task, tuple(sorted(kwargs.items())))
        if key not in made:
            model = make_classifier(model_type, task, **kwargs)
            path = tmp_path_factory.mktemp(f"{model_type}-{task}")
            model.save_pretrained(path)
            made[key] = model, path
        return made[key]

    return make


def _batch(rows: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids, mask = np.full((len(rows), width), pad_id, np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # as generate() passes them: padding-independent RoPE
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.numpy()


ROWS = [[2, 17, 33, 54, 8, 91, 12, 40, 77, 5, 63], [2, 44, 9], [2, 71, 36, 19, 88, 23, 50]]  # none ends in pad id 0


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sequence_scores_match_transformers(classifier, model_type, left):
    torch_model, path = classifier(model_type, SEQUENCE)
    model = load(path, dtype="float32")
    assert model.config.head == Head(SEQUENCE, LABELS, SINGLE)
    ids, mask = _batch(ROWS, model.config.pad_id, left)
    want = _torch_logits(torch_model, ids, mask)  # [B L], pooled by transformers
    got = model.scores(ROWS)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{model_type} sequence {'left' if left else 'right'}: max|diff|/max|logit| = {err:.2e}")
    assert got.shape == (3, 3) and err < 1e-4


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_token_scores_match_transformers(classifier, model_type, left):
    torch_model, path = classifier(model_type, TOKEN)
    model = load(path, dtype="float32")
    assert model.config.head == Head(TOKEN, LABELS, SINGLE, bias=True)
    ids, mask = _batch(ROWS, model.config.pad_id, left)
    want = _torch_logits(torch_model, ids, mask)  # [B T L]
    got = model.scores(ROWS)  # one [T_i L] per row
    for i, row in enumerate(ROWS):
        span = slice(ids.shape[1] - len(row), None) if left else slice(0, len(row))
        err = np.abs(got[i] - want[i, span]).max() / np.abs(want[i, span]).max()
        print(f"{model_type} token row {i} {'left' if left else 'right'}: max|diff|/max|logit| = {err:.2e}")
        assert got[i].shape == (len(row), 3) and err < 1e-4


def test_pooling_follows_the_pad_token_rule(classifier):
    """Trailing pad ids inside a row are skipped, as transformers skips them; a row of pad ids only
    pools its first token (transformers' position 0 on a right-padded batch)."""
    torch_model, path = classifier("gemma2", SEQUENCE)
    model = load(path, dtype="float32")
    rows = [[2, 17, 33, 0, 0], [0, 0], [2, 44, 9]]
    ids, mask = _batch(rows, 0, left=False)
    want = _torch_logits(torch_model, ids, mask)
    np.testing.assert_allclose(model.scores(rows), want, rtol=0, atol=1e-4 * np.abs(want).max())
    index = pool_index(np.asarray(ids), np.asarray(mask) > 0, 0)
    assert index.tolist() == [2, 0, 2]


def test_without_pad_token_each_row_pools_its_last_token(classifier, tmp_path):
    """No pad_token_id: transformers takes the last token of a single row; each row of ours gets exactly that."""
    torch_model, path = classifier("gemma", SEQUENCE, pad_token_id=None)
    model = load(path, dtype="float32")
    assert not model.config.head.pad_token
    assert json.loads((path / "config.json").read_text())["pad_token_id"] is None
    rows = [[2, 17, 0, 0], [2, 5]]
    want = np.concatenate([_torch_logits(torch_model, np.array([r]), np.ones((1, len(r)), np.int64)) for r in rows])
    np.testing.assert_allclose(model.scores(rows), want, rtol=0, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="no padding token"):  # what transformers does with a batch
        _torch_logits(torch_model, *_batch(rows, 0, left=False))


def test_batching_and_padding_invariant(classifier):
    _, path = classifier("gemma2", SEQUENCE)
    model = load(path, dtype="float32")
    together = model.scores(ROWS)
    alone = np.concatenate([model.scores([r]) for r in ROWS])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_head_config_round_trips_through_config_json():
    hf = {"architectures": ["Gemma2ForSequenceClassification"], "id2label": {"1": "b", "0": "a"},
          "problem_type": MULTI, "pad_token_id": None}  # fmt: skip
    head = Head.from_hf(hf)
    assert head == Head(SEQUENCE, ("a", "b"), MULTI, pad_token=False)
    assert Head.from_hf(head.to_hf("gemma2")) == head
    assert Head.from_hf({"architectures": ["GemmaForSequenceClassification"], "num_labels": 1}).problem_type == REGRESSION
    assert Head.from_hf({"architectures": ["Gemma2ForTokenClassification"]}).labels == ("LABEL_0", "LABEL_1")  # transformers' default
    assert Head.from_hf({"architectures": ["Gemma2ForCausalLM"], "id2label": {"0": "x"}}).is_lm


@pytest.mark.parametrize(
    "change, message",
    [
        ({"id2label": {"0": "a", "2": "b"}}, "field 'id2label' keys must be label ids 0..n-1"),
        ({"id2label": {"0": "a", "1": "a"}}, "field 'id2label' names a label twice"),
        ({"problem_type": "ranking"}, "field 'problem_type' is 'ranking'"),
        ({"model_type": "gemma3_text", "architectures": ["Gemma3TextForTokenClassification"]}, "no token-classification model"),
    ],
)
def test_bad_head_config_is_one_line_naming_the_key(classifier, tmp_path, change, message):
    _, path = classifier("gemma", TOKEN)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = {**json.loads((path / "config.json").read_text()), **change}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        load(bad, dtype="float32")
    assert str(bad / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_orbax_stores_the_head(tmp_path):
    """Our Orbax config is `dataclasses.asdict(config)`: the head comes back as a Head."""
    import dataclasses

    config = GemmaConfig(model_type="gemma", vocab_size=8, embed_dim=8, num_layers=1, num_heads=1, num_kv_heads=1,
                         head_dim=8, mlp_dim=8, query_pre_attn_scalar=8, head=Head.classifier(TOKEN, ("x", "y")))  # fmt: skip
    assert GemmaConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def _run_cli(*args: str, cwd) -> None:
    done = subprocess.run(["gemma-jax", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("model_type, task", [("gemma2", SEQUENCE), ("gemma", TOKEN)])
def test_hf_orbax_hf_round_trip_is_bit_exact(classifier, tmp_path, model_type, task):
    """convert HF -> Orbax -> HF (relative paths, as users type them): every tensor and the head unchanged."""
    from safetensors.numpy import load_file

    _, path = classifier(model_type, task)
    _run_cli("convert", str(path), "orbax", "--to", "orbax", "--quiet", cwd=tmp_path)
    _run_cli("convert", "orbax", "hf", "--to", "hf", "--quiet", cwd=tmp_path)
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after) and "score.weight" in after and ("score.bias" in after) == (task == TOKEN)
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [ARCH[model_type, task].__name__] and config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert GemmaConfig.from_hf(config) == load(path, dtype="float32").config


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_int8_quantizes_the_decoder_and_keeps_the_head_float(classifier, tmp_path, scheme):
    from gemma_jax.checkpoint.orbax import load_orbax

    _, path = classifier("gemma2", SEQUENCE)
    _run_cli("quantize", str(path), "q8", "--scheme", scheme, "--dtype", "float32", "--quiet", cwd=tmp_path)
    _, params, _ = load_orbax(tmp_path / "q8")
    assert params["layer_0"]["attn"]["q"]["w"].dtype == np.int8 and params["score"]["w"].dtype == np.float32
    float_model, int8_model = load(path, dtype="float32"), load(tmp_path / "q8")
    assert int8_model.quant == scheme
    np.testing.assert_array_equal(np.asarray(params["score"]["w"]), np.asarray(float_model.params["score"]["w"]))
    want, got = float_model.scores(ROWS), int8_model.scores(ROWS)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # int8 decoder: close, not exact
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gguf_refuses_a_classifier(classifier, tmp_path):
    """llama.cpp's format has no classifier head: refused in one line, nothing written."""
    _, path = classifier("gemma2", SEQUENCE)
    done = subprocess.run(["gemma-jax", "convert", str(path), "out.gguf", "--to", "gguf", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert done.stderr.strip() == "gemma-jax convert: error: GGUF holds causal LMs only; this is a sequence-classification " \
                                  "checkpoint (convert it to hf or orbax)"
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("quant", [None, "w8a16"])
@pytest.mark.parametrize("head", [Head.classifier(SEQUENCE, LABELS), Head.classifier(TOKEN, LABELS)], ids=["sequence", "token"])
def test_schema_rows_of_the_head_are_what_the_module_creates(head, quant):
    """The score rows (and only they) join the decoder's: float under int8, with the schema's shapes and axes."""
    config = GemmaConfig(model_type="gemma2", vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=8, mlp_dim=24, query_pre_attn_scalar=8, head=head)  # fmt: skip
    family = family_of(config)
    shapes = flatten_dict(jax.eval_shape(lambda: family.init_params(config, jax.random.PRNGKey(0), quant=quant)))
    axes = flatten_dict(family.param_axes(config, quant))
    specs = {s.path: s for s in family.tensor_specs(config).values() if s.path[0] == "score"}
    assert set(specs) == {p for p in shapes if p[0] == "score"} == {("score", "w")} | ({("score", "b")} if head.bias else set())
    for path, spec in specs.items():
        assert (tuple(shapes[path].shape), shapes[path].dtype, axes[path]) == (spec.shape, np.float32, spec.param.axes)
        assert family.logical_axes(path) == spec.param.axes and spec.gguf_name is None
    assert specs[("score", "w")].hf_name == "score.weight" and specs[("score", "w")].shape == (3, 16)
