"""Native (C++) kernels, compiled with :func:`torch.utils.cpp_extension.load` and cached across processes.

A build needs a C++ compiler (``g++`` or ``clang++``), ``ninja`` (``pip install ninja``) and the Python headers;
it takes about 40 seconds once and is cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) under a name that hashes the kernel's source, the compiler flags (with the CPU's
vector extensions), the torch version and the Python ABI, so an edited source, another torch or another CPU
never loads a stale build. Build every kernel ahead of time with::

    python -m lit_cascades.functional._native

:func:`cached_kernel` loads a kernel only when such a build exists (well under a second, never compiles): the
library uses it where it is there and its pure-Python path where it is not. Nothing needs a kernel.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

_LOADED: dict[str, ModuleType] = {}

#: x86 vector extensions enabled per torch CPU capability (the vector code of a kernel is compiled for the CPU
#: that builds it, as torch's own kernels are dispatched by it; the capability is part of the build's name)
_ARCH_FLAGS = {"AVX2": ["-mavx2", "-mfma"],
               "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]}


def _cflags() -> list[str]:
    """Compiler flags of a build (part of its name): -O3 and the vector extensions of this CPU's torch
    capability (``torch.backends.cpu.get_cpu_capability()``; none off x86)."""
    arch: list[str] = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        arch = _ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    return ["-O3", "-Wno-psabi", *arch]


def _source(name: str) -> Path:
    source = Path(__file__).with_name(f"{name}.cpp")
    if not source.exists():
        raise FileNotFoundError(f"no native kernel {name!r} ({source} is missing)")
    return source


def build_name(name: str) -> str:
    """``lit_cascades_<name>_<digest>``: the extension's name, which changes with the kernel's source, the
    compiler flags (the CPU's vector extensions among them), the torch version and the Python ABI: what a cached
    build must match to be loaded, so a cache shared by different machines never loads a foreign build."""
    digest = hashlib.sha256(_source(name).read_bytes())
    abi = f"{sys.version_info.major}.{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    digest.update(" ".join([*_cflags(), torch.__version__, str(torch.version.cuda), str(torch.version.hip), abi]).encode())
    return f"lit_cascades_{name}_{digest.hexdigest()[:12]}"


def _build_directory(module_name: str) -> Path:
    """Where torch's ``load`` builds ``module_name`` (torch's own rule; the empty directory is created)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(module_name, verbose=False))


def load_kernel(name: str, verbose: bool = False) -> ModuleType:
    """Compile (once per :func:`build_name`) and load the kernel ``<name>.cpp`` of this package.

    Raises:
        FileNotFoundError: no such kernel.
        RuntimeError: the build failed (no compiler, no ninja, no Python headers), with what is needed.
    """
    if name in _LOADED:
        return _LOADED[name]
    source = _source(name)
    from torch.utils.cpp_extension import load

    try:
        module = load(build_name(name), [str(source)], extra_cflags=_cflags(), verbose=verbose)
    except Exception as exc:  # the build's own errors: ninja missing, compiler errors, missing headers
        raise RuntimeError(
            f"could not build the native {name} kernel: {exc}. It needs a C++ compiler (g++ or clang++), ninja "
            "(`pip install ninja`) and the Python headers; without it the library's Python path is used"
        ) from exc
    _LOADED[name] = module
    return module


def cached_kernel(name: str) -> ModuleType | None:
    """The kernel ``<name>`` if a build of its current source for this torch exists, else None; never compiles.

    A build in progress (torch's ``lock`` file in the build directory) counts as absent. A cached build that
    cannot be imported is reported with a warning and counts as absent.
    """
    if name in _LOADED:
        return _LOADED[name]
    module_name = build_name(name)
    from torch.utils.cpp_extension import LIB_EXT, _import_module_from_library

    directory = _build_directory(module_name)
    library = directory / f"{module_name}{LIB_EXT}"
    if not library.is_file() or (directory / "lock").exists():
        return None
    try:
        module = _import_module_from_library(module_name, str(directory), True)  # what torch's load ends with
    except Exception as exc:  # a truncated or foreign build: the Python path runs instead
        warnings.warn(f"the cached native {name} kernel {library} could not be loaded ({exc}); using the Python "
                      f"path. Rebuild it with `python -m lit_cascades.functional._native`", stacklevel=2)
        return None
    _LOADED[name] = module
    return module


#: every kernel of this package
KERNELS = ("gatekeeper",)


def main() -> None:
    """Build every kernel (``python -m lit_cascades.functional._native``); exit status 1 if one fails."""
    failed = False
    for name in KERNELS:
        try:
            module = load_kernel(name)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            failed = True
        else:
            print(f"{name}: {module.__file__}")
    if failed:
        raise SystemExit(1)
