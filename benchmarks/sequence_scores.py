"""Batched sequence deferral scores vs a per-example loop, 100k variable-length sequences.

    python -m benchmarks.sequence_scores [--n 100000] [--t 64] [--threads 1]

Computes Chow-Sum, Chow-Average and the 11-level quantile feature vector (Chow-Quantile at every level) for
``n`` sequences of random lengths in ``[1, t]``: once batched (``sequence_scores``: one masked sort) and once
with a Python loop over examples (``row.sum()``, ``row.mean()``, ``torch.quantile(row, levels)``); checks
that they agree and reports the speed-up.
"""

from __future__ import annotations

import time

import torch

from benchmarks._common import best_time, write_results
from lit_cascades.functional.sequence_scores import DEFAULT_QUANTILES, sequence_scores


def loop(logprobs: torch.Tensor, lengths: torch.Tensor, levels: tuple[float, ...]) -> list[torch.Tensor]:
    q = torch.tensor(levels, dtype=logprobs.dtype)
    sums, means, quants = [], [], []
    for i in range(logprobs.shape[0]):
        row = logprobs[i, : int(lengths[i])]
        sums.append(row.sum())
        means.append(row.mean())
        quants.append(torch.quantile(row, q))
    return [torch.stack(sums), torch.stack(means), torch.stack(quants)]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--t", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.t + 1, (args.n,), generator=g)
    mask = torch.arange(args.t)[None] < lengths[:, None]
    logprobs = -torch.rand(args.n, args.t, generator=g) * 5
    levels = DEFAULT_QUANTILES

    t_batched = best_time(lambda: sequence_scores(logprobs, mask, levels), repeats=3)
    start = time.perf_counter()
    slow = loop(logprobs, lengths, levels)
    t_loop = time.perf_counter() - start
    fast = sequence_scores(logprobs, mask, levels)
    max_diff = max(float((a - b).abs().max()) for a, b in
                   zip((fast["chow_sum"], fast["chow_average"], fast["quantiles"]), slow))
    write_results("sequence_scores", {
        "n_sequences": args.n, "max_len": args.t, "n_quantiles": len(levels), "batched_s": t_batched,
        "loop_s": t_loop, "speedup": t_loop / t_batched, "max_abs_diff": max_diff,
    })


if __name__ == "__main__":
    main()
