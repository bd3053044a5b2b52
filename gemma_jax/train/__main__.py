"""`python -m gemma_jax.train ...`: the same as `gemma-jax finetune ...`."""

from gemma_jax.train.cli import main

main()
