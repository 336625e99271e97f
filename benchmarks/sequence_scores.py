"""Batched sequence deferral scores vs a per-example loop on 100k variable-length sequences.

Computes Chow-Sum, Chow-Average and the 11-level quantile feature vector (Chow-Quantile at every level)
for N sequences of random lengths in [1, T], once batched (``sequence_scores``: one masked sort) and once with a Python
loop over examples (``row.sum()``, ``row.mean()``, ``torch.quantile(row, levels)``), checks they agree, and
prints the speed-up. Writes benchmarks/results/sequence_scores.json.

    python -m benchmarks.sequence_scores [--n 100000] [--t 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_cascades.functional.sequence_scores import DEFAULT_QUANTILES, sequence_scores


def batched(logprobs, mask, levels):
    out = sequence_scores(logprobs, mask, levels)
    return out["chow_sum"], out["chow_average"], out["quantiles"]


def loop(logprobs, lengths, levels):
    q = torch.tensor(levels, dtype=logprobs.dtype)
    sums, means, quants = [], [], []
    for i in range(logprobs.shape[0]):
        row = logprobs[i, : int(lengths[i])]
        sums.append(row.sum())
        means.append(row.mean())
        quants.append(torch.quantile(row, q))
    return torch.stack(sums), torch.stack(means), torch.stack(quants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--t", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.t + 1, (args.n,), generator=g)
    mask = torch.arange(args.t)[None] < lengths[:, None]
    logprobs = -torch.rand(args.n, args.t, generator=g) * 5
    levels = DEFAULT_QUANTILES

    batched(logprobs[:100], mask[:100], levels)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fast = batched(logprobs, mask, levels)
        times.append(time.perf_counter() - t0)
    t_batched = min(times)
    t0 = time.perf_counter()
    slow = loop(logprobs, lengths, levels)
    t_loop = time.perf_counter() - t0
    max_err = max(float((a - b).abs().max()) for a, b in zip(fast, slow))
    result = {
        "n_sequences": args.n, "max_len": args.t, "n_quantiles": len(levels),
        "batched_s": t_batched, "loop_s": t_loop, "speedup": t_loop / t_batched, "max_abs_diff": max_err,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{args.n} sequences (T<={args.t}): batched {t_batched * 1e3:.1f} ms, loop {t_loop:.2f} s, "
          f"speed-up x{result['speedup']:.0f}, max |diff| {max_err:.2e}")
    out = Path(__file__).parent / "results" / "sequence_scores.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
