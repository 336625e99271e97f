"""Offline-safe loading of Hugging Face models and tokenizers.

``transformers`` retries a hub lookup for a long time when the network is unreachable. These helpers decide
up front: a local directory is loaded as is; a hub id is loaded from the local cache when offline
(``HF_HUB_OFFLINE=1``) and fails immediately with a clear message when it is not cached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> str:
    """Return a loadable reference for ``name_or_path`` or raise without touching the network when offline.

    Args:
        name_or_path: a local directory, or a hub id such as ``"gpt2"`` / ``"org/model"``.

    Raises:
        FileNotFoundError: the path looks local (starts with ``/``, ``.`` or ``~``) but does not exist, or
            the hub id is not in the local cache while offline.
    """
    ref = str(name_or_path)
    path = Path(ref).expanduser()
    if path.exists():
        return str(path)
    if ref.startswith(("/", ".", "~")) or os.sep + os.sep in ref:
        raise FileNotFoundError(f"model path '{ref}' does not exist")
    if hub_offline():
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(ref, local_files_only=True)
        except Exception:
            raise FileNotFoundError(
                f"'{ref}' is not a local directory and is not in the Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). Pass a local path, or unset the offline "
                "variables on a machine with internet to download it."
            ) from None
    return ref


def load_pretrained(cls: Any, name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``cls.from_pretrained(resolve_pretrained(name_or_path), **kwargs)`` (e.g. ``AutoModelForCausalLM``)."""
    return cls.from_pretrained(resolve_pretrained(name_or_path), **kwargs)
