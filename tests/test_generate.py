"""Generation: equality with `transformers` greedy decoding, batching, sampling, stopping, streaming, errors."""

from __future__ import annotations

import json

import pytest
import torch

import gemma_jax
from gemma_jax import generate as gen
from gemma_jax.sampling import Sampler
from gemma_jax.tiny import tiny_checkpoint

WINDOW = 8


@pytest.fixture(scope="module")
def gemma2(hf_checkpoint):
    torch_model, path = hf_checkpoint("gemma2", seed=8, weight_scale=1.5, post_norm_offset=10.0, num_hidden_layers=4)
    return torch_model, gemma_jax.load(path, dtype="float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded demo checkpoint (random weights, real tokenizer), built in a temp dir."""
    return gemma_jax.load(tiny_checkpoint(tmp_path_factory.mktemp("cache")), dtype="float32")


def _hf_greedy(torch_model, prompt: list[int], new: int) -> list[int]:
    out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=1, pad_token_id=0)
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(1)] if 1 in tokens else tokens


def test_greedy_matches_transformers_far_past_the_window(gemma2):
    torch_model, ours = gemma2
    prompt = [2, 17, 33, 5, 71, 9, 42, 11, 60, 23]
    new = 4 * WINDOW
    got = ours.generate([prompt], max_new_tokens=new)[0]
    assert got == _hf_greedy(torch_model, prompt, new)
    assert len(got) >= 3 * WINDOW and len(set(got)) > 5  # long and not a degenerate repeat


def test_batch_of_different_lengths_equals_each_prompt_alone(gemma2):
    _, ours = gemma2
    prompts = [[2, 9, 14], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [2, 77], list(range(3, 30))]
    batched = ours.generate(prompts, max_new_tokens=3 * WINDOW)
    alone = [ours.generate([p], max_new_tokens=3 * WINDOW)[0] for p in prompts]
    assert batched == alone


def test_compiled_once_per_shape_bucket(gemma2):
    _, ours = gemma2
    ours.generate([[2, 3, 4]], max_new_tokens=5)
    compiled = lambda: (gen._prefill._cache_size(), gen._decode._cache_size())
    before = compiled()
    ours.generate([[2, 3, 4, 5, 6]], max_new_tokens=9)  # same buckets: prompt <= 16, new <= 16, batch 1
    ours.generate([[2, 8]], max_new_tokens=16, temperature=0.7, top_p=0.8, seed=1)
    ours.generate([[2, 8]], max_new_tokens=16, temperature=1.3, top_p=0.5, seed=2)  # traced values only
    assert compiled() == (before[0] + 1, before[1] + 1)  # greedy programs reused; one sampling pair added


def test_sampling_is_seeded_and_top_k_1_is_greedy(gemma2):
    _, ours = gemma2
    prompt = [[2, 5, 6, 7]]
    sample = lambda **kw: ours.generate(prompt, max_new_tokens=20, temperature=1.5, **kw)[0]
    assert sample(seed=3) == sample(seed=3)
    assert sample(seed=3) != sample(seed=4)
    assert sample(seed=3, top_k=1) == ours.generate(prompt, max_new_tokens=20)[0]
    assert sample(seed=5, top_p=1e-6) == ours.generate(prompt, max_new_tokens=20)[0]  # nucleus of one token


def test_rows_sample_independently_of_batch_composition(gemma2):
    _, ours = gemma2
    a = ours.generate([[2, 5, 6], [2, 9]], max_new_tokens=12, temperature=1.0, seed=11)
    b = ours.generate([[2, 5, 6], [2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]], max_new_tokens=12, temperature=1.0, seed=11)
    assert a[0] == b[0]


def test_stop_token_ends_a_row_and_is_excluded(gemma2):
    _, ours = gemma2
    prompt = [2, 17, 33, 5]
    free = gen.generate(ours.config, ours.params, [prompt], max_new_tokens=20, sampler=Sampler())
    stop = free.tokens[0][6]
    cut = gen.generate(ours.config, ours.params, [prompt], max_new_tokens=20, sampler=Sampler(), stop_ids=(stop,))
    assert cut.tokens[0] == free.tokens[0][: free.tokens[0].index(stop)]
    assert cut.finish_reasons == ["stop"] and free.finish_reasons == ["length"]


def test_stop_strings_and_streaming(tiny):
    free = tiny.complete(["The license"], max_new_tokens=24)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 24
    stop = free.text[len(free.text) // 2 :][:3]
    streamed: list[str] = []
    [cut] = tiny.complete(["The license"], max_new_tokens=24, stop=[stop], stream=lambda row, text: streamed.append(text))
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop" and len(cut.tokens) < 24
    assert "".join(streamed) == cut.text


def test_stop_string_cuts_tokens_and_stream_with_the_text(tiny, text_checkpoint):
    [chat] = tiny.complete(["Hi"], max_new_tokens=24, chat=True, stop=["\n"])
    assert chat.finish_reason == "stop" and tiny.tokenizer.decode(chat.tokens) == chat.text
    model = gemma_jax.load(text_checkpoint[1], dtype="float32")  # its greedy text varies
    decode = model.tokenizer.decode
    free = model.complete(["The license"], max_new_tokens=24)[0]
    edge = len(decode(free.tokens[:9]))  # where the prefill's token and the first 8-token decode chunk end
    for stop, start in [(free.text[edge : edge + 2], edge), (free.text[edge - 1 : edge + 1], edge - 1)]:
        assert free.text.find(stop) == start  # on a token boundary, then across one (and across chunks)
        streamed: list[str] = []
        [cut] = model.complete(["The license"], max_new_tokens=24, stop=[stop], stream=lambda _, text: streamed.append(text))
        assert cut.finish_reason == "stop" and cut.text == free.text[:start] == "".join(streamed)
        assert cut.tokens == free.tokens[:9]  # the tokens that made the text (+ the stop's start, across a token)


def test_the_first_token_is_emitted_by_the_prefill(gemma2, monkeypatch):
    """A stream sees each row's first token before any decode step runs (time to first token = one prefill),
    and a single new token needs no decode program at all."""
    _, ours = gemma2
    prompts, calls = [[2, 17, 33, 5], [2, 9]], []
    free = gen.generate(ours.config, ours.params, prompts, max_new_tokens=12, sampler=Sampler())
    decode = gen._decode
    monkeypatch.setattr(gen, "_decode", lambda *a, **k: (calls.append("decode"), decode(*a, **k))[1])
    seen = lambda out: (calls.append(out[:, 0].tolist() if out.shape[1] == 1 else "chunk"), [False] * len(out))[1]
    streamed = gen.generate(ours.config, ours.params, prompts, max_new_tokens=12, sampler=Sampler(), on_tokens=seen)
    assert streamed.tokens == free.tokens
    assert calls[:2] == [[t[0] for t in free.tokens], "decode"]
    calls.clear()
    one = gen.generate(ours.config, ours.params, prompts, max_new_tokens=1, sampler=Sampler(), on_tokens=seen)
    assert one.tokens == [t[:1] for t in free.tokens] and one.finish_reasons == ["length"] * 2
    assert calls == [[t[0] for t in free.tokens]]


def test_chat_prompt_uses_the_template(tiny):
    messages = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    a = tiny.generate([messages], max_new_tokens=5, chat=True)
    b = tiny.generate([tiny.tokenizer.encode_chat(messages)], max_new_tokens=5)
    assert a == [tiny.tokenizer.decode(b[0])]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0, temperature=1.0), "top_k"),
        (dict(top_p=1.5, temperature=1.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(seed=2**70), "seed"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_sampling_arguments_are_named(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(["hello"], **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts_are_rejected(tiny):
    too_long = [[2] + [5] * tiny.config.max_position]
    with pytest.raises(ValueError, match="context"):
        tiny.generate(too_long, max_new_tokens=4)
    with pytest.raises(ValueError, match="context"):
        tiny.logits(too_long)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate([[2, tiny.config.vocab_size]], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        tiny.generate([""], max_new_tokens=4)
    for text in ["\ud800", "caf\udce9"]:  # from JSON "\ud800"; from argv bytes b"caf\xe9" (surrogateescape)
        with pytest.raises(ValueError, match="not valid UTF-8: character 3|not valid UTF-8: character 0"):
            tiny.generate([text], max_new_tokens=4)
    with pytest.raises(ValueError, match="list"):
        tiny.generate("hello", max_new_tokens=4)


def test_bad_checkpoints_are_rejected(tmp_path, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        gemma_jax.load(tmp_path / "nowhere")
    _, path = hf_checkpoint("gemma2")
    config = json.loads((path / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="llama"):
        gemma_jax.load(bad)
