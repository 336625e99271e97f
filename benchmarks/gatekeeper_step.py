"""Gatekeeper training-step time / cross-entropy training-step time, same model, batch and optimiser.

    python -m benchmarks.gatekeeper_step [--alternations 60] [--threads 1]

Target: median ratio <= 1.05 in both settings: the Fashion-MNIST-sized CNN (batch 128; the model dominates
the step) and the 460-parameter MLP of the Gatekeeper recipe's digits setting (batch 64; the loss's dispatch
overhead dominates). Both steps run forward, loss, backward and the AdamW update; the two sides alternate
(``benchmarks._common.interleaved_ratios``) with identical models and data. Also reported: the loss alone
(forward + backward on fixed logits) against ``F.cross_entropy`` at several sizes, for both implementations of
the loss (the NumPy path for small CPU inputs and the fused torch path): the crossover behind
``lit_cascades.functional.gatekeeper.SMALL_MAX_ELEMENTS``. Where the opt-in C++ kernel
(``lit_cascades.functional.gatekeeper.use_native_kernel``) builds, it is measured as a third side of the same
rounds (``gatekeeper_native``, ``gk_native``) with its own target rows; otherwise the reason is recorded.
Writes docs/results/benchmarks/gatekeeper_step.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import lit_cascades.functional.gatekeeper as gk_impl
from benchmarks._common import Run, interleaved_ratios, target_row
from lit_cascades.functional import gatekeeper_loss
from lit_cascades.models import build_classifier

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


def gatekeeper_value(logits: torch.Tensor, y: torch.Tensor, kernel: Any = None,
                     small_max: int | None = None) -> torch.Tensor:
    """The Gatekeeper loss (α = 0.5) through the default dispatch, or through ``kernel`` when given; ``small_max``
    replaces ``SMALL_MAX_ELEMENTS`` for the call (forcing the NumPy/kernel path or the torch path)."""
    saved = gk_impl._NATIVE, gk_impl.SMALL_MAX_ELEMENTS
    gk_impl._NATIVE = kernel
    gk_impl.SMALL_MAX_ELEMENTS = saved[1] if small_max is None else small_max
    try:
        return gatekeeper_loss(logits, y, alpha=0.5).loss
    finally:
        gk_impl._NATIVE, gk_impl.SMALL_MAX_ELEMENTS = saved


def make_step(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict, loss: str,
              kernel: Any = None) -> Callable[[], None]:
    """One training step (forward, loss, backward, AdamW) of a fresh seed-0 model on a fixed random batch:
    ``"ce"``, ``"gatekeeper"`` (default dispatch) or ``"gatekeeper_native"`` (through ``kernel``)."""
    torch.manual_seed(0)
    model = build_classifier(arch, shape, 10, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    use = kernel if loss == "gatekeeper_native" else None

    def step() -> None:
        logits = model(x)
        value = F.cross_entropy(logits, y) if loss == "ce" else gatekeeper_value(logits, y, use)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step


def make_loss(batch: int, classes: int, loss: str, kernel: Any = None) -> Callable[[], None]:
    """Loss forward + backward on fixed logits: ``"ce"``, ``"gk"`` (default dispatch), ``"gk_numpy"``,
    ``"gk_torch"`` or ``"gk_native"`` (one implementation forced; the last through ``kernel``)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(batch, classes, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (batch,), generator=g)
    limit = {"gk_numpy": 1 << 62, "gk_native": 1 << 62, "gk_torch": 0}.get(loss)

    def run() -> None:
        if loss == "ce":
            value = F.cross_entropy(z, y)
        else:
            value = gatekeeper_value(z, y, kernel if loss == "gk_native" else None, limit)
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
    step_sides = ("ce", "gatekeeper") + (("gatekeeper_native",) if kernel is not None else ())
    results, targets = {}, []
    for name, (arch, shape, batch, kwargs) in SETTINGS.items():
        inner = 20 if arch == "mlp" else 2
        out = interleaved_ratios({side: make_step(arch, shape, batch, kwargs, side, kernel) for side in step_sides},
                                 baseline="ce", alternations=args.alternations, warmup=3, inner=inner)
        results[name] = {"arch": arch, "batch": batch, "inner_steps_per_block": inner, **out}
        targets.append(target_row(f"Gatekeeper step / CE step, {name}", 1.05, out["ratios"]["gatekeeper"]))
        if kernel is not None:
            targets.append(target_row(f"Gatekeeper step / CE step, {name}, C++ kernel (use_native_kernel)", 1.05,
                                      out["ratios"]["gatekeeper_native"]))
    # the loss alone, each implementation: where the NumPy path stops paying (SMALL_MAX_ELEMENTS)
    loss_sides = ("ce", "gk_numpy", "gk_torch") + (("gk_native",) if kernel is not None else ())
    for batch, classes in ((64, 10), (128, 10), (512, 100), (2048, 100), (1024, 1000)):
        small = batch * classes < 10_000
        out = interleaved_ratios({side: make_loss(batch, classes, side, kernel) for side in loss_sides},
                                 baseline="ce", alternations=args.alternations, warmup=3, inner=50 if small else 2)
        results[f"loss_only_{batch}x{classes}"] = out
    run.write({"torch_threads": args.threads, "native_kernel": "built" if kernel is not None else why_not,
               "results": results}, targets)


if __name__ == "__main__":
    main()
