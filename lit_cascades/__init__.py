"""PyTorch Lightning implementations of model cascades, deferral, small-model-aided training and retrieval."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lit_cascades")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["CalibrationReport", "Cascade", "CascadeOutput", "GenerationCascade", "GenerationOutput",
           "__version__"]

_LAZY = {"Cascade": "lit_cascades.cascade", "CascadeOutput": "lit_cascades.cascade",
         "CalibrationReport": "lit_cascades.cascade", "GenerationCascade": "lit_cascades.cascade_lm",
         "GenerationOutput": "lit_cascades.cascade_lm"}


def __getattr__(name: str):
    """``lit_cascades.Cascade`` & co., imported on first use (``import lit_cascades`` stays light)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_cascades' has no attribute {name!r}")
