"""Hugging Face Hub repo ids ("google/gemma-2-2b") as checkpoints, through `huggingface_hub`.

`huggingface_hub.snapshot_download` does the work: it downloads what is missing when online and
answers from the local hub cache when offline, honouring HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE
and HF_TOKEN. Only what our HF loader reads is fetched (configs, safetensors, tokenizer.model),
not the GGUF or PyTorch copies some repos also hold. Its errors become one line that says what
to do: log in for a gated model, go online (or fill the cache) for an uncached one.
"""

from __future__ import annotations

from pathlib import Path

HF_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub model id "org/name" (a path that exists is checked first, elsewhere)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_snapshot(repo_id: str) -> Path:
    """The local directory of `repo_id`'s files: downloaded (online) or from the hub cache (offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )  # fmt: skip

    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_FILES))
    except GatedRepoError:
        raise FileNotFoundError(
            f"{repo_id} is a gated model: accept its licence at https://huggingface.co/{repo_id}, "
            "then log in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise FileNotFoundError(
            f"{repo_id} is neither a local path nor a Hugging Face model repo (a private one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise FileNotFoundError(
            f"{repo_id} is not a local path, and is not (completely) in the Hugging Face cache {cache}; {why}"
        ) from None
