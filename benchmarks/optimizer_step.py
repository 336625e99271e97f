"""Training steps with the modules' AdamW (fused at full precision, ``lit_cascades.modules._optim.adamw``) against
torch's default AdamW (a loop of element-wise operations per parameter tensor), as ratios measured in one run.

Each setting builds one model twice from the same seed and times a full step (forward, loss, backward, AdamW) of
each on the same batch, the two sides alternating (``benchmarks._common.interleaved_ratios``, blocks of
``inner`` steps); the reported figure is the fused step's time over the default step's (median, min-max).
Settings: the Gatekeeper recipe's small models (the digits MLP, batch 64; the Fashion-MNIST CNN, batch 128), the
TASK-former default (CNN + ``tiny-bert`` towers, batch 64) and USTAD with a ``tiny-bert`` encoder (batch 16).

    python -m benchmarks.optimizer_step            # ~3 min on one thread

Writes docs/results/benchmarks/optimizer_step.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks._common import Run, interleaved_ratios
from lit_cascades.models import build_classifier
from lit_cascades.modules._optim import fused_adamw_on_cpu


def _step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def classifier(arch: str, shape: tuple[int, ...], batch: int, kwargs: dict) -> Callable[[bool], Callable[[], None]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def make(fused: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        model = build_classifier(arch, shape, 10, **kwargs)
        return _step(lambda: F.cross_entropy(model(x), y), torch.optim.AdamW(model.parameters(), lr=1e-3,
                                                                              fused=fused or None))

    return make


def module_step(build: Callable[[], torch.nn.Module], batch: dict) -> Callable[[bool], Callable[[], None]]:
    """A module's own ``configure_optimizers`` parameter groups, fused or not."""

    def make(fused: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        module = build().train()
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach", "initial_lr")}
                  for g in module.configure_optimizers()["optimizer"].param_groups]
        return _step(lambda: module.compute_losses(batch)["loss"], torch.optim.AdamW(groups, fused=fused or None))

    return make


def taskformer() -> Callable[[bool], Callable[[], None]]:
    from types import SimpleNamespace

    from lit_cascades.data.scenes import SceneRetrievalDataModule
    from lit_cascades.modules.taskformer import TaskFormer

    dm = SceneRetrievalDataModule(num_train=64, num_val=1, num_test=1, image_size=40, object_size=(12, 20),
                                  batch_size=64)
    dm.setup()

    def build() -> TaskFormer:
        m = TaskFormer(image_size=40, num_classes=dm.num_classes, caption_vocab=dm.vocab.words,
                       image_encoder_kwargs={"width": 16, "depth": 3})
        m._trainer = SimpleNamespace(estimated_stepping_batches=100, precision="32-true")
        return m

    return module_step(build, next(iter(dm.train_dataloader())))


def ustad() -> Callable[[bool], Callable[[], None]]:
    from types import SimpleNamespace

    from lit_cascades.data.retrieval import RetrievalDataModule
    from lit_cascades.modules.ustad import USTAD

    dm = RetrievalDataModule(batch_size=16, num_negatives=1, max_train_queries=256)
    dm.setup()

    def build() -> USTAD:
        m = USTAD(encoder="tiny-bert", encoder_kwargs={"hidden": 64, "layers": 2, "heads": 2}, max_query_length=32,
                  max_doc_length=64, max_pair_length=96, ce_batch_negatives=1)
        m._trainer = SimpleNamespace(estimated_stepping_batches=100, precision="32-true")
        return m

    return module_step(build, next(iter(dm.train_dataloader())))


SETTINGS: dict[str, tuple[Callable[[], Callable[[bool], Callable[[], None]]], int]] = {
    "gatekeeper_mlp_digits_b64": (lambda: classifier("mlp", (1, 8, 8), 64, {"hidden": [6]}), 100),
    "gatekeeper_cnn_fashion_mnist_b128": (lambda: classifier("cnn", (1, 28, 28), 128, {"width": 32, "depth": 3}), 3),
    "taskformer_default_b64": (taskformer, 3),
    "ustad_tiny_bert_b16": (ustad, 3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alternations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("optimizer_step")
    results = {}
    for name in args.settings:
        setup, inner = SETTINGS[name]
        make = setup()
        results[name] = interleaved_ratios({"default": make(False), "fused": make(True)}, baseline="default",
                                           alternations=args.alternations, warmup=2, inner=inner)
        r = results[name]["ratios"]["fused"]
        print(f"{name}: fused / default step = {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    run.write({"torch_threads": args.threads, "fused_available_on_cpu": fused_adamw_on_cpu(), "results": results})


if __name__ == "__main__":
    main()
