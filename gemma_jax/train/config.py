"""Fine-tuning run configuration: one flat dataclass, filled from defaults < YAML < command line.

Flat (no nesting) so that every field can be overridden the same way from the command line
(`learning_rate=3e-4`) and read back from the `train_config.yaml` a run writes into RUN_DIR.
Shipped configs live in `configs/finetune/NAME.yaml`; `--config` takes such a name or a path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gemma_jax import configs

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # every projection ("all-linear" LoRA)
EXPORT_FORMATS = ("hf", "orbax")  # those of `gemma-jax convert` that hold a merged model
# Peak learning rates when none is given: full fine-tuning moves pretrained weights gently; LoRA's
# zero-initialised adapters need a rate about 20x higher to learn anything in a short run.
DEFAULT_LEARNING_RATE = {"full": 1e-5, "lora": 2e-4}
# Warm-up when none is given: this fraction of the run, at most WARMUP_CAP steps, so a short run
# reaches its peak rate early instead of spending all its steps (or more) warming up.
WARMUP_FRACTION, WARMUP_CAP = 0.1, 100
SCHEDULE_FIELDS = ("steps", "learning_rate", "warmup_steps", "min_lr_ratio")  # what shapes the learning-rate curve


def _setting(default: Any, help: str) -> Any:
    """A TrainConfig field (dataclasses.MISSING: required) with its line in `settings_help`."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning run needs. Batch sizes count packed rows of `seq_len` tokens."""

    ckpt: str = _setting(dataclasses.MISSING, "source checkpoint: HF directory, .gguf file, or anything gemma_jax.load opens")
    data: str = _setting(dataclasses.MISSING, 'training JSONL: {"text": ...} or {"messages": [...]} per line (chat: loss on replies)')
    out: str = _setting(dataclasses.MISSING, "RUN_DIR: checkpoints, metrics.jsonl, train_config.yaml, export/")
    eval_data: str | None = _setting(None, "evaluation JSONL (same format): loss and perplexity every eval_every steps")
    task: str | None = _setting(None, "causal-lm, sequence-classification ({\"text\", \"label\"} lines) or "
                                      "token-classification ({\"tokens\", \"labels\"} lines); default: the checkpoint's own. "
                                      "A classifier on a causal LM gets a new head labelled from the data")
    steps: int = _setting(1000, "optimizer steps")
    seq_len: int = _setting(1024, "tokens per packed row (at most the model's context)")
    batch_size: int = _setting(8, "rows per optimizer step (global, over all devices)")
    grad_accum: int = _setting(1, "micro-batches per step: batch_size / grad_accum rows go through the model at once")
    learning_rate: float | None = _setting(None, "peak rate after warm-up, then cosine decay to min_lr_ratio * peak at "
                                                 "`steps`; default 1e-5, or 2e-4 with LoRA (lora_rank > 0)")
    warmup_steps: int | None = _setting(None, "linear warm-up steps from 0 to the peak; default 10% of steps, at most 100")
    min_lr_ratio: float = _setting(0.1, "the rate at the last step, as a fraction of the peak")
    weight_decay: float = _setting(0.0, "AdamW's decoupled decay, on matrices only (not norms)")
    adam_b1: float = _setting(0.9, "AdamW beta1")
    adam_b2: float = _setting(0.999, "AdamW beta2")
    adam_eps: float = _setting(1e-8, "AdamW epsilon")
    max_grad_norm: float = _setting(1.0, "global-norm gradient clipping; 0 disables")
    param_dtype: str = _setting("float32", "trained params (master weights); AdamW's 2nd moment follows it, its 1st is float32")
    base_dtype: str | None = _setting(None, "LoRA: the frozen base's dtype (default: param_dtype)")
    compute_dtype: str | None = _setting(None, "activations (default: float32 on CPU, bfloat16 elsewhere)")
    remat: str = _setting("none", "rematerialisation: none, block or dots (block saves the most memory)")
    scan: bool = _setting(False, "run the layers as one lax.scan over whole periods of the layer pattern (compile time independent of depth)")
    mesh: str | None = _setting(None, "device mesh, e.g. fsdp=8 or data=2,fsdp=4 (default: every device on fsdp)")
    dcn: str | None = _setting(None, "multi-slice: mesh sizes across slices, e.g. data=2 (mesh then sizes one slice)")
    lora_rank: int = _setting(0, "rank of LoRA adapters on a frozen base; 0: full fine-tuning")
    lora_alpha: float = _setting(16.0, "the LoRA update is scaled by lora_alpha / lora_rank")
    lora_targets: tuple[str, ...] = _setting(DEFAULT_TARGETS, "projections that get adapters")
    quant: str | None = _setting(None, "LoRA on an int8 base: w8a16 or w8a8 (the base is quantized on load)")
    seed: int = _setting(0, "LoRA initialisation and data order")
    save_every: int = _setting(500, "checkpoint every N steps (and at the end, and on SIGTERM)")
    keep: int = _setting(3, "checkpoints kept")
    eval_every: int = _setting(200, "evaluate every N steps; 0: only at the end")
    eval_batches: int | None = _setting(None, "cap on eval batches per evaluation (default: the whole eval set)")
    export: tuple[str, ...] = _setting(EXPORT_FORMATS, "formats of the final merged model, in RUN_DIR/export/<format>")
    export_dtype: str = _setting("bfloat16", "dtype of the exported model")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML reads "1e-5" as a string and "[q, v]" as a list
            value = getattr(self, f.name)
            kind = f.type.removesuffix(" | None")
            if kind in ("int", "float") and isinstance(value, (str, int, float)):
                object.__setattr__(self, f.name, (int if kind == "int" else float)(value))
            elif f.type.startswith("tuple") and value is not None:
                object.__setattr__(self, f.name, (value,) if isinstance(value, str) else tuple(value))
        positive = ("steps", "seq_len", "batch_size", "grad_accum", "save_every", "keep")
        bad = [f"{name}={getattr(self, name)!r}" for name in positive if int(getattr(self, name)) < 1]
        if bad:
            raise ValueError(f"these settings must be positive: {', '.join(bad)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
        if self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
            raise ValueError("lora_rank must be >= 0, and LoRA needs at least one target")
        if set(self.export) - set(EXPORT_FORMATS):
            raise ValueError(f"unknown export formats {sorted(set(self.export) - set(EXPORT_FORMATS))}; known: {EXPORT_FORMATS}")
        if self.quant is not None and not self.lora_rank:
            raise ValueError("an int8 base (quant) is frozen, so it needs LoRA (lora_rank > 0)")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}): "
                             "a warm-up as long as the run never reaches the learning rate")  # fmt: skip

    def schedule(self) -> dict[str, Any]:
        """The learning-rate curve's settings (SCHEDULE_FIELDS), defaults resolved.

        learning_rate: DEFAULT_LEARNING_RATE of the mode (LoRA when lora_rank > 0, else full);
        warmup_steps: WARMUP_FRACTION of the steps (at least 1), at most WARMUP_CAP.
        """
        mode = "lora" if self.lora_rank else "full"
        lr = DEFAULT_LEARNING_RATE[mode] if self.learning_rate is None else self.learning_rate
        warmup = self.warmup_steps
        if warmup is None:
            warmup = min(WARMUP_CAP, max(1, round(WARMUP_FRACTION * self.steps)), self.steps - 1)
        return {"steps": self.steps, "learning_rate": lr, "warmup_steps": warmup, "min_lr_ratio": self.min_lr_ratio}

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def load_train_config(config: str | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """TrainConfig from a shipped config name or YAML path (optional), then `overrides` on top."""
    values: dict[str, Any] = {}
    if config:
        path = Path(config)
        text = path.read_text() if path.suffix in (".yaml", ".yml") or path.is_file() else configs.finetune_preset_text(config)
        values = yaml.safe_load(text) or {}
    values.update(overrides)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {unknown}; known: {', '.join(sorted(fields))}")
    missing = [name for name in ("ckpt", "data", "out") if values.get(name) is None]
    if missing:
        raise ValueError(f"missing required settings: {', '.join(missing)}")
    return TrainConfig(**values)


def settings_help() -> str:
    """Every setting, its default and what it does: the KEY=VALUE list that `--help` shows."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.default is dataclasses.MISSING:
            key = f"{f.name} (required)"
        elif f.default is None:
            key = f.name
        else:
            value = list(f.default) if isinstance(f.default, tuple) else f.default
            key = f"{f.name}={yaml.safe_dump(value, default_flow_style=True).splitlines()[0]}"  # as KEY=VALUE reads it
        lines.append(f"  {key:<34} {f.metadata['help']}")
    return "\n".join(lines)


def schedule_change(saved: Mapping[str, Any], cfg: TrainConfig) -> str | None:
    """How `cfg`'s learning-rate schedule differs from the `saved` one (a checkpoint's), or None if it does not."""
    now = cfg.schedule()
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in SCHEDULE_FIELDS if k in saved and saved[k] != now[k]]
    return ", ".join(changed) or None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["learning_rate=3e-4", "lora_targets=[q, v]"] -> {"learning_rate": 0.0003, ...}; values are YAML."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
