"""All deferral metrics on 1,000,000 examples vs scikit-learn's ``roc_auc_score`` on the same data.

    python -m benchmarks.deferral_metrics [--n 1000000] [--alternations 10] [--memory-repeats 5]

Targets: ``deferral_metrics`` (curve, random and ideal curves, AUC-DF, s_d, s_o by KDE and histogram, AUROC,
quality at a rate, from one sort) takes <= 1.0x the time of ``sklearn.metrics.roc_auc_score`` alone and
<= 1.0x its peak extra memory. Timing: the two alternate (``benchmarks._common.interleaved_ratios``), one
torch thread (scikit-learn's AUROC is single-threaded). Memory: peak RSS over a post-warm-up baseline in a
fresh process per measurement with a fixed allocator setting (``benchmarks._common``), repeated; the inputs
are float32 scores and 0/1 float32 qualities for both (scikit-learn converts them to float64 itself, which is
part of its cost as it is of ours). Writes docs/results/benchmarks/deferral_metrics.json.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks._common import Run, interleaved_ratios, peak_memory_mib, spread, target_row
from lit_cascades.functional import deferral_metrics

N = 1_000_000


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(n, generator=g) < 0.8).float()
    large = (torch.rand(n, generator=g) < 0.9).float()
    scores = (0.3 * small + torch.rand(n, generator=g)).clamp(max=1.0)  # ~24% tied at 1.0
    return scores, small, large


def ours_fn(n: int = N):
    scores, small, large = _data(n)
    return lambda: deferral_metrics(scores, small, large)


def sklearn_fn(n: int = N):
    from sklearn.metrics import roc_auc_score

    scores, small, _ = _data(n)
    s, y = scores.numpy(), small.numpy()
    return lambda: roc_auc_score(y, s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sklearn's AUROC is single-threaded)")
    parser.add_argument("--alternations", type=int, default=10)
    parser.add_argument("--memory-repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("deferral_metrics")
    timing = interleaved_ratios({"sklearn_roc_auc": sklearn_fn(args.n), "deferral_metrics": ours_fn(args.n)},
                                baseline="sklearn_roc_auc", alternations=args.alternations, warmup=1)
    mem = {}
    for _ in range(args.memory_repeats):  # alternate the two sides here too
        for name, fn in (("sklearn_roc_auc", sklearn_fn), ("deferral_metrics", ours_fn)):
            mem.setdefault(name, []).append(peak_memory_mib(functools.partial(fn, args.n), repeats=1,
                                                            threads=args.threads)["values"][0])
    mem_summary = {k: spread(v) for k, v in mem.items()}
    per = [o / s for o, s in zip(mem["deferral_metrics"], mem["sklearn_roc_auc"], strict=True)]
    mem_ratio = spread(per, "per_repeat")
    run.write({"n": args.n, "torch_threads": args.threads, "timing": timing, "peak_extra_mib": mem_summary,
               "memory_ratio": mem_ratio},
              [target_row("deferral metrics / sklearn roc_auc_score, time (1M)", 1.0,
                          timing["ratios"]["deferral_metrics"]),
               target_row("deferral metrics / sklearn roc_auc_score, peak memory (1M)", 1.0, mem_ratio, "memory")])


if __name__ == "__main__":
    main()
