"""Model-agnostic sharding: device meshes, logical-axis rule sets, and placement helpers."""

from gemma_jax.sharding.mesh import AXES, make_mesh, parse_mesh_spec
from gemma_jax.sharding.partition import Layout, constrain, place, to_host, tree_shardings
from gemma_jax.sharding.rules import INFERENCE, RULE_SETS, TRAINING

__all__ = ["AXES", "INFERENCE", "RULE_SETS", "TRAINING", "Layout", "constrain", "make_mesh", "parse_mesh_spec", "place", "to_host", "tree_shardings"]
