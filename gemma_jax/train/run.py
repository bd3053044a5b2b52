"""`finetune(config)`: the whole run — load, pack, train, evaluate, checkpoint, resume, export.

RUN_DIR (`config.out`) receives:
  train_config.yaml   the resolved settings
  metrics.jsonl       one record per step (loss, grad norm, lr, tokens/s, MFU) and per evaluation
                      (loss and perplexity; a classifier's: loss, accuracy and macro-F1)
  checkpoints/<step>  Orbax checkpoints (the last `keep`), every `save_every` steps and at the end
  export/hf, /orbax   the merged model (as `gemma-jax convert` writes it), when the run completes

Resuming restores the state and continues with the very batches the uninterrupted run would
have seen (see `data.Batches`), so every later step computes the same loss. SIGTERM (TPU
preemption) finishes the step in flight, saves a checkpoint and returns.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gemma_jax import distributed
from gemma_jax.api import load
from gemma_jax.checkpoint.resolve import checkpoint_path
from gemma_jax.checkpoint import open_source
from gemma_jax.quant import quantize_params
from gemma_jax.models import family_of
from gemma_jax.models.heads import HEAD_KEY, accuracy_and_f1, head_leaves, init_head, task_head, without_head
from gemma_jax.train import data as data_lib
from gemma_jax.train import lora as lora_lib
from gemma_jax.train.checkpoint import Checkpoints
from gemma_jax.train.config import TrainConfig, schedule_change
from gemma_jax.train.export import export
from gemma_jax.train.memory import check_fits, device_memory, estimate_memory
from gemma_jax.train.metrics import MetricsLog, flops_per_token, peak_flops
from gemma_jax.train.step import Compiled, StepSpec, compiled
from gemma_jax.sharding import RULE_SETS, Layout, make_mesh, place, to_host


@dataclasses.dataclass
class RunResult:
    step: int  # optimizer steps done
    preempted: bool  # stopped by SIGTERM (a checkpoint of `step` was saved)
    losses: dict[int, float]  # this invocation's training loss per step
    params: Any  # the trained params at the end: the whole model, or the LoRA factors
    eval_loss: float | None  # the last evaluation's
    export: dict[str, Path]  # format -> directory of the merged model, when the run completed


def finetune(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, devices: Sequence[jax.Device] | None = None
) -> RunResult:
    """Run (or, with `resume`, continue) the fine-tuning described by `cfg` on `devices` (default: all)."""
    leader = distributed.is_leader()
    layout = Layout(make_mesh(cfg.mesh or "fsdp=-1", dcn=cfg.dcn, devices=devices), RULE_SETS["training"])
    source_config = open_source(checkpoint_path(cfg.ckpt)).config  # the config only: no weights read
    head = task_head(cfg.task, source_config.head, lambda: data_lib.read_labels(cfg.data, cfg.task))
    spec = StepSpec.create(cfg, source_config.replace(head=head), layout)
    _preflight(cfg, spec, leader)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    lora = spec.lora
    dtype = (cfg.base_dtype or cfg.param_dtype) if lora else cfg.param_dtype
    model = load(cfg.ckpt, dtype=dtype, mesh=layout.mesh, rules="training", scan=False)  # per layer: stacked below
    if model.tokenizer is None:
        raise ValueError(f"{cfg.ckpt}: fine-tuning needs a checkpoint with a tokenizer (tokenizer.model)")
    rows = data_lib.load_rows(cfg.data, model.tokenizer, cfg.seq_len, head)
    eval_rows = data_lib.load_rows(cfg.eval_data, model.tokenizer, cfg.seq_len, head) if cfg.eval_data else None
    model.params = _with_head(spec, model.params, cfg.seed)
    fns = compiled(spec)
    frozen = _frozen(model.params, spec, fns) if lora else {}
    model.params = model.params if lora else spec.layered(model.params)
    checkpoints = Checkpoints(run_dir / "checkpoints", cfg.keep)
    try:
        state, resumed = _start(cfg, spec, fns, checkpoints, resume, model.params, rows.fingerprint)
        model.params = None  # now held by `state` (full fine-tuning) or `frozen` (LoRA)
        if leader:
            (run_dir / "train_config.yaml").write_text(cfg.to_yaml())
        start = int(to_host(state["step"]))
        device = layout.mesh.devices.flat[0]
        peak = peak_flops(device.device_kind, device.platform, spec.compute_dtype) * layout.mesh.size
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if resumed else None, enabled=leader)
        meter = _Meter(flops_per_token(model.config, cfg.seq_len, lora), peak, log, start, cfg.steps, leader and progress)
        with meter:
            result = _train(cfg, fns, state, frozen, rows, eval_rows, checkpoints, meter)
    finally:
        checkpoints.close()
    if result.step == cfg.steps and cfg.export:
        merged = _merged(cfg, spec.config, layout, lora, result.params, frozen)
        (run_dir / "export").mkdir(exist_ok=True)
        result.export = export(run_dir / "export", cfg.export, spec.config, merged, layout, model.tokenizer, cfg.export_dtype)
    return result


def _preflight(cfg: TrainConfig, spec: StepSpec, leader: bool) -> None:
    """Before any weight is loaded or step compiled: refuse a row longer than the model's context or a
    step that cannot fit a device; report the learning-rate schedule and the memory estimate."""
    if cfg.seq_len > spec.config.max_position:
        raise ValueError(f"seq_len={cfg.seq_len} is beyond the context of {cfg.ckpt} ({spec.config.max_position} tokens); "
                         f"set seq_len={spec.config.max_position} or less")  # fmt: skip
    device = next(d for d in spec.layout.mesh.devices.flat if d.process_index == jax.process_index())  # one of ours
    memory, limit = estimate_memory(spec), device_memory(device)
    if leader:
        schedule, mode = cfg.schedule(), f"LoRA rank {cfg.lora_rank}" if spec.lora else "full fine-tuning"
        peak = schedule["learning_rate"]
        print(f"finetune: {mode}, {cfg.steps} steps of {cfg.batch_size} rows x {cfg.seq_len} tokens; learning rate "
              f"{peak:g} after {schedule['warmup_steps']} warm-up steps, cosine decay to {peak * cfg.min_lr_ratio:g}\n"
              f"finetune: {memory.describe(limit)}", file=sys.stderr)  # fmt: skip
    check_fits(memory, limit, device.device_kind)


def _train(
    cfg: TrainConfig, fns: Compiled, state: dict[str, Any], frozen: Any, rows: data_lib.Rows, eval_rows: data_lib.Rows | None,
    checkpoints: Checkpoints, meter: _Meter,
) -> RunResult:  # fmt: skip
    """The step loop, from the state's step to `cfg.steps` or to a SIGTERM, with evaluations and checkpoints."""
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        step, eval_loss = int(to_host(state["step"])), None
        batches = data_lib.Batches(rows, cfg.batch_size, seed=to_host(state["rng"]).tolist())
        while step < cfg.steps and not stop.is_set():
            batch = {k: v.reshape(cfg.grad_accum, cfg.micro_batch, cfg.seq_len) for k, v in batches(step).items()}
            state, metrics = fns.train(state, frozen, {k: place(v, fns.batch[k]) for k, v in batch.items()})
            step += 1
            meter.record(step, metrics)
            if eval_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                meter.flush()
                eval_loss = _evaluate(fns, state["params"], frozen, eval_rows, cfg, step, meter.log)
            if step % cfg.save_every == 0 or step == cfg.steps or stop.is_set():
                meta = {"step": step, "rows_consumed": step * cfg.batch_size, "data_fingerprint": rows.fingerprint,
                        "schedule": cfg.schedule()}  # fmt: skip
                checkpoints.save(step, state, meta)
        meter.flush()
        checkpoints.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return RunResult(step, stop.is_set() and step < cfg.steps, meter.losses, state["params"], eval_loss, {})


def _start(
    cfg: TrainConfig, spec: StepSpec, fns: Compiled, checkpoints: Checkpoints, resume: bool, params: Any, fingerprint: str
) -> tuple[dict[str, Any], bool]:
    """(train state, whether it was restored): the latest checkpoint with `resume`, else step 0."""
    latest = checkpoints.latest()
    if latest is None:
        return fns.fresh_state(params, cfg.seed), False
    if not resume:
        raise FileExistsError(f"{cfg.out} has checkpoints (latest: step {latest}); pass --resume, or choose another --out")
    if latest > cfg.steps:
        raise ValueError(f"{cfg.out}: its latest checkpoint is at step {latest}, past steps={cfg.steps}; "
                         f"pass --steps {latest} or more")  # fmt: skip
    state, meta = checkpoints.restore(latest, _abstract_state(spec), fns.state)
    if distributed.is_leader():
        if meta["data_fingerprint"] != fingerprint:
            print(f"warning: {cfg.data} packs differently than at checkpoint {latest}; batches will differ", file=sys.stderr)
        change = schedule_change(meta.get("schedule", {}), cfg)
        if change:
            print(f"note: resuming at step {latest} with a different learning-rate schedule ({change}): "
                  "the rate follows the new schedule from here on", file=sys.stderr)  # fmt: skip
    return state, True


def _with_head(spec: StepSpec, params: Any, seed: int) -> Any:
    """The loaded params with the classification head the run trains, in the trained dtype: the checkpoint's,
    or a new one (transformers' initialisation) on a causal LM. A causal LM's run: the params as loaded."""
    if spec.config.head.is_lm:
        return params
    head = params.get(HEAD_KEY) or init_head(spec.config.head, spec.config.embed_dim, jax.random.PRNGKey(seed))
    host = {name: to_host(x).astype(spec.param_dtype) for name, x in head.items()}  # a few rows: cheap anywhere
    axes = family_of(spec.config).logical_axes
    return {**params, HEAD_KEY: {name: place(x, spec.layout.sharding(axes((HEAD_KEY, name)), x.shape))
                                 for name, x in host.items()}}  # fmt: skip


def _frozen(params: Any, spec: StepSpec, fns: Compiled) -> Any:
    """The LoRA run's frozen base on its shards; quantized to int8 first for an int8 base."""
    params = without_head(params)
    if spec.quant is not None:
        params = quantize_params(spec.base_config, params, spec.quant)
    return jax.device_put(spec.layered(params), fns.frozen)


def _abstract_state(spec: StepSpec) -> dict[str, Any]:
    trained = spec.abstract_trained()
    return {
        "params": trained,
        "opt_state": jax.eval_shape(spec.optimizer().init, trained),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    }


def _evaluate(
    fns: Compiled, trained: Any, frozen: Any, rows: data_lib.Rows, cfg: TrainConfig, step: int, log: MetricsLog
) -> float:
    """Mean token loss over the eval rows (capped at `eval_batches` batches), logged with its perplexity, or
    for a classifier with the accuracy and macro-F1 of its predictions at the labelled tokens."""
    totals = None  # nll, weight[, a classifier's confusion counts]
    for batch in data_lib.eval_batches(rows, cfg.micro_batch, cfg.eval_batches):
        sums = fns.evaluate(trained, frozen, {k: place(v, fns.eval_batch[k]) for k, v in batch.items()})
        sums = [np.asarray(to_host(x), np.float64) for x in sums]
        totals = sums if totals is None else [t + x for t, x in zip(totals, sums)]
    nll, weight = float(totals[0]), float(totals[1])
    loss = nll / max(weight, 1.0)
    if len(totals) == 2:
        log.write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": weight})
    else:
        accuracy, f1 = accuracy_and_f1(totals[2])
        log.write({"step": step, "eval_loss": loss, "eval_accuracy": accuracy, "eval_f1": f1, "eval_labelled": weight})
    return loss


def _merged(cfg: TrainConfig, config, layout: Layout, lora: lora_lib.LoraSpec | None, trained: Any, frozen: Any) -> Any:
    """Full weights to export: the trained model, or the float base with the LoRA update folded in."""
    if lora is None:
        return trained
    if cfg.quant is not None:  # merge into the float weights the int8 base was made from
        frozen = load(cfg.ckpt, dtype=cfg.base_dtype or cfg.param_dtype, mesh=layout.mesh, rules="training", scan=False).params
    per_layer = lambda tree: family_of(config).unstack_layers(config, without_head(tree))  # merge per layer, as exported
    merged = jax.jit(lambda p, a: lora_lib.merge(config, lora, per_layer(p), per_layer(a)))(frozen, trained)
    return {**merged, **head_leaves(trained)}


class _Meter:
    """Each step's device metrics -> a metrics.jsonl record, the losses, and the progress bar.

    A step's metrics are read (which waits for the step) only once the next step is queued,
    so the device never idles while the host logs.
    """

    def __init__(self, flops_per_token: float, peak_flops: float, log: MetricsLog, start: int, steps: int, show: bool):
        self.flops_per_token, self.peak_flops, self.log = flops_per_token, peak_flops, log
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.losses: dict[int, float] = {}
        self.last = time.perf_counter()
        self.bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", disable=not show)

    def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Queue step `step`'s metrics (just dispatched), logging the previous step's."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Log the pending step (waits for it to finish); its time is that since the previous record."""
        if self.pending is None:
            return
        step, metrics = self.pending
        values = {k: float(np.asarray(to_host(v))) for k, v in metrics.items()}
        now = time.perf_counter()
        seconds, self.last, self.pending = now - self.last, now, None
        rate = values["tokens"] / seconds
        mfu = rate * self.flops_per_token / self.peak_flops
        record = {"step": step, **values, "seconds": seconds, "tokens_per_s": rate, "mfu": mfu}
        self.losses[step] = values["loss"]
        self.log.write(record)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{rate:,.0f}", mfu=f"{mfu:.1%}")

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
