"""Gatekeeper training-step time / cross-entropy training-step time, same model and batch.

    python -m benchmarks.gatekeeper_step [--threads 1]

Target: ratio <= 1.05. Two settings: the CNN on a Fashion-MNIST-sized batch (a realistic step, where the model
dominates) and a tiny MLP on digits (a loss-dominated worst case). Both losses run the full step (forward,
loss, backward, AdamW update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._common import best_time, write_results
from lit_cascades.functional import gatekeeper_loss
from lit_cascades.models import build_classifier


def step_time(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict, loss: str, repeats: int = 20) -> float:
    torch.manual_seed(0)
    model = build_classifier(arch, shape, 10, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

    def step() -> None:
        logits = model(x)
        value = F.cross_entropy(logits, y) if loss == "ce" else gatekeeper_loss(logits, y, alpha=0.5).loss
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return best_time(step, repeats=repeats, warmup=3)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    settings = {
        "cnn_fashion_mnist_b128": ("cnn", (1, 28, 28), 128, {"width": 32, "depth": 3}),
        "mlp_digits_b64": ("mlp", (1, 8, 8), 64, {"hidden": [6]}),
    }
    results = {}
    for name, (arch, shape, batch, kwargs) in settings.items():
        ce = step_time(arch, shape, batch, kwargs, "ce")
        gk = step_time(arch, shape, batch, kwargs, "gatekeeper")
        results[name] = {"ce_step_s": ce, "gatekeeper_step_s": gk, "ratio": gk / ce, "target": 1.05}
    write_results("gatekeeper_step", {"torch_threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
