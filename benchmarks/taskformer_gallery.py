"""TASK-former gallery evaluation at 100k images: image-encoding throughput, and ranking the three query types
(text, sketch, text+sketch) against the whole gallery with chunked top-k vs the full score matrix.

* encoding: the default image tower (CNN, 40 px) over ``--encode`` real constructed-scene images, in
  evaluation batches, ``--repeats`` times after a warm-up pass; images/s (median, min–max) and the implied time for
  the 100k gallery;
* ranking: ``--queries`` queries of each type against ``--gallery`` embeddings (``D = --dim``; random unit
  vectors, the cost does not depend on their values), top-``k``: :func:`~lit_cascades.functional.retrieval.
  chunked_topk` vs ``torch.topk`` on the full ``[Q, N]`` score matrix. Each method runs once in a fresh process
  (freed memory stays in a process, so one method would reuse the other's, and a warm-up call would let the
  chunked search reuse its own freed chunks), started with the fixed allocator setting of
  ``benchmarks._common.MALLOC_ENV`` and a timeout; time and peak extra memory (Linux ``VmHWM`` reset after the
  embeddings are built), and whether both return the same lists. The two methods' processes alternate
  ``--repeats`` times (order reversed every other time); the time and memory ratios are per-repeat ratios
  (median, min–max).

    python -m benchmarks.taskformer_gallery [--gallery 100000 --queries 1000 --dim 64 --encode 8192]

Writes docs/results/benchmarks/taskformer_gallery.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import MALLOC_ENV, Run, spread
from lit_cascades.data.scenes import SceneRetrievalDataModule
from lit_cascades.functional.retrieval import chunked_topk
from lit_cascades.modules.taskformer import TaskFormer

QUERY_TYPES = ("text", "sketch", "text+sketch")


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def _measure(fn):
    """``(seconds, peak extra MiB or None, result)`` of ``fn()``."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
        base = _hwm_kib()
    except OSError:
        base = None
    t = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t
    return sec, (None if base is None else (_hwm_kib() - base) / 1024), out


def _full_matrix_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (queries @ gallery.T).topk(k, dim=1)


@torch.no_grad()
def rank_only(method: str, args: argparse.Namespace) -> None:
    """Child process: rank every query type with one method; print time, peak memory and the top-k ids."""
    torch.manual_seed(0)
    gallery = F.normalize(torch.randn(args.gallery, args.dim), dim=-1)
    queries = {qt: F.normalize(torch.randn(args.queries, args.dim), dim=-1) for qt in QUERY_TYPES}
    fn = ((lambda q: chunked_topk(q, gallery, args.k, chunk_size=args.chunk_size)) if method == "chunked"
          else (lambda q: _full_matrix_topk(q, gallery, args.k)))
    sec, peak, out = _measure(lambda: [fn(q)[1] for q in queries.values()])
    print(json.dumps({"seconds": sec, "queries_per_s": len(QUERY_TYPES) * args.queries / sec, "peak_extra_mib": peak,
                      "ids": torch.stack(out).tolist()}))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=1024)  # TaskFormer's eval_chunk_size
    ap.add_argument("--encode", type=int, default=8192)
    ap.add_argument("--eval-batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="encoding passes and processes per ranking method")
    ap.add_argument("--rank-only", choices=("chunked", "full_matrix"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_only:
        return rank_only(args.rank_only, args)
    run = Run("taskformer_gallery")

    # image encoding throughput of the default tower
    dm = SceneRetrievalDataModule(num_train=2, num_val=2, num_test=min(args.encode, 2048), eval_batch_size=args.eval_batch)
    dm.setup()
    images = torch.cat([b["image"] for b in dm.test_dataloader()])
    images = images.repeat((args.encode + len(images) - 1) // len(images), 1, 1, 1)[: args.encode]
    model = TaskFormer(image_size=dm.image_size, embed_dim=args.dim, image_encoder_kwargs={"width": 16, "depth": 3},
                       query="sketch").eval()
    model.encode_image(images[: args.eval_batch])  # warm-up
    rates = [args.encode / _measure(lambda: [model.encode_image(x) for x in images.split(args.eval_batch)])[0]
             for _ in range(args.repeats)]
    enc_rate = statistics.median(rates)

    # ranking: chunked vs full matrix, each in its own process, alternating
    runs: dict[str, list[dict]] = {"chunked": [], "full_matrix": []}
    for i in range(args.repeats):
        for method in ("chunked", "full_matrix") if i % 2 == 0 else ("full_matrix", "chunked"):
            cmd = [sys.executable, "-m", "benchmarks.taskformer_gallery", "--rank-only", method,
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "rank_only")]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800,
                                  env={**os.environ, **MALLOC_ENV})
            runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ids = {m: torch.tensor([r.pop("ids") for r in rs]) for m, rs in runs.items()}
    same = float(ids["chunked"].eq(ids["full_matrix"]).float().mean())

    pairs = list(zip(runs["chunked"], runs["full_matrix"], strict=True))
    rank = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "queries_per_s", "peak_extra_mib")}
            for m, rs in runs.items()}
    has_mem = all(f["peak_extra_mib"] for _, f in pairs)
    result = {
        "gallery": args.gallery, "queries_per_type": args.queries, "dim": args.dim, "k": args.k,
        "chunk_size": args.chunk_size, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "encode_images_per_s": enc_rate, "encode_images_per_s_repeats": spread(rates),
        "encode_100k_gallery_s": 100_000 / enc_rate,
        "ranking": rank, "ranking_runs": runs, "score_matrix_mib": args.queries * args.gallery * 4 / 2**20,
        "speed_ratio_chunked_over_full": spread([f["seconds"] / c["seconds"] for c, f in pairs]),
        "memory_ratio_chunked_over_full": (spread([c["peak_extra_mib"] / f["peak_extra_mib"] for c, f in pairs])
                                           if has_mem else None),
        "identical_top_k_fraction": same,
    }
    run.write(result)

if __name__ == "__main__":
    main()
