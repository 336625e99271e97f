"""Batched sequence deferral scores vs a per-example loop, 100k variable-length sequences.

    python -m benchmarks.sequence_scores [--n 100000] [--t 64] [--threads 1] [--alternations 10]

Computes Chow-Sum, Chow-Average and the 11-level quantile feature vector (Chow-Quantile at every level) for
``n`` sequences of random lengths in ``[1, t]``: batched (``sequence_scores``: one masked sort) and with a Python
loop over examples (``row.sum()``, ``row.mean()``, ``torch.quantile(row, levels)``), the two sides alternating
(``benchmarks._common.interleaved_ratios``, one warm-up call each); checks that they agree and reports the
speed-up (loop time / batched time per alternation: median, min–max). Writes
docs/results/benchmarks/sequence_scores.json.
"""

from __future__ import annotations

import torch

from benchmarks._common import Run, interleaved_ratios
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
    parser.add_argument("--alternations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("sequence_scores")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.t + 1, (args.n,), generator=g)
    mask = torch.arange(args.t)[None] < lengths[:, None]
    logprobs = -torch.rand(args.n, args.t, generator=g) * 5
    levels = DEFAULT_QUANTILES

    timing = interleaved_ratios({"batched": lambda: sequence_scores(logprobs, mask, levels),
                                 "loop": lambda: loop(logprobs, lengths, levels)},
                                baseline="batched", alternations=args.alternations, warmup=1)
    slow = loop(logprobs, lengths, levels)
    fast = sequence_scores(logprobs, mask, levels)
    max_diff = max(float((a - b).abs().max()) for a, b in
                   zip((fast["chow_sum"], fast["chow_average"], fast["quantiles"]), slow))
    run.write({"n_sequences": args.n, "max_len": args.t, "n_quantiles": len(levels), "torch_threads": args.threads,
               "batched_s": timing["median_s"]["batched"], "loop_s": timing["median_s"]["loop"],
               "speedup": timing["ratios"]["loop"], "max_abs_diff": max_diff, "timing": timing})


if __name__ == "__main__":
    main()
