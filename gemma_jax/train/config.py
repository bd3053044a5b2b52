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

import configs

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # every projection ("all-linear" LoRA)
EXPORT_FORMATS = ("hf", "orbax")  # those of `gemma-jax convert` that hold a merged model


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning run needs. Batch sizes count packed rows of `seq_len` tokens."""

    ckpt: str  # source checkpoint (HF directory, or anything `gemma_jax.load` opens)
    data: str  # training JSONL: {"text": ...} or {"messages": [{"role", "content"}, ...]} per line
    out: str  # RUN_DIR: checkpoints, metrics.jsonl, train_config.yaml, export/
    eval_data: str | None = None
    steps: int = 1000  # optimizer steps
    seq_len: int = 1024
    batch_size: int = 8  # rows per optimizer step (global, over all devices)
    grad_accum: int = 1  # micro-batches per step: batch_size / grad_accum rows go through the model at once
    learning_rate: float = 1e-5  # peak, after linear warm-up; cosine decay to min_lr_ratio * peak at `steps`
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW's decoupled decay, on matrices only (not norms)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables
    param_dtype: str = "float32"  # trained params (master weights); AdamW's 2nd moment follows it, its 1st is float32
    base_dtype: str | None = None  # LoRA: the frozen base's dtype (default: param_dtype)
    compute_dtype: str | None = None  # activations; default float32 on CPU, bfloat16 elsewhere
    remat: str = "none"  # "none", "block" or "dots" (see gemma_jax.model.REMAT_POLICIES)
    mesh: str | None = None  # e.g. "fsdp=8" or "data=2,fsdp=4"; default: every device on fsdp
    dcn: str | None = None  # multi-slice: mesh sizes across slices, e.g. "data=2" (`mesh` then sizes one slice)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0  # the LoRA update is scaled by alpha / rank
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    quant: str | None = None  # LoRA on an int8 base: "w8a16" or "w8a8" (the base is quantized on load)
    seed: int = 0
    save_every: int = 500  # checkpoint every N steps (and at the end, and on SIGTERM)
    keep: int = 3  # checkpoints kept
    eval_every: int = 200  # 0: only at the end
    eval_batches: int | None = None  # cap on eval batches per evaluation (None: the whole eval set)
    export: tuple[str, ...] = EXPORT_FORMATS  # formats of the final merged model, in RUN_DIR/export/<format>
    export_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML reads "1e-5" as a string and "[q, v]" as a list
            value = getattr(self, f.name)
            if f.type in ("int", "float") and isinstance(value, (str, int, float)):
                object.__setattr__(self, f.name, (int if f.type == "int" else float)(value))
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


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["learning_rate=3e-4", "lora_targets=[q, v]"] -> {"learning_rate": 0.0003, ...}; values are YAML."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
