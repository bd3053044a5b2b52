"""Run checkpoints: an Orbax CheckpointManager holding the train state and a JSON of run metadata.

The state pytree ({"params", "opt_state", "step", "rng"}) is saved as sharded arrays and
restored straight onto its shards (abstract targets carry the shardings); the metadata holds
the data iterator position and the packed data's fingerprint; a third item holds the state's
checksums (see gemma_jax/checkpoint/manifest.py), checked on restore, so a damaged checkpoint
is an error rather than a silently different run. Saves are asynchronous (the next steps run
while the files are written) and atomic (a checkpoint directory appears only once complete),
so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gemma_jax.checkpoint.manifest import Manifest, manifest_json, tensor_entry
from gemma_jax.checkpoint.orbax import orbax_path


class Checkpoints:
    """The last `keep` checkpoints of a run, in RUN_DIR/checkpoints/<step>."""

    def __init__(self, directory: str | Path, keep: int):
        # A run killed mid-save leaves a temporary directory behind: clear it when the run resumes.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(orbax_path(directory), options=options, item_names=("state", "meta", "checksums"))

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving (the device-to-host copy happens now; files are written in the background)."""
        checksums = manifest_json({name: tensor_entry(x) for name, x in _named_leaves(state)})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  checksums=ocp.args.JsonSave(checksums))  # fmt: skip
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict[str, Any]]:
        """(state placed on `shardings`, metadata) of checkpoint `step`, its state checked against its checksums
        (checkpoints written before checksums were kept have none)."""
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
        step_dir = Path(self._manager.directory) / str(step)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        checked = (step_dir / "checksums").is_dir()
        if checked:
            items["checksums"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if checked:
            hint = "; delete it to resume from the checkpoint before it"
            manifest = Manifest(step_dir, restored.checksums, where=step_dir / "checksums", hint=hint)
            for name, x in _named_leaves(restored.state):
                manifest.check_tensor(name, x)
        return restored.state, restored.meta

    def wait(self) -> None:
        """Block until every pending save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _named_leaves(state: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(key), x) for key, x in jax.tree_util.tree_leaves_with_path(state)]
