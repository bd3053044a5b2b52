"""Named rule sets: which mesh axes each logical axis name is split over.

Parameters, activations and KV-cache arrays name their dimensions logically ("embed",
"q_heads", "act_batch", "cache_kv_heads", ...); a rule set maps each name to mesh axes. Names
not listed are replicated. When a dimension does not divide its mesh axes, `partition.py`
falls back to fewer axes (or replication) instead of failing.
"""

from __future__ import annotations

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("data", "fsdp")
_MODEL_PARALLEL: Rules = (
    ("vocab", ("tensor",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("act_batch", _BATCH),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    ("cache_batch", _BATCH),
    ("cache_kv_heads", ("tensor",)),
    # Gemma 3n's small dims stay whole on every device: AltUp streams, the per-layer-input
    # width (all layers' together, and one layer's), the LAuReL rank.
    ("altup", ()),
    ("per_layer", ()),
    ("laurel", ()),
    # A scanned model's stacked layers (models/family.py LAYERS): each device holds every layer's
    # slice of a weight, so the scan's step over layers needs no communication.
    ("layers", ()),
)

# Inference: heads and MLP split over `tensor`; `fsdp` acts as extra data parallelism, so
# weights are never gathered per step (use `tensor` when the weights do not fit one device).
INFERENCE: Rules = _MODEL_PARALLEL
# Training: the same, plus FSDP: every weight's embed dimension is split over `fsdp` and
# gathered just before use, so parameters and optimizer state shrink with the fsdp axis.
TRAINING: Rules = _MODEL_PARALLEL + (("embed", ("fsdp",)),)

RULE_SETS = {"inference": INFERENCE, "training": TRAINING}
