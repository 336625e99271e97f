"""USTAD training-step costs, as ratios measured in one run (same encoder, same batch, 1 thread by default).

1. USTAD step (DE InfoNCE + CE listwise, forward + backward + AdamW) / DE-only step (``lambda_ce=0``): the price
   of the second score path (the CE's joint passes over each query's candidates).
2. Asymmetric student step with the teacher's document embeddings cached / the same step embedding the
   documents with the frozen teacher tower every step (DE-score distillation + embedding matching).

    python -m benchmarks.ustad_step                       # all-MiniLM-L6-v2 (real weights), batch 16, H=1
    python -m benchmarks.ustad_step --encoder tiny-bert   # seconds
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import best_time, write_results
from lit_cascades.data.retrieval import RetrievalDataModule
from lit_cascades.modules.ustad import USTAD, USTADStudent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = {"encoder_kwargs": {"hidden": 64, "layers": 2, "heads": 2}} if args.encoder == "tiny-bert" else {}
    lengths = {"max_query_length": 32, "max_doc_length": 64, "max_pair_length": 96}
    dm = RetrievalDataModule(batch_size=args.batch_size, num_negatives=args.negatives, max_train_queries=256)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    def step_fn(module: torch.nn.Module):
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

        def step() -> None:
            opt.zero_grad()
            module.compute_losses(batch)["loss"].backward()
            opt.step()

        return step

    results = {}
    torch.manual_seed(0)
    de_only = USTAD(encoder=args.encoder, lambda_ce=0.0, ce_batch_negatives=1, **kwargs, **lengths)
    ustad = USTAD(encoder=args.encoder, ce_batch_negatives=1, **kwargs, **lengths)
    ustad.load_state_dict(de_only.state_dict())
    t_de = best_time(step_fn(de_only), repeats=args.repeats)
    t_us = best_time(step_fn(ustad), repeats=args.repeats)
    results["step"] = {"de_only_s": t_de, "ustad_s": t_us, "ustad_over_de_only": t_us / t_de,
                       "ce_candidates_per_query": 1 + args.negatives + 1}

    docs = dm.splits["train"].docs
    cached = USTADStudent(ustad, student="asymmetric", distill_scores="de", student_layers=1)
    live = USTADStudent(ustad, student="asymmetric", distill_scores="de", student_layers=1)
    cached._doc_cache = cached.cache_doc_embeddings(docs)
    t_cached = best_time(step_fn(cached), repeats=args.repeats)
    t_live = best_time(step_fn(live), repeats=args.repeats)
    results["student_step"] = {"cached_docs_s": t_cached, "live_docs_s": t_live,
                               "live_over_cached": t_live / t_cached}
    write_results("ustad_step", {"encoder": args.encoder, "batch_size": args.batch_size,
                                 "negatives": args.negatives, **results})


if __name__ == "__main__":
    main()
