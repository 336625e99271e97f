"""Gatekeeper training-step time / cross-entropy training-step time, same model, batch and optimiser.

    python -m benchmarks.gatekeeper_step [--alternations 20] [--threads 1]

Target: median ratio <= 1.05 in both settings: the Fashion-MNIST-sized CNN (batch 128; the model dominates
the step) and the 460-parameter MLP of the Gatekeeper recipe's digits setting (batch 64; the loss's dispatch
overhead dominates). Both steps run forward, loss, backward and the AdamW update; the two sides alternate
(``benchmarks._common.interleaved_ratios``) with identical models and data. Also reported: the loss alone
(forward + backward on fixed logits) against ``F.cross_entropy``.
Writes docs/results/benchmarks/gatekeeper_step.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks._common import Run, interleaved_ratios, target_row
from lit_cascades.functional import gatekeeper_loss
from lit_cascades.models import build_classifier

SETTINGS = {
    "cnn_fashion_mnist_b128": ("cnn", (1, 28, 28), 128, {"width": 32, "depth": 3}),
    "mlp_digits_b64": ("mlp", (1, 8, 8), 64, {"hidden": [6]}),
}


def make_step(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict, loss: str) -> Callable[[], None]:
    """One training step (forward, loss, backward, AdamW) of a fresh seed-0 model on a fixed random batch."""
    torch.manual_seed(0)
    model = build_classifier(arch, shape, 10, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step() -> None:
        logits = model(x)
        value = F.cross_entropy(logits, y) if loss == "ce" else gatekeeper_loss(logits, y, alpha=0.5).loss
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step


def make_loss(batch: int, classes: int, loss: str) -> Callable[[], None]:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(batch, classes, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (batch,), generator=g)

    def run() -> None:
        value = F.cross_entropy(z, y) if loss == "ce" else gatekeeper_loss(z, y, alpha=0.5).loss
        value.backward()
        z.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alternations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("gatekeeper_step")
    results, targets = {}, []
    for name, (arch, shape, batch, kwargs) in SETTINGS.items():
        inner = 20 if arch == "mlp" else 2
        out = interleaved_ratios({"ce": make_step(arch, shape, batch, kwargs, "ce"),
                                  "gatekeeper": make_step(arch, shape, batch, kwargs, "gatekeeper")},
                                 baseline="ce", alternations=args.alternations, warmup=3, inner=inner)
        results[name] = {"arch": arch, "batch": batch, "inner_steps_per_block": inner, **out}
        targets.append(target_row(f"Gatekeeper step / CE step, {name}", 1.05, out["ratios"]["gatekeeper"]))
    for batch, classes in ((64, 10), (128, 10), (4096, 1000)):
        out = interleaved_ratios({"ce": make_loss(batch, classes, "ce"), "gatekeeper": make_loss(batch, classes, "gk")},
                                 baseline="ce", alternations=args.alternations, warmup=3,
                                 inner=50 if batch * classes < 10_000 else 1)
        results[f"loss_only_{batch}x{classes}"] = out
    run.write({"torch_threads": args.threads, "results": results}, targets)


if __name__ == "__main__":
    main()
