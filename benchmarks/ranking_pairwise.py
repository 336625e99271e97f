"""All-pairs ranking loss: vectorised vs a naive double loop, peak memory, and sampled-pairs error.

    python -m benchmarks.ranking_pairwise            # batch 4,096, 3 labels (~1 min on 2 CPU cores)
    python -m benchmarks.ranking_pairwise --batch 1024 --repeats 3

Measured in one run, on one machine:

1. loss aggregation over all positive–negative pairs of a batch of ``--batch`` examples with 3 labels:
   :func:`lit_cascades.functional.loss_aggregation_loss` (forward, and forward + backward) against a naive
   Python double loop over pairs (forward only, plain floats: its cheapest form). The double loop over all
   ``B² · K`` pairs would take minutes, so it runs over the first ``--loop-rows`` rows of the pair matrix and
   is extrapolated linearly (every row costs the same); the JSON says so. The sides alternate
   (``benchmarks._common.interleaved_ratios``, ``--alternations`` rounds after one warm-up call each); speed-ups
   are per-alternation ratios (median, min–max).
2. peak memory: the resident-set growth of a fresh process running one forward + backward
   (``benchmarks._common.peak_memory_mib``: ``--repeats`` processes, fixed allocator setting), for the all-pairs
   mode and for the sampled mode, plus the bytes autograd keeps for the backward pass.
3. sampled pairs at ``pair_fraction=0.1``: relative error of the loss and cosine similarity of the
   gradient with the exact all-pairs values over ``--draws`` draws, and the speed-up (alternating with the
   all-pairs forward + backward in the same rounds as 1).

Writes ``docs/results/benchmarks/ranking_pairwise.json``.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

import torch

from benchmarks._common import Run, interleaved_ratios, peak_memory_mib, spread
from lit_cascades.functional import label_aggregation_loss, loss_aggregation_loss

PRIORS = (0.5, 0.2, 0.05)


def make_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, generator=g)
    labels = (torch.rand(batch, len(PRIORS), generator=g) < torch.tensor(PRIORS)).float()
    return scores, labels


def naive_loss(scores: list[float], labels: list[list[float]], rows: int) -> float:
    """LoA with equal weights by a double loop over the first ``rows`` rows (unnormalised partial sums)."""
    k = len(labels[0])
    total = [0.0] * k
    for i in range(rows):
        si, yi = scores[i], labels[i]
        for j in range(len(scores)):
            z = si - scores[j]
            phi = math.log1p(math.exp(-z)) if z > -30 else -z
            yj = labels[j]
            for c in range(k):
                if yi[c] == 1.0 and yj[c] == 0.0:
                    total[c] += phi
    return sum(total)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _fwd_bwd(batch: int, pair_fraction: float | None) -> Callable[[], None]:
    """Inputs for one forward + backward (built before the memory baseline is read)."""
    scores, labels = make_batch(batch)
    return lambda: loss_aggregation_loss(scores.clone().requires_grad_(True), labels,
                                         pair_fraction=pair_fraction).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per memory measurement")
    parser.add_argument("--alternations", type=int, default=10)
    parser.add_argument("--loop-rows", type=int, default=48)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("ranking_pairwise")

    b = args.batch
    scores, labels = make_batch(b)
    n_pairs = float((labels.sum(0) * (b - labels.sum(0))).sum())

    # 1. speed: vectorised vs naive double loop (on `rows` rows), vs LaA, and sampled vs all pairs, in alternation
    def fwd_bwd(**kw) -> None:
        s = scores.clone().requires_grad_(True)
        loss_aggregation_loss(s, labels, **kw).loss.backward()

    s_list, y_list = scores.tolist(), labels.tolist()
    rows = min(args.loop_rows, b)
    timing = interleaved_ratios({
        "vectorised_forward": lambda: loss_aggregation_loss(scores, labels),
        "naive_double_loop_forward_rows": lambda: naive_loss(s_list, y_list, rows),
        "vectorised_forward_backward": fwd_bwd,
        "sampled_10pct_forward_backward": lambda: fwd_bwd(pair_fraction=0.1),
        "label_aggregation_forward": lambda: label_aggregation_loss(scores, labels),
    }, baseline="vectorised_forward", alternations=args.alternations, warmup=1)
    scale = b / rows  # the naive loop's time for all rows, extrapolated linearly
    naive_ratio = {k: timing["ratios"]["naive_double_loop_forward_rows"][k] * scale for k in ("median", "min", "max")}
    per_sampled = [a / s for a, s in zip(timing["seconds"]["vectorised_forward_backward"],
                                         timing["seconds"]["sampled_10pct_forward_backward"], strict=True)]
    sampled_speedup = spread(per_sampled, raw=None)
    t_fwd, t_fwd_bwd = timing["median_s"]["vectorised_forward"], timing["median_s"]["vectorised_forward_backward"]
    t_naive = timing["median_s"]["naive_double_loop_forward_rows"] * scale
    t_laa, t_sampled = timing["median_s"]["label_aggregation_forward"], timing["median_s"]["sampled_10pct_forward_backward"]
    # correctness of the naive loop on a small batch (it is the oracle in the tests too)
    small_s, small_y = make_batch(64, seed=1)
    n_small = small_y.sum(0) * (64 - small_y.sum(0))
    ref = loss_aggregation_loss(small_s.double(), small_y.double(), weights=n_small.tolist()).loss.item()
    naive_small = naive_loss(small_s.tolist(), small_y.tolist(), 64) / float(n_small.sum())
    assert abs(ref - naive_small) < 1e-5 * max(1.0, abs(ref)), (ref, naive_small)

    # 2. memory
    mem_all = peak_memory_mib(functools.partial(_fwd_bwd, b, None), args.repeats, args.threads)
    mem_sampled = peak_memory_mib(functools.partial(_fwd_bwd, b, 0.1), args.repeats, args.threads)
    s_req = scores.clone().requires_grad_(True)
    saved_all = saved_bytes(lambda: loss_aggregation_loss(s_req, labels).loss)
    saved_sampled = saved_bytes(lambda: loss_aggregation_loss(s_req, labels, pair_fraction=0.1).loss)

    # 3. sampled pairs at 10 %
    s_exact = scores.clone().requires_grad_(True)
    exact = loss_aggregation_loss(s_exact, labels).loss
    exact.backward()
    g_exact = s_exact.grad.clone()
    gen = torch.Generator().manual_seed(0)
    rel_err, cosines = [], []
    for _ in range(args.draws):
        s = scores.clone().requires_grad_(True)
        est = loss_aggregation_loss(s, labels, pair_fraction=0.1, generator=gen).loss
        est.backward()
        rel_err.append(abs(est.item() - exact.item()) / exact.item())
        cosines.append(torch.nn.functional.cosine_similarity(s.grad, g_exact, dim=0).item())
    rel = torch.tensor(rel_err)
    cos = torch.tensor(cosines)

    result = {
        "batch": b,
        "labels": len(PRIORS),
        "priors": PRIORS,
        "positive_negative_pairs": n_pairs,
        "torch_threads": args.threads,
        "timing": timing,
        "time_s": {  # medians over the alternations
            "vectorised_forward": t_fwd,
            "vectorised_forward_backward": t_fwd_bwd,
            "label_aggregation_forward": t_laa,
            "naive_double_loop_forward": t_naive,
            "naive_double_loop_note": f"measured on {rows} of {b} rows, extrapolated linearly",
            "sampled_10pct_forward_backward": t_sampled,
        },
        "speedup": {  # per-alternation ratios
            "vectorised_vs_naive_forward": naive_ratio,
            "sampled_10pct_vs_all_pairs_forward_backward": sampled_speedup,
        },
        "memory_mib": {
            "all_pairs_peak_rss_growth": mem_all,
            "sampled_10pct_peak_rss_growth": mem_sampled,
            "all_pairs_saved_for_backward": saved_all / 2**20,
            "sampled_10pct_saved_for_backward": saved_sampled / 2**20,
        },
        "sampled_10pct_vs_exact": {
            "draws": args.draws,
            "loss_relative_error_mean": float(rel.mean()),
            "loss_relative_error_p95": float(rel.quantile(0.95)),
            "gradient_cosine_mean": float(cos.mean()),
            "gradient_cosine_min": float(cos.min()),
        },
    }
    out = run.write(result)
    print(f"batch {b}, {len(PRIORS)} labels, {n_pairs:.3g} positive-negative pairs")
    print(f"  vectorised forward        {t_fwd * 1e3:9.1f} ms   (forward+backward {t_fwd_bwd * 1e3:.1f} ms)")
    print(f"  naive double loop forward {t_naive * 1e3:9.1f} ms   ({rows} rows measured, extrapolated)")
    print(f"  speed-up vectorised / naive: {naive_ratio['median']:,.0f}x "
          f"({naive_ratio['min']:,.0f}-{naive_ratio['max']:,.0f}x over {args.alternations} alternations)")
    print(f"  peak memory growth: all pairs {mem_all['median']:.0f} MiB, sampled 10% {mem_sampled['median']:.0f} MiB; "
          f"saved for backward {saved_all / 2**20:.0f} MiB vs {saved_sampled / 2**20:.1f} MiB")
    print(f"  sampled 10%: loss rel. error mean {rel.mean():.2e} (p95 {rel.quantile(0.95):.2e}), "
          f"gradient cosine mean {cos.mean():.4f} (min {cos.min():.4f}), "
          f"speed-up {sampled_speedup['median']:.1f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
