"""All deferral metrics on 1,000,000 examples vs scikit-learn's roc_auc_score on the same data.

    python -m benchmarks.deferral_metrics [--n 1000000] [--threads 1]

Target: time ratio <= 1.0 (every curve metric: curve, random/ideal curves, AUC-DF, s_d, s_o (KDE and
histogram), AUROC, quality at a rate, from one sort), with the peak extra memory of each, measured in a fresh
process.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._common import best_time, peak_extra_memory_mb, write_results
from lit_cascades.functional import deferral_metrics

N = 1_000_000


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(n, generator=g) < 0.8).float()
    large = (torch.rand(n, generator=g) < 0.9).float()
    scores = (0.3 * small + torch.rand(n, generator=g)).clamp(max=1.0)
    return scores, small, large


def ours_fn():
    scores, small, large = _data(N)
    return lambda: deferral_metrics(scores, small, large)


def sklearn_fn():
    from sklearn.metrics import roc_auc_score

    scores, small, _ = _data(N)
    s, y = scores.numpy().astype(np.float64), small.numpy()
    return lambda: roc_auc_score(y, s)


def main() -> None:
    global N
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sklearn's AUROC is single-threaded)")
    args = parser.parse_args()
    N = args.n
    torch.set_num_threads(args.threads)
    ours, sk = ours_fn(), sklearn_fn()
    t_ours = best_time(ours, repeats=3)
    t_sk = best_time(sk, repeats=3)
    mem_ours = peak_extra_memory_mb(ours_fn, args.threads)
    mem_sk = peak_extra_memory_mb(sklearn_fn, args.threads)
    write_results("deferral_metrics", {
        "n": N,
        "torch_threads": args.threads,
        "deferral_metrics_s": t_ours,
        "sklearn_roc_auc_s": t_sk,
        "time_ratio": t_ours / t_sk,
        "target": 1.0,
        "peak_extra_mb": {"deferral_metrics": mem_ours, "sklearn_roc_auc": mem_sk},
    })


if __name__ == "__main__":
    main()
