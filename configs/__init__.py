"""Model and run configurations shipped with gemma_jax (YAML files, read as package data)."""

from importlib import resources
from pathlib import Path


def _names(folder: str) -> list[str]:
    return sorted(Path(p.name).stem for p in resources.files(__name__).joinpath(folder).iterdir() if p.name.endswith(".yaml"))


def _text(folder: str, name: str, what: str) -> str:
    known = _names(folder)
    if name not in known:  # a name, never a path: "../finetune/lora" must not reach another folder
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return resources.files(__name__).joinpath(folder, f"{name}.yaml").read_text()


def model_preset_names() -> list[str]:
    """Names of the shipped model presets, e.g. ``gemma2-2b``."""
    return _names("models")


def model_preset_text(name: str) -> str:
    """The YAML text of model preset ``name``; raises ValueError naming the known presets."""
    return _text("models", name, "model preset")


def finetune_preset_names() -> list[str]:
    """Names of the shipped fine-tuning run configs (``configs/finetune/*.yaml``), e.g. ``lora``."""
    return _names("finetune")


def finetune_preset_text(name: str) -> str:
    """The YAML text of fine-tuning config ``name``; raises ValueError naming the known ones."""
    return _text("finetune", name, "fine-tuning config")
