"""The compiled training and evaluation steps, with explicit shardings for every input and output.

The train state is a plain pytree {"params", "opt_state", "step", "rng"}: "params" are the
trained weights (the whole model, or only the LoRA factors), and the frozen base (LoRA) is a
separate argument that is never differentiated nor donated. One step takes a global batch
shaped [grad_accum, micro_batch, seq_len], sums token losses and gradients over the
micro-batches in a `lax.scan`, and divides by the batch's loss-weight total, so the update is
that of the mean token loss over the whole batch whatever the accumulation (and the mesh).

Shardings come from logical axes under the FSDP training rules: parameters, LoRA factors and
every optimizer-state tree shaped like them are split alike; step and RNG are replicated; the
batch is split over `act_batch`. `compiled(spec)` builds the jitted functions once per spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding
from jax.tree_util import DictKey

from gemma_jax.models import Config, family_of, init_params, param_axes
from gemma_jax.models.family import stacked_axes
from gemma_jax.models.heads import Head, confusion, head_leaves, without_head
from gemma_jax.runtime import Runtime
from gemma_jax.train import lora as lora_lib
from gemma_jax.train.config import TrainConfig
from gemma_jax.train.data import ROW_FIELDS
from gemma_jax.sharding import Layout, tree_shardings

State = dict[str, Any]  # {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}
Metrics = dict[str, jax.Array]


def default_compute_dtype() -> str:
    """bfloat16 on accelerators; float32 on CPU, where XLA's bf16 matmuls are far slower than f32."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that shapes the compiled step (hashable: one compilation per distinct spec): the model's
    `Runtime` (config, compute dtype, int8 scheme of the base, kernels and mesh layout) and the run's settings."""

    runtime: Runtime
    param_dtype: str  # trained params and optimizer state
    base_dtype: str  # LoRA: the frozen base
    remat: str
    lora: lora_lib.LoraSpec | None
    learning_rate: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    max_grad_norm: float
    grad_accum: int
    micro_batch: int  # rows per micro-batch (and per eval batch)
    seq_len: int

    @classmethod
    def create(cls, cfg: TrainConfig, config: Config, layout: Layout) -> StepSpec:
        """The step of run settings `cfg` for model `config` on `layout`."""
        schedule = cfg.schedule()
        runtime = Runtime.create(config, cfg.compute_dtype or default_compute_dtype(), layout=layout, quant=cfg.quant, scan=cfg.scan)
        return cls(
            runtime=runtime, param_dtype=cfg.param_dtype, base_dtype=cfg.base_dtype or cfg.param_dtype, remat=cfg.remat,
            lora=lora_lib.LoraSpec.create(cfg), learning_rate=schedule["learning_rate"],
            warmup_steps=schedule["warmup_steps"], total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio,
            weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
            max_grad_norm=cfg.max_grad_norm, grad_accum=cfg.grad_accum, micro_batch=cfg.micro_batch, seq_len=cfg.seq_len,
        )  # fmt: skip

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def layout(self) -> Layout:
        return self.runtime.layout

    @property
    def compute_dtype(self) -> str:
        return self.runtime.dtype

    @property
    def quant(self) -> str | None:  # int8 base (LoRA only)
        return self.runtime.quant

    def schedule(self) -> optax.Schedule:
        """Linear warm-up from 0 to the peak, then cosine decay to min_lr_ratio * peak at total_steps."""
        decay = max(self.total_steps, self.warmup_steps + 1)
        peak = self.learning_rate
        return optax.warmup_cosine_decay_schedule(0.0, peak, self.warmup_steps, decay, peak * self.min_lr_ratio)

    def optimizer(self) -> optax.GradientTransformation:
        """Global-norm clipping, then AdamW with float32 moments; weight decay on matrices only."""
        matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
        adamw = optax.adamw(
            self.schedule(), self.b1, self.b2, self.eps, mu_dtype=jnp.float32, weight_decay=self.weight_decay, mask=matrices
        )
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw) if self.max_grad_norm > 0 else adamw

    def model(self) -> Any:
        return self.runtime.model(remat=self.remat)

    @property
    def scan(self) -> bool:
        return self.runtime.scan

    def layered(self, tree: Any, stack: Any = None) -> Any:
        """A per-layer tree (params, LoRA factors, or their logical axes with `stack=stacked_axes`) in the model's
        layout: stacked when the layers run as a scan (see `Family.stack_layers`)."""
        return family_of(self.config).stack_layers(self.config, tree, stack) if self.scan else tree

    # --- what lives where ------------------------------------------------------------------
    # A LoRA run trains a classifier's head in full, beside the adapters (under its own key, "score");
    # the frozen base is the decoder without it (the causal LM's params, whose shapes are the same).
    @property
    def base_config(self) -> Config:
        return self.config.replace(head=Head())

    def trained_axes(self) -> Any:
        if self.lora is None:
            return _param_axes(self.config, None, self.scan)
        return {**self.layered(lora_lib.lora_axes(self.config, self.lora), stacked_axes), **head_leaves(_param_axes(self.config, None))}

    def abstract_trained(self) -> Any:
        if self.lora is None:
            return _abstract_params(self.config, self.param_dtype, None, self.scan)
        dtype = jnp.dtype(self.param_dtype)
        adapters = jax.eval_shape(lambda: self.layered(lora_lib.init_lora(self.config, self.lora, jax.random.PRNGKey(0), dtype)))
        return {**adapters, **head_leaves(_abstract_params(self.config, self.param_dtype, None, False))}

    def abstract_frozen(self) -> Any:
        """The LoRA run's frozen base: shapes and dtypes (int8 weights and float32 scales for an int8 base)."""
        return _abstract_params(self.base_config, self.base_dtype, self.quant, self.scan)

    def frozen_shardings(self) -> Any:
        """The frozen base's shardings (LoRA), or an empty tree (full fine-tuning trains the base)."""
        if self.lora is None:
            return {}
        return tree_shardings(self.layout, _param_axes(self.base_config, self.quant, self.scan), self.abstract_frozen())

    def state_shardings(self) -> State:
        abstract = self.abstract_trained()
        trained = tree_shardings(self.layout, self.trained_axes(), abstract)
        shapes, shardings = flatten_dict(abstract), flatten_dict(trained)
        replicated = self.layout.replicated()

        def like_param(path, leaf) -> NamedSharding:  # optimizer trees shaped like the params shard like them
            key = tuple(k.key for k in path if isinstance(k, DictKey))
            return shardings[key] if key in shapes and shapes[key].shape == leaf.shape else replicated

        opt = jax.eval_shape(self.optimizer().init, abstract)
        opt_shardings = jax.tree_util.tree_map_with_path(like_param, opt)
        return {"params": trained, "opt_state": opt_shardings, "step": replicated, "rng": replicated}

    def batch_sharding(self, accumulate: bool) -> dict[str, NamedSharding]:
        """Rows split over `act_batch`: [grad_accum, micro_batch, seq_len] for training, [micro_batch, seq_len] for eval."""
        shape, axes = (self.micro_batch, self.seq_len), ("act_batch", None)
        if accumulate:
            shape, axes = (self.grad_accum, *shape), (None, *axes)
        return {name: self.layout.sharding(axes, shape) for name in ROW_FIELDS}


@functools.cache
def _abstract_params(config: Config, dtype: str, quant: str | None, scan: bool) -> Any:
    """Shapes and dtypes of the model's params, stacked when it scans (an abstract init: cached, as it traces the whole model)."""
    per_layer = lambda: init_params(config, jax.random.PRNGKey(0), jnp.dtype(dtype), quant)
    return jax.eval_shape(lambda: family_of(config).stack_layers(config, per_layer()) if scan else per_layer())


@functools.cache
def _param_axes(config: Config, quant: str | None, scan: bool = False) -> Any:
    return param_axes(config, quant, scan)


def _logits(trained: Any, frozen: Any, batch: dict[str, jax.Array], spec: StepSpec) -> jax.Array:
    """The model's logits [rows, seq_len, V] (a classifier's: label scores [.., L]) on one micro-batch."""
    if spec.lora is None:
        variables, adapters = {"params": trained}, contextlib.nullcontext()
    else:
        variables = {"params": {**frozen, **head_leaves(trained)}, lora_lib.COLLECTION: without_head(trained)}
        adapters = lora_lib.interceptor(spec.lora)
    with adapters:
        logits, _ = spec.model().apply(variables, batch["inputs"], batch["positions"], batch["segments"])
    return spec.runtime.constrain(logits, ("act_batch", "act_length", "act_vocab"))


def loss_sums(trained: Any, frozen: Any, batch: dict[str, jax.Array], spec: StepSpec) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLLs, sum of weights) of one micro-batch [rows, seq_len].

    A classifier's targets are labels at its scored tokens (see data.py): the same cross-entropy."""
    return _nll_sums(_logits(trained, frozen, batch, spec), batch)


def _nll_sums(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])


def train_step(state: State, frozen: Any, batch: dict[str, jax.Array], spec: StepSpec) -> tuple[State, Metrics]:
    """One optimizer step on a batch of [grad_accum, micro_batch, seq_len] arrays."""
    shardings = spec.state_shardings()["params"]

    def micro(carry, mb):
        (nll, weight), grads = jax.value_and_grad(loss_sums, has_aux=True)(state["params"], frozen, mb, spec)
        grads = jax.lax.with_sharding_constraint(grads, shardings)
        return jax.tree.map(jnp.add, carry, (grads, nll, weight)), None

    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"]), jnp.float32(0), jnp.float32(0))
    (grads, nll, weight), _ = jax.lax.scan(micro, zeros, batch)
    denominator = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state["params"])
    optimizer = spec.optimizer()
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    metrics = {
        "loss": nll / denominator,
        "grad_norm": optax.tree.norm(grads),
        "lr": spec.schedule()(state["step"]),
        "target_tokens": weight,
        "tokens": jnp.sum(batch["segments"] > 0).astype(jnp.float32),
    }
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics


def eval_sums(trained: Any, frozen: Any, batch: dict[str, jax.Array], spec: StepSpec) -> tuple[jax.Array, ...]:
    """(NLL sum, weight sum) of one eval micro-batch; a classifier's adds its [L L] confusion counts."""
    logits = _logits(trained, frozen, batch, spec)
    sums = _nll_sums(logits, batch)
    return sums if spec.config.head.is_lm else (*sums, confusion(logits, batch["targets"], batch["weights"]))


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The jitted functions of one spec and the shardings they were built with."""

    train: Any  # (state, frozen, batch) -> (state, metrics); donates the state
    evaluate: Any  # (trained params, frozen, batch) -> (nll sum, weight sum[, confusion counts])
    init_opt: Any  # trained params -> optimizer state
    init_lora: Any  # rng -> LoRA factors (LoRA runs only)
    state: State  # shardings
    frozen: Any
    batch: dict[str, NamedSharding]
    eval_batch: dict[str, NamedSharding]

    def fresh_state(self, params: Any, seed: int) -> State:
        """Step 0: `params` (full fine-tuning; on their shards) or new LoRA factors (and the params' classification
        head), and a new optimizer state."""
        replicated = self.state["step"]
        rng = jax.device_put(jax.random.PRNGKey(seed), replicated)
        trained = params if self.init_lora is None else {**self.init_lora(rng), **head_leaves(params or {})}
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return {"params": trained, "opt_state": self.init_opt(trained), "step": step, "rng": rng}


@functools.lru_cache(maxsize=8)
def compiled(spec: StepSpec) -> Compiled:
    state, frozen = spec.state_shardings(), spec.frozen_shardings()
    batch, eval_batch = spec.batch_sharding(True), spec.batch_sharding(False)
    replicated = spec.layout.replicated()
    init_lora = None
    if spec.lora is not None:
        make = lambda rng: spec.layered(lora_lib.init_lora(spec.config, spec.lora, rng, jnp.dtype(spec.param_dtype)))  # noqa: E731
        init_lora = jax.jit(make, in_shardings=replicated, out_shardings=without_head(state["params"]))
    return Compiled(
        train=jax.jit(
            functools.partial(train_step, spec=spec),
            in_shardings=(state, frozen, batch),
            out_shardings=(state, replicated),
            donate_argnums=0,
        ),
        evaluate=jax.jit(
            functools.partial(eval_sums, spec=spec),
            in_shardings=(state["params"], frozen, eval_batch),
            out_shardings=replicated,
        ),
        init_opt=jax.jit(spec.optimizer().init, in_shardings=(state["params"],), out_shardings=state["opt_state"]),
        init_lora=init_lora,
        state=state,
        frozen=frozen,
        batch=batch,
        eval_batch=eval_batch,
    )
