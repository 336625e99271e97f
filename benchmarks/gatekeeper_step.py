"""Gatekeeper training-step time / cross-entropy training-step time, same model, batch and optimiser.

    python -m benchmarks.gatekeeper_step [--alternations 60] [--threads 1]

Target: median ratio <= 1.05 in both settings: the Fashion-MNIST-sized CNN (batch 128; the model dominates
the step) and the 460-parameter MLP of the Gatekeeper recipe's digits setting (batch 64; the loss's dispatch
overhead dominates). Both steps run forward, loss, backward and the AdamW update; the sides alternate
(``benchmarks._common.interleaved_ratios``) with identical models and data: cross-entropy, the Gatekeeper loss
through the library's default dispatch (the C++ kernel for small CPU inputs once built: this script builds it
first, and records the reason where it cannot), and the NumPy path forced (what runs without a kernel build).
Also reported: the median time of each phase of the MLP's step per side (``phases_mlp_digits_b64``: which phases
the NumPy path slows), and the loss alone (forward + backward on fixed logits) against ``F.cross_entropy`` at
several sizes for each implementation (NumPy path, fused torch path, kernel): the crossover behind
``lit_cascades.functional.gatekeeper.SMALL_MAX_ELEMENTS``.
Writes docs/results/benchmarks/gatekeeper_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

import lit_cascades.functional.gatekeeper as gk_impl
from benchmarks._common import Run, interleaved_ratios, target_row
from lit_cascades.functional import gatekeeper_loss
from lit_cascades.models import build_classifier
from lit_cascades.modules._optim import adamw, fused_adamw_on_cpu

SETTINGS = {
    "cnn_fashion_mnist_b128": ("cnn", (1, 28, 28), 128, {"width": 32, "depth": 3}),
    "mlp_digits_b64": ("mlp", (1, 8, 8), 64, {"hidden": [6]}),
}


def native_kernel() -> tuple[Any, str | None]:
    """The compiled Gatekeeper kernel, or None and why it could not be built."""
    from lit_cascades.functional._native import load_kernel

    try:
        return load_kernel("gatekeeper"), None
    except RuntimeError as exc:
        return None, str(exc)


@contextmanager
def loss_path(path: str, kernel: Any = None) -> Iterator[None]:
    """Route ``gatekeeper_loss`` through ``path`` inside the block: ``"default"`` (the library's dispatch as a user
    gets it: the C++ kernel for CPU inputs where a build is cached, else the NumPy path for small inputs and the
    fused torch path for large ones), or one implementation forced: ``"numpy"``, ``"torch"`` or ``"native"``
    (through ``kernel``). The dispatch is restored afterwards."""
    if path not in ("default", "numpy", "torch", "native"):
        raise ValueError(f"unknown loss path {path!r}; expected default, numpy, torch or native")
    saved = gk_impl._NATIVE, gk_impl.SMALL_MAX_ELEMENTS
    if path != "default":
        gk_impl._NATIVE = kernel if path == "native" else None
        gk_impl.SMALL_MAX_ELEMENTS = 0 if path == "torch" else 1 << 62
    try:
        yield
    finally:
        gk_impl._NATIVE, gk_impl.SMALL_MAX_ELEMENTS = saved


def gatekeeper_value(logits: torch.Tensor, y: torch.Tensor, path: str = "default", kernel: Any = None) -> torch.Tensor:
    """The Gatekeeper loss (α = 0.5) through ``path`` (see :func:`loss_path`). The default path is a plain call, as
    a user makes it: a context manager around every call costs about 3% of the digits-MLP step."""
    if path == "default":
        return gatekeeper_loss(logits, y, alpha=0.5).loss
    with loss_path(path, kernel):
        return gatekeeper_loss(logits, y, alpha=0.5).loss


def step_setup(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict, loss: str) -> tuple[Any, ...]:
    """``(model, optimizer, x, y, path)`` of one side: a fresh seed-0 model, the modules' AdamW
    (:func:`lit_cascades.modules._optim.adamw`), a fixed random batch, and the
    loss path for ``loss`` (None: cross-entropy; see :func:`make_step`)."""
    torch.manual_seed(0)
    model = build_classifier(arch, shape, 10, **kwargs)
    opt = adamw(None, model.parameters(), lr=1e-3)  # the modules' AdamW (fused where torch has it)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model, opt, x, y, {"gatekeeper": "default", "gatekeeper_numpy": "numpy"}.get(loss)


def make_step(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict, loss: str) -> Callable[[], None]:
    """One training step (forward, loss, backward, AdamW) of a fresh seed-0 model on a fixed random batch:
    ``"ce"``, ``"gatekeeper"`` (the default dispatch) or ``"gatekeeper_numpy"`` (the NumPy path forced: what a
    machine without a kernel build runs)."""
    model, opt, x, y, path = step_setup(arch, shape, batch, kwargs, loss)

    def step() -> None:
        logits = model(x)
        value = F.cross_entropy(logits, y) if path is None else gatekeeper_value(logits, y, path)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step


PHASES = ("forward", "loss", "zero_grad", "backward", "optimizer")


def phase_times(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict, sides: tuple[str, ...],
                alternations: int, inner: int = 20) -> dict[str, dict[str, float]]:
    """Median seconds of each phase of a step (:data:`PHASES`), per side, the sides alternating in blocks of
    ``inner`` steps (order reversed every other alternation): which phases a loss implementation slows, the loss
    itself or the model's forward, backward and update around it (the same ops on both sides)."""
    runs = {side: (*step_setup(arch, shape, batch, kwargs, side), {phase: [] for phase in PHASES}) for side in sides}
    clock = time.perf_counter
    for a in range(alternations + 1):  # the first alternation warms up and is dropped
        for side in sides if a % 2 == 0 else sides[::-1]:
            model, opt, x, y, path, times = runs[side]
            for _ in range(inner):
                t0 = clock()
                logits = model(x)
                t1 = clock()
                value = F.cross_entropy(logits, y) if path is None else gatekeeper_value(logits, y, path)
                t2 = clock()
                opt.zero_grad(set_to_none=True)
                t3 = clock()
                value.backward()
                t4 = clock()
                opt.step()
                t5 = clock()
                if a:
                    for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                        times[phase].append(dt)
    return {side: {phase: statistics.median(ts) for phase, ts in run[5].items()} for side, run in runs.items()}


def make_loss(batch: int, classes: int, loss: str, kernel: Any = None) -> Callable[[], None]:
    """Loss forward + backward on fixed logits: ``"ce"``, or ``"gk_numpy"``, ``"gk_torch"``, ``"gk_native"``
    (one implementation forced; the last through ``kernel``)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(batch, classes, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (batch,), generator=g)

    def run() -> None:
        value = F.cross_entropy(z, y) if loss == "ce" else gatekeeper_value(z, y, loss.removeprefix("gk_"), kernel)
        value.backward()
        z.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alternations", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("gatekeeper_step")
    kernel, why_not = native_kernel()  # built before timing starts (about 40 s the first time on a machine)
    default = gk_impl.cpu_kernel()  # what the default dispatch resolved to: the kernel once it is built
    default_path = "C++ kernel" if default is not None else f"NumPy path, the kernel could not be built: {why_not}"
    step_sides = ("ce", "gatekeeper", "gatekeeper_numpy")
    results, targets = {}, []
    for name, (arch, shape, batch, kwargs) in SETTINGS.items():
        inner = 20 if arch == "mlp" else 2
        out = interleaved_ratios({side: make_step(arch, shape, batch, kwargs, side) for side in step_sides},
                                 baseline="ce", alternations=args.alternations, warmup=3, inner=inner)
        results[name] = {"arch": arch, "batch": batch, "inner_steps_per_block": inner, **out}
        targets.append(target_row(f"Gatekeeper step / CE step, {name}, default path"
                                  f" ({'C++ kernel' if default is not None else 'NumPy path'})", 1.05,
                                  out["ratios"]["gatekeeper"]))
        targets.append(target_row(f"Gatekeeper step / CE step, {name}, NumPy path (no kernel build)", 1.05,
                                  out["ratios"]["gatekeeper_numpy"]))
    arch, shape, batch, kwargs = SETTINGS["mlp_digits_b64"]
    results["phases_mlp_digits_b64"] = {
        "unit": "median seconds per step", "inner_steps_per_block": 20,
        "seconds": phase_times(arch, shape, batch, kwargs, step_sides, args.alternations)}
    # the loss alone, each implementation: where the NumPy path stops paying (SMALL_MAX_ELEMENTS)
    loss_sides = ("ce", "gk_numpy", "gk_torch") + (("gk_native",) if kernel is not None else ())
    for batch, classes in ((64, 10), (128, 10), (512, 100), (2048, 100), (1024, 1000)):
        small = batch * classes < 10_000
        out = interleaved_ratios({side: make_loss(batch, classes, side, kernel) for side in loss_sides},
                                 baseline="ce", alternations=args.alternations, warmup=3, inner=50 if small else 2)
        results[f"loss_only_{batch}x{classes}"] = out
    run.write({"torch_threads": args.threads, "adamw_fused": fused_adamw_on_cpu(),
               "native_kernel": "built" if kernel is not None else why_not, "default_small_path": default_path,
               "results": results}, targets)


if __name__ == "__main__":
    main()
