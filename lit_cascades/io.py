"""File plumbing shared by the whole library: atomic writes, safe loading, the cache root, config hashes.

Nothing here imports Lightning.

* **Atomic writes** (:func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_save`,
  :func:`atomic_path`): write to a temporary file in the target's directory, then ``os.replace`` it, so a
  reader never sees a half-written file and a crash leaves the previous version (or nothing).
* **Safe loading** (:func:`safe_torch_load`): ``torch.load(weights_only=True)``, which refuses pickled code.
  Use it for every checkpoint or cache a user can point at.
* **Cache root** (:func:`cache_root`, :func:`cache_dir`): ``$LIT_CASCADES_CACHE`` if set, else
  ``$XDG_CACHE_HOME/lit_cascades``, else ``~/.cache/lit_cascades``. Every cache (downloads, token streams,
  generation records, selection scores) lives under it, in a sub-directory named by the hash of the config
  that made it (:func:`config_hash`), so a changed setting never reuses a stale cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CACHE_ENV = "LIT_CASCADES_CACHE"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    ``suffix`` keeps an extension some writers need (``".png"`` for matplotlib). Example::

        with atomic_path(out / "plot.png", suffix=".png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename). Returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`jsonable` for tensors and non-finite floats)."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` atomically. Save tensors and plain containers only, so that
    :func:`safe_torch_load` can read it back."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never pickled code.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds objects that need unpickling arbitrary code (not a weights/cache file
            written by this library), naming the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with a long explanation
        if "weights_only" in str(err) or "Unpickl" in type(err).__name__:
            raise ValueError(f"{path}: refusing to load: it holds pickled objects beyond tensors and plain "
                             f"containers (loading with weights_only=True failed: {str(err).splitlines()[0]})"
                             ) from None
        raise


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy scalars and tuples turned into JSON types; NaN -> None, ±inf -> ±1e308."""
    import math

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def config_hash(obj: Any, length: int = 12) -> str:
    """A stable hex digest of a JSON-able config (key order does not matter)."""
    text = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def cache_root() -> Path:
    """The root of every lit_cascades cache: ``$LIT_CASCADES_CACHE``, else ``$XDG_CACHE_HOME/lit_cascades``,
    else ``~/.cache/lit_cascades``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lit_cascades"


def cache_dir(kind: str, key: Any = None) -> Path:
    """``<cache_root>/<kind>[/<config_hash(key)>]``, created. ``key`` is the config that made the cache."""
    path = cache_root() / kind
    if key is not None:
        path = path / config_hash(key)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """The MD5 hex digest of a file (for checking downloads against their published checksums)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
