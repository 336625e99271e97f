"""USTAD training-step cost against the fair baseline, as ratios measured in one run (same encoder
architecture, same batch, 1 thread by default).

1. Target (<= 1.0): one USTAD step (one encoder; DE InfoNCE + CE listwise, forward + backward + AdamW) / the
   baseline the joint model replaces: one step of a separate cross-encoder (``lambda_de=0``) plus one step of a
   separate dual encoder (``lambda_ce=0``) on the same batch, each with its own AdamW. Also reported: the
   in-module ``model="separate"`` step (two encoders, one optimiser) and the DE-only step (the price of the CE
   path on top of a dual encoder alone). Beside the times: the FLOPs of each side (``flops``,
   ``benchmarks._common.flop_ratios``: the joint step's matrix products equal the two separate steps') and the
   time of the AdamW update of one encoder (``adamw_update_s``), the work the joint model does once and the
   baseline twice; ``1 - adamw_update_s / baseline step`` is the ratio that work alone predicts.
2. Asymmetric student step with the teacher's document embeddings cached / the same step embedding the
   documents with the frozen teacher tower every step (DE-score distillation + embedding matching).

The sides alternate (``benchmarks._common.interleaved_ratios``); every model starts from the same weights.

    python -m benchmarks.ustad_step                       # all-MiniLM-L6-v2 (real weights), batch 16, H=1
    python -m benchmarks.ustad_step --encoder tiny-bert   # seconds

Writes docs/results/benchmarks/ustad_step.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks._common import Run, flop_ratios, interleaved_ratios, spread, target_row
from lit_cascades.data.retrieval import RetrievalDataModule
from lit_cascades.modules._optim import adamw, fused_adamw_on_cpu
from lit_cascades.modules.ustad import USTAD, USTADStudent


def optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    """The modules' AdamW (:func:`lit_cascades.modules._optim.adamw`, fused where torch has it) over ``module``'s
    trainable parameters."""
    return adamw(None, [p for p in module.parameters() if p.requires_grad], lr=1e-5)


def step_fn(module: torch.nn.Module, batch: dict) -> Callable[[], None]:
    """One optimisation step of ``module`` on ``batch`` with :func:`optimizer`."""
    opt = optimizer(module)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module.compute_losses(batch)["loss"].backward()
        opt.step()

    return step


def adamw_update_seconds(module: torch.nn.Module, batch: dict, repeats: int = 10) -> dict:
    """Median / min / max seconds of one AdamW update over ``module``'s trainable parameters, with the gradients
    of one backward pass of ``batch`` (the update changes the weights; run it after the timing)."""
    opt = optimizer(module)
    module.compute_losses(batch)["loss"].backward()
    opt.step()  # warm-up: creates the optimiser state
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    opt.zero_grad(set_to_none=True)
    return spread(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--alternations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-student", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("ustad_step")
    kwargs = {"encoder_kwargs": {"hidden": 64, "layers": 2, "heads": 2}} if args.encoder == "tiny-bert" else {}
    kwargs.update(max_query_length=32, max_doc_length=64, max_pair_length=96, ce_batch_negatives=1)
    dm = RetrievalDataModule(batch_size=args.batch_size, num_negatives=args.negatives, max_train_queries=256)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    torch.manual_seed(0)
    ustad = USTAD(encoder=args.encoder, **kwargs)
    models = {"ustad": ustad, "ce_only": USTAD(encoder=args.encoder, lambda_de=0.0, **kwargs),
              "de_only": USTAD(encoder=args.encoder, lambda_ce=0.0, **kwargs),
              "separate_module": USTAD(encoder=args.encoder, model="separate", **kwargs)}
    for name in ("ce_only", "de_only"):
        models[name].load_state_dict(ustad.state_dict())
    sep = models["separate_module"]
    sep.encoder.load_state_dict(ustad.encoder.state_dict())
    sep.ce_encoder.load_state_dict(ustad.encoder.state_dict())
    sep.ce_head.load_state_dict(ustad.ce_head.state_dict())
    steps = {name: step_fn(m, batch) for name, m in models.items()}

    def separate_ce_plus_de() -> None:
        steps["ce_only"]()
        steps["de_only"]()

    timing = interleaved_ratios({"separate_ce_plus_de": separate_ce_plus_de, "ustad": steps["ustad"],
                                 "separate_module": steps["separate_module"], "de_only": steps["de_only"]},
                                baseline="separate_ce_plus_de", alternations=args.alternations, warmup=1)
    flops = flop_ratios({"separate_ce_plus_de": separate_ce_plus_de, "ustad": steps["ustad"]},
                        baseline="separate_ce_plus_de")
    update = adamw_update_seconds(ustad, batch)
    results = {"step": {**timing, "ce_candidates_per_query": 1 + args.negatives + 1}, "flops": flops,
               "adamw_update_s": update,
               "ratio_predicted_by_one_adamw_update": 1 - update["median"] / timing["median_s"]["separate_ce_plus_de"]}
    targets = [target_row("USTAD step / (separate CE step + separate DE step)", 1.0, timing["ratios"]["ustad"])]

    if not args.skip_student:
        docs = dm.splits["train"].docs
        cached = USTADStudent(ustad, student="asymmetric", distill_scores="de", student_layers=1)
        live = USTADStudent(ustad, student="asymmetric", distill_scores="de", student_layers=1)
        live.load_state_dict(cached.state_dict(), strict=False)
        cached._doc_cache = cached.cache_doc_embeddings(docs)
        results["student_step"] = interleaved_ratios({"cached_docs": step_fn(cached, batch),
                                                      "live_docs": step_fn(live, batch)},
                                                     baseline="cached_docs", alternations=args.alternations,
                                                     warmup=1)
    run.write({"encoder": args.encoder, "adamw_fused": fused_adamw_on_cpu(), "batch_size": args.batch_size,
               "negatives": args.negatives, "torch_threads": args.threads, **results}, targets)


if __name__ == "__main__":
    main()
