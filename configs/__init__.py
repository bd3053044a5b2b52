"""Model and run configurations shipped with gemma_jax (YAML files, read as package data)."""

from importlib import resources
from pathlib import Path


def model_preset_names() -> list[str]:
    """Names of the shipped model presets, e.g. ``gemma2-2b``."""
    return sorted(Path(p.name).stem for p in resources.files(__name__).joinpath("models").iterdir() if p.name.endswith(".yaml"))


def model_preset_text(name: str) -> str:
    """The YAML text of model preset ``name``; raises ValueError naming the known presets."""
    path = resources.files(__name__).joinpath("models", f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(model_preset_names())}")
    return path.read_text()
