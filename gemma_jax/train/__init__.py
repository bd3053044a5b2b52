"""Fine-tuning: full or LoRA, sharded (FSDP), resumable, on plain text or chat JSONL.

Entry points: `gemma_jax.train.run.finetune(TrainConfig)` and `gemma-jax finetune` (`cli`).
Modules: `config` (TrainConfig, YAML presets), `data` (encoding, packing, resumable batches),
`lora` (adapters via a method interceptor, merging), `step` (compiled train/eval steps and
their shardings), `checkpoint` (Orbax), `metrics` (FLOPs, MFU, metrics.jsonl), `export`
(the merged model in `gemma-jax convert` formats), `run` (the loop), `cli`.
Nothing is imported here, so that building the command line stays cheap.
"""
