"""Peak memory of SALT's chunked NTP+KD loss vs the naive (unchunked) version, forward + backward.

    python -m benchmarks.salt_kd_memory [--vocab 49152] [--length 512] [--batch 1] [--threads 1]

Setting of the issue: vocabulary 49,152 (SmolLM2's) and sequence 512. Student and teacher logits ``[B, T, V]``
fp32 are created before the measurement (every KD implementation needs them); what is measured is the extra
peak resident memory (Linux ``VmHWM`` − ``VmRSS``, reset after a warm-up call, in a fresh process per
measurement with a fixed allocator setting: :func:`benchmarks._common.peak_memory_mib`, repeated, median with
min-max) of computing the loss and its gradient w.r.t. the student logits. Both versions are measured the same
way in the same run. The gradient itself (one ``[B, T, V]`` tensor, ``B·T·V·4`` bytes) is part of both numbers.
Writes docs/results/benchmarks/salt_kd_memory.json.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks._common import Run, peak_memory_mib
from lit_cascades.functional.distillation import kd_loss, naive_kd_loss, naive_salt_loss, salt_loss


def _prepare(kind: str, batch: int, length: int, vocab: int, chunk: int | None):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, length, vocab, generator=g).requires_grad_(True)
    a = torch.randn(batch, length, vocab, generator=g)
    y = torch.randint(0, vocab, (batch, length), generator=g)
    losses = {
        "kd_chunked": lambda: kd_loss(z, a, y, chunk_size=chunk),
        "kd_naive": lambda: naive_kd_loss(z, a, y),
        "salt_chunked": lambda: salt_loss(z, a, y, 0.5, chunk_size=chunk).loss,
        "salt_naive": lambda: naive_salt_loss(z, a, y, 0.5),
    }
    fn = losses[kind]

    def step() -> None:
        fn().backward()
        z.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="positions per chunk (default: auto)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run = Run("salt_kd_memory")
    logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
    stats = {}
    for kind in ("kd_naive", "kd_chunked", "salt_naive", "salt_chunked"):
        target = functools.partial(_prepare, kind, args.batch, args.length, args.vocab, args.chunk)
        stats[kind] = peak_memory_mib(target, repeats=args.repeats, threads=args.threads)
    peaks = {k: v["median"] for k, v in stats.items()}
    run.write({
        "setting": vars(args), "logits_mb": logits_mb, "peak_extra_mb": peaks, "peak_extra_mib_repeats": stats,
        "ratio_kd_chunked_over_naive": peaks["kd_chunked"] / peaks["kd_naive"],
        "ratio_salt_chunked_over_naive": peaks["salt_chunked"] / peaks["salt_naive"],
        "extra_over_gradient_mb": {k: v - logits_mb for k, v in peaks.items()},
    })

if __name__ == "__main__":
    main()
