"""Model families: one folder per architecture (config, Flax module, parameter schema)."""
