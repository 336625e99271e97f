"""TASK-former training step (contrastive + classification + caption losses) vs a contrastive-only step on the
same towers and batch: the overhead of the auxiliary losses (target: ratio <= 1.3).

Both models are built from the same seed, so their towers are identical; the contrastive-only model has the
auxiliary weights at 0, which removes the classifier and the caption decoder. Steps of the two models alternate
(machine load hits both alike); the median step time is reported.

    python -m benchmarks.taskformer_step [--image-size 40 --batch 64 --steps 30 --text-encoder tiny-bert]

Writes benchmarks/results/taskformer_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._common import write_results
from lit_cascades.data.scenes import SceneRetrievalDataModule
from lit_cascades.modules.taskformer import TaskFormer


def _step(model: TaskFormer, opt: torch.optim.Optimizer, batch: dict) -> float:
    t = time.perf_counter()
    model.compute_losses(batch)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--image-encoder", default="cnn")
    ap.add_argument("--text-encoder", default="tiny-bert")
    args = ap.parse_args()

    dm = SceneRetrievalDataModule(num_train=args.batch, num_val=1, num_test=1, image_size=args.image_size,
                                  object_size=(args.image_size * 3 // 10, args.image_size // 2), batch_size=args.batch)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    kwargs = {"image_size": args.image_size, "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
              "num_classes": dm.num_classes, "caption_vocab": dm.vocab.words,
              "image_encoder_kwargs": {"width": 16, "depth": 3} if args.image_encoder == "cnn" else None}
    models = {}
    for name, weights in (("full", {}), ("contrastive_only", {"w_classification": 0.0, "w_caption": 0.0})):
        torch.manual_seed(0)
        model = TaskFormer(**kwargs, **weights).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    towers = [sum(p.numel() for n, p in m.named_parameters() if "tower" in n) for m, _ in models.values()]
    assert towers[0] == towers[1], "the two models must share the tower architecture"
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name, (model, opt) in models.items():
            t = _step(model, opt, batch)
            if i >= args.warmup:
                times[name].append(t)
    full, base = statistics.median(times["full"]), statistics.median(times["contrastive_only"])
    result = {
        "image_size": args.image_size, "batch": args.batch, "steps": args.steps, "image_encoder": args.image_encoder,
        "text_encoder": args.text_encoder, "threads": torch.get_num_threads(),
        "full_step_ms": 1000 * full, "contrastive_only_step_ms": 1000 * base, "ratio_full_over_contrastive": full / base,
        "target_ratio": 1.3,
        "params": {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in models.items()},
    }
    write_results("taskformer_step", result)
    print(f"full TASK-former step / contrastive-only step = {full / base:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
