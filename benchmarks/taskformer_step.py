"""TASK-former training step (contrastive + classification + caption losses) vs a contrastive-only step on the
same towers and batch: the overhead of the auxiliary losses (target: median ratio <= 1.05).

Both models are built from the same seed, so their towers are identical; the contrastive-only model has the
auxiliary weights at 0, which removes the classifier and the caption decoder. Steps of the two models alternate
(``benchmarks._common.interleaved_ratios``: 120 alternations after warm-up, each timing a block of ``--inner`` 3
steps, since single steps vary widely); the median per-alternation ratio is reported with its min-max. Also
reported (``auxiliary_losses_over_full_step``): each auxiliary loss alone, forward and backward from the batch's
embeddings, as a share of a full step (a quarter as many alternations); and (``flops``) the FLOPs of one step of
each model (``benchmarks._common.flop_ratios``), whose ratio is what the auxiliary losses add to the arithmetic:
where the time ratio equals it, the overhead is the auxiliary heads' matrix products, not their implementation.
``flops_paper_dims`` counts the same ratio at the paper's dimensions (:data:`PAPER_DIMS`: CLIP ViT-B/32 image and
sketch towers at 224 px, CLIP's 12-layer 512-wide text tower, the released checkpoint's 6-layer 512-wide decoder
over a 49,408-token vocabulary; random weights, 2 examples; forward and backward, not timed).

    python -m benchmarks.taskformer_step [--image-size 40 --batch 64 --alternations 120 --inner 3 --text-encoder tiny-bert]

Writes docs/results/benchmarks/taskformer_step.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks._common import Run, flop_ratios, interleaved_ratios, target_row
from lit_cascades.data.scenes import SceneRetrievalDataModule
from lit_cascades.data.text_sketch import WordVocab
from lit_cascades.modules._optim import adamw, fused_adamw_on_cpu
from lit_cascades.modules.taskformer import TaskFormer

#: TaskFormer arguments of the paper's model sizes (Sangkloy et al., arXiv:2208.03354: CLIP ViT-B/32 towers; the
#: released decoder is x-transformers' Decoder(dim=512, depth=6, heads=8) over CLIP's 49,408 tokens); the text
#: tower keeps MiniLM's tokenizer (its embedding lookups are not FLOPs)
PAPER_DIMS = {
    "image_size": 224, "embed_dim": 512, "max_text_length": 77, "max_caption_length": 77,
    "image_encoder": "tiny-clip", "image_encoder_kwargs": {"hidden_size": 768, "intermediate_size": 3072,
                                                           "num_hidden_layers": 12, "num_attention_heads": 12,
                                                           "patch_size": 32},
    "text_encoder": "tiny-clip", "text_encoder_kwargs": {"hidden_size": 512, "intermediate_size": 2048,
                                                         "num_hidden_layers": 12, "num_attention_heads": 8},
    "decoder_kwargs": {"dim": 512, "layers": 6, "heads": 8},
}
PAPER_VOCAB = 49408


def paper_dims_flops(batch_size: int = 2) -> dict:
    """:func:`~benchmarks._common.flop_ratios` of one forward + backward of the full and the contrastive-only model
    at :data:`PAPER_DIMS` on ``batch_size`` constructed scenes (the caption vocabulary padded with placeholder
    words to the paper's size, so the decoder's output layer has its width)."""
    size = PAPER_DIMS["image_size"]
    dm = SceneRetrievalDataModule(num_train=batch_size, num_val=1, num_test=1, image_size=size,
                                  object_size=(size * 3 // 10, size // 2), batch_size=batch_size)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    words = list(dm.vocab.words)
    words += [f"<placeholder{i}>" for i in range(PAPER_VOCAB - len(WordVocab.SPECIALS) - len(words))]
    fns = {}
    for name, weights in (("full", {}), ("contrastive_only", {"w_classification": 0.0, "w_caption": 0.0})):
        model = TaskFormer(**PAPER_DIMS, num_classes=dm.num_classes, caption_vocab=words, **weights).train()
        fns[name] = lambda model=model: model.compute_losses(batch)["loss"].backward()
    return {**flop_ratios(fns, baseline="contrastive_only"), "batch": batch_size, "dims": PAPER_DIMS,
            "caption_vocab": PAPER_VOCAB}


def _step(model: TaskFormer, opt: torch.optim.Optimizer, batch: dict):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.compute_losses(batch)["loss"].backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--alternations", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inner", type=int, default=3, help="steps per timed block (single steps vary widely)")
    ap.add_argument("--image-encoder", default="cnn")
    ap.add_argument("--text-encoder", default="tiny-bert")
    ap.add_argument("--skip-paper-dims", action="store_true", help="do not count FLOPs at the paper's dimensions")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Run("taskformer_step")

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
        models[name] = (model, adamw(None, model.parameters(), lr=1e-4))  # the modules' AdamW
    towers = [sum(p.numel() for n, p in m.named_parameters() if "tower" in n) for m, _ in models.values()]
    assert towers[0] == towers[1], "the two models must share the tower architecture"
    steps = {name: _step(m, opt, batch) for name, (m, opt) in models.items()}
    timing = interleaved_ratios(steps,
                                baseline="contrastive_only", alternations=args.alternations, warmup=args.warmup,
                                inner=args.inner)
    ratio = timing["ratios"]["full"]
    # where the overhead is: each auxiliary loss alone (forward + backward from the full model's embeddings of the
    # batch, detached) as a share of a full step
    full = models["full"][0]
    with torch.no_grad():
        v, s = full._encode_visual(batch["image"], batch["sketch"] if full.uses_sketch else None)
    emb = {"image": v, "query": v, **({"sketch": s} if s is not None else {})}

    def part(loss) -> Callable[[], None]:
        def fn() -> None:
            loss({k: e.detach().requires_grad_(True) for k, e in emb.items()}).backward()
            full.zero_grad(set_to_none=True)
        return fn

    parts = interleaved_ratios({"full_step": _step(*models["full"], batch),
                                "classification_loss": part(lambda e: full.classification_loss(e, batch["labels"].float())),
                                "caption_loss": part(lambda e: full.caption_loss(e, batch["caption"]))},
                               baseline="full_step", alternations=max(10, args.alternations // 4), warmup=args.warmup,
                               inner=args.inner)
    flops = flop_ratios(steps, baseline="contrastive_only")
    result = {
        "image_size": args.image_size, "batch": args.batch, "image_encoder": args.image_encoder,
        "text_encoder": args.text_encoder, "threads": torch.get_num_threads(), "adamw_fused": fused_adamw_on_cpu(),
        "inner": args.inner, "timing": timing,
        "params": {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in models.items()},
        "auxiliary_losses_over_full_step": parts, "flops": flops,
    }
    if not args.skip_paper_dims:
        result["flops_paper_dims"] = paper_dims_flops()
    run.write(result, [target_row("TASK-former step (all losses) / contrastive-only step", 1.05, ratio)])
    print(f"full TASK-former step / contrastive-only step = {ratio['median']:.3f} "
          f"[{ratio['min']:.3f}, {ratio['max']:.3f}] (target <= 1.05); FLOP ratio {flops['ratios']['full']:.4f}")


if __name__ == "__main__":
    main()
