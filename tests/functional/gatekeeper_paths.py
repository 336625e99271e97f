"""The implementations of ``gatekeeper_loss`` every Gatekeeper loss test runs on (an autouse fixture's params)."""

from __future__ import annotations

import os
import shutil

import pytest

#: the NumPy path (small CPU inputs without a built kernel), the fused torch path (large inputs, accelerators) and
#: the compiled kernel (small CPU inputs once built; compiled once per machine, about 40 s, so in the slow lane)
LOSS_PATHS = ["numpy", "torch", pytest.param("native", marks=pytest.mark.slow)]


def select_loss_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route ``gatekeeper_loss`` through implementation ``name`` for one test (restored afterwards)."""
    import lit_cascades.functional.gatekeeper as gk

    monkeypatch.setattr(gk, "SMALL_MAX_ELEMENTS", 0 if name == "torch" else 1 << 30)
    monkeypatch.setattr(gk, "_NATIVE", native_kernel_or_skip() if name == "native" else None)


def native_kernel_or_skip():
    """The compiled Gatekeeper kernel (built once per machine), or skip the test without a compiler and ninja."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("the native kernel needs a C++ compiler and ninja")
    from lit_cascades.functional._native import load_kernel

    return load_kernel("gatekeeper")
