"""Fine-tuning data: encoding, chat loss masks, packing, resumable batches, packed == unpacked loss."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import jax
import numpy as np
import pytest

import gemma_jax
from gemma_jax.tokenizer import END_OF_TURN, Tokenizer
from gemma_jax.train.cli import add_arguments
from gemma_jax.train.config import TrainConfig, load_train_config, parse_overrides, schedule_change
from gemma_jax.train.data import Batches, Example, eval_batches, encode_record, pack, read_examples
from gemma_jax.train.step import StepSpec, loss_sums
from gemma_jax.sharding import RULE_SETS, Layout, make_mesh


@pytest.fixture(scope="module")
def tokenizer(text_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(text_checkpoint[1] / "tokenizer.model")


def _example(n: int, start: int = 10) -> Example:
    return Example(np.arange(start, start + n, dtype=np.int32), np.ones(n, np.float32))


def test_chat_loss_weights_only_model_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is free software?"},
        {"role": "assistant", "content": "Software you may run, study, share and change."},
        {"role": "user", "content": "Is it about price?"},
        {"role": "model", "content": "No, about freedom."},
        {"role": "user", "content": "Thanks"},
    ]
    ex = encode_record({"messages": messages}, tokenizer)
    weighted = ex.ids[ex.weights == 1]
    assert tokenizer.decode(weighted) == (
        f"Software you may run, study, share and change.{END_OF_TURN}No, about freedom.{END_OF_TURN}"
    )
    # Every user and system token, and every turn header, weighs zero; the trailing user turn is dropped.
    rendered = tokenizer.apply_chat_template(messages[:5], add_generation_prompt=False)
    assert tokenizer.decode(ex.ids) == rendered[: rendered.rindex(END_OF_TURN) + len(END_OF_TURN)].removeprefix("<bos>")
    assert ex.ids[0] == tokenizer.bos_id
    for text in ("What is free software?", "Is it about price?", "Answer briefly."):
        piece = tokenizer.encode(text)
        starts = [i for i in range(len(ex.ids)) if list(ex.ids[i : i + len(piece)]) == piece]
        assert len(starts) == 1 and not ex.weights[starts[0] : starts[0] + len(piece)].any(), text
    # A model turn is tokenized as generation produces it: right after "<start_of_turn>model\n".
    prompt = tokenizer.encode_chat(messages[:1] + messages[1:2])
    assert list(ex.ids[: len(prompt)]) == prompt and not ex.weights[: len(prompt)].any()
    assert ex.weights[len(prompt)] == 1


def test_text_records_and_errors(tokenizer, tmp_path):
    ex = encode_record({"text": "Hello world"}, tokenizer)
    assert list(ex.ids) == tokenizer.encode("Hello world", add_bos=True, add_eos=True) and ex.weights.all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        read_examples(bad, tokenizer)
    bad.write_text(json.dumps({"messages": [{"role": "model", "content": "first"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1.*expected role user"):
        read_examples(bad, tokenizer)


def test_packing_keeps_documents_apart():
    rows = pack([_example(5, 10), _example(4, 20), _example(9, 30), _example(1, 40), _example(3, 50)], seq_len=6)
    # pairs per document: 4, 3, 8 (cut 6 + 2), none (1 token: dropped), 2
    assert rows.segments.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 0, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 0, 0]]
    assert rows.inputs[3].tolist() == [36, 37, 50, 51, 0, 0] and rows.targets[3].tolist() == [37, 38, 51, 52, 0, 0]
    real = rows.segments > 0
    assert (rows.targets[real] == rows.inputs[real] + 1).all()  # each token predicts the next of its own document
    assert (rows.weights == real).all()


def test_batches_are_a_function_of_the_step():
    rows = pack([_example(4, 10 * i) for i in range(1, 6)], seq_len=3)  # 5 rows, one document each
    a, b = Batches(rows, 4, seed=(1, 2)), Batches(rows, 4, seed=(1, 2))
    for step in (3, 0, 7):
        assert all((a(step)[k] == b(step)[k]).all() for k in a(step))
    epoch = np.concatenate([a(s)["inputs"][:, 0] for s in range(5)])[:10]  # 20 rows = 4 epochs; check the first two
    assert sorted(epoch[:5]) == sorted(epoch[5:]) == [10, 20, 30, 40, 50]
    assert not (Batches(rows, 4, seed=(1, 3))(0)["inputs"] == a(0)["inputs"]).all()
    last = list(eval_batches(rows, 4))[-1]
    assert last["weights"][1:].sum() == 0 and last["segments"][1:].sum() == 0


def test_packed_rows_give_each_document_its_unpacked_loss(text_checkpoint, tokenizer):
    model = gemma_jax.load(text_checkpoint[1], dtype="float32")
    texts = ["Free software.", "The GNU General Public License is a free, copyleft license.", "Preamble", "You may copy it."]
    examples = [encode_record({"text": t}, tokenizer) for t in texts]
    packed = pack(examples, seq_len=48)
    assert len(packed) == 1 and packed.segments.max() == 4
    cfg = TrainConfig(ckpt="-", data="-", out="-", seq_len=48, batch_size=1)
    spec = StepSpec.create(cfg, model.config, Layout(make_mesh("data=1", devices=jax.devices()[:1]), RULE_SETS["training"]))
    loss = jax.jit(lambda batch: loss_sums(model.params, {}, batch, spec))
    for doc, ex in enumerate(examples, 1):
        alone = pack([ex], seq_len=48).take(np.array([0]))
        inside = packed.take(np.array([0]))
        inside["weights"] = inside["weights"] * (inside["segments"] == doc)
        (want, n_want), (got, n_got) = loss(alone), loss(inside)
        assert n_got == n_want == len(ex.ids) - 1
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_config_layers_and_overrides():
    overrides = parse_overrides(["learning_rate=3e-4", "lora_targets=[q, v]"])
    cfg = load_train_config("lora", {"ckpt": "c", "data": "d", "out": "o", **overrides})
    assert cfg.lora_rank == 16 and cfg.learning_rate == 3e-4 and cfg.lora_targets == ("q", "v") and cfg.micro_batch == 16
    with pytest.raises(ValueError, match="unknown fine-tuning settings"):
        load_train_config(None, {"ckpt": "c", "data": "d", "out": "o", "learning_rat": 1.0})
    with pytest.raises(ValueError, match="not a multiple of grad_accum"):
        TrainConfig(ckpt="c", data="d", out="o", batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="unknown fine-tuning config"):
        load_train_config("nope", {})


def test_short_runs_warm_up_within_the_run_and_lora_trains_at_the_lora_rate():
    """Warm-up is 10% of the run (at most 100 steps): a 10-step run used to warm up for 100 and never move."""
    run = lambda **kw: TrainConfig(ckpt="c", data="d", out="o", **kw)  # noqa: E731
    assert [run(steps=n).schedule()["warmup_steps"] for n in (1, 10, 40, 1000, 5000)] == [0, 1, 4, 100, 100]
    assert run(steps=10).schedule()["learning_rate"] == 1e-5
    assert run(steps=10, lora_rank=4).schedule()["learning_rate"] == 2e-4  # --lora-rank alone: LoRA's rate
    assert run(steps=10, lora_rank=4, learning_rate="1e-3").schedule()["learning_rate"] == 1e-3
    assert load_train_config("full", {"ckpt": "c", "data": "d", "out": "o", "steps": 10}).schedule()["warmup_steps"] == 1
    with pytest.raises(ValueError, match=r"warmup_steps=10 must be in \[0, steps=10\)"):
        run(steps=10, warmup_steps=10)
    layout = Layout(make_mesh("data=1", devices=jax.devices()[:1]), RULE_SETS["training"])
    schedule = StepSpec.create(run(steps=10, lora_rank=4), gemma_jax.GemmaConfig.from_preset("gemma2-2b"), layout).schedule()
    np.testing.assert_allclose([schedule(0), schedule(1), schedule(10)], [0, 2e-4, 2e-5], rtol=1e-6)  # peak at step 1


def test_settings_go_anywhere_on_the_line_and_help_lists_them():
    from gemma_jax.cli import build_parser

    line = ["finetune", "seq_len=64", "--ckpt", "c", "learning_rate=3e-4", "--data", "d", "lora_targets=[q, v]", "--out", "o"]
    args = build_parser().parse_args(line)
    assert args.overrides == ["seq_len=64", "learning_rate=3e-4", "lora_targets=[q, v]"] and args.data == "d"
    standalone = add_arguments(argparse.ArgumentParser())
    assert standalone.parse_args(line[1:]).overrides == args.overrides
    with pytest.raises(SystemExit):
        standalone.parse_args([*line[1:], "--bogus"])
    text = standalone.format_help()
    assert all(re.search(rf"^  {f.name}\b", text, re.M) for f in dataclasses.fields(TrainConfig))
    assert "steps=1000 " in text and "default 1e-5, or 2e-4 with LoRA" in text


def test_resuming_with_other_steps_says_the_schedule_changes():
    saved = TrainConfig(ckpt="c", data="d", out="o", steps=20).schedule()
    assert schedule_change(saved, TrainConfig(ckpt="c", data="d", out="o", steps=20)) is None
    change = schedule_change(saved, TrainConfig(ckpt="c", data="d", out="o", steps=40))
    assert change == "steps 20 -> 40, warmup_steps 2 -> 4"
    assert schedule_change({}, TrainConfig(ckpt="c", data="d", out="o", steps=40)) is None  # a checkpoint without one
