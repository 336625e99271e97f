"""Native (C++) kernels, compiled on first use with :func:`torch.utils.cpp_extension.load`.

A build needs a C++ compiler (``g++`` or ``clang++``), ``ninja`` (``pip install ninja``) and the Python headers;
it takes about 40 seconds once and is cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), so later processes load it in well under a second. Nothing in the library needs
them: each kernel is an opt-in alternative to a pure-Python path.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

_LOADED: dict[str, ModuleType] = {}


def load_kernel(name: str, verbose: bool = False) -> ModuleType:
    """Compile (once) and load the kernel ``<name>.cpp`` of this package as ``lit_cascades_<name>``.

    Raises:
        RuntimeError: the build failed (no compiler, no ninja, no Python headers), with what is needed.
    """
    if name in _LOADED:
        return _LOADED[name]
    source = Path(__file__).with_name(f"{name}.cpp")
    if not source.exists():
        raise FileNotFoundError(f"no native kernel {name!r} ({source} is missing)")
    from torch.utils.cpp_extension import load

    try:
        module = load(f"lit_cascades_{name}", [str(source)], extra_cflags=["-O3"], verbose=verbose)
    except Exception as exc:  # the build's own errors: ninja missing, compiler errors, missing headers
        raise RuntimeError(
            f"could not build the native {name} kernel: {exc}. It needs a C++ compiler (g++ or clang++), ninja "
            "(`pip install ninja`) and the Python headers; without it the library's Python path is used"
        ) from exc
    _LOADED[name] = module
    return module
