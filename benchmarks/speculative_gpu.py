"""GPU benchmark of speculative decoding with a SmolLM2-135M verifier (< 10 minutes on one GPU; no test needs it).

    python -m benchmarks.speculative_gpu --verifier /path/to/SmolLM2-135M-Instruct [--drafter layers:4 | PATH]
    python -m benchmarks.speculative_gpu --verifier PATH --device cpu --prompts 4 --alternations 2   # smoke run

The verifier is a directory written by ``save_pretrained`` (or a hub id already in the local cache: the machine
needs no network). The drafter is another directory sharing the tokenizer, or ``layers:N``, the verifier's first
``N`` layers (``lit_cascades.models.lm_pair.truncated_copy``; a weak drafter, kept for comparability with the
CPU results). Prompts: the first ``--context-tokens`` tokens of ``--prompts`` files of Python's standard library
(the LM pair's corpus), no stop token, ``--max-new-tokens`` tokens each (greedy).

Measured, every ratio from interleaved runs (``benchmarks._common.interleaved_ratios``), after checking that
``spec_decode`` emits the verifier's greedy tokens:

* batch ``--batch`` (default 16): large-only (HF ``generate``), ``spec_decode``, ``token_v1`` and ``token_v3`` at
  ``--alphas`` (γ = ``--gamma``); wall time relative to large-only, verifier calls per token, acceptance;
* batch 1 (``--hf-prompts`` prompts): ``spec_decode`` vs HF assisted generation with the same constant γ.

The run stops adding alternations once ``--budget-s`` seconds have passed (default 480), so it fits a 10-minute
slot. Raw output: ``docs/results/benchmarks/speculative_gpu.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import Run, target_row
from lit_cascades.models.lm_pair import truncated_copy
from lit_cascades.models.speculative import hf_constant_drafting, speculative_generate

NAME = "speculative_gpu"


def stdlib_prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    """``n`` prompts: the first ``tokens`` tokens of stdlib files (sorted paths, files with enough text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        ids = tokenizer(path.read_text(errors="ignore"))["input_ids"]
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == n:
            break
    return out


def load_models(verifier_path: str, drafter_spec: str, device: str, dtype: torch.dtype, tokenizer: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verifier = AutoModelForCausalLM.from_pretrained(verifier_path, dtype=dtype).to(device).eval()
    if drafter_spec.startswith("layers:"):
        drafter = truncated_copy(verifier, int(drafter_spec.split(":", 1)[1])).to(device, dtype).eval()
    else:
        drafter = AutoModelForCausalLM.from_pretrained(drafter_spec, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer or verifier_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return drafter, verifier, tok


def timed_rounds(fns: dict[str, Any], deadline: float, max_rounds: int, sync) -> dict[str, list[float]]:
    """Interleaved timing (order reversed every other round) until ``max_rounds`` or the deadline; one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(max_rounds):
        if i >= 3 and time.perf_counter() > deadline:
            break
        for name in (list(fns) if i % 2 == 0 else list(reversed(fns))):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, ts in times.items():
        per = [t / b for t, b in zip(ts, times[baseline])]
        out[name] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--drafter", default="layers:4")
    parser.add_argument("--tokenizer", default=None, help="default: the verifier's directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hf-prompts", type=int, default=8)
    parser.add_argument("--context-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--alphas", default="0.1,0.3")
    parser.add_argument("--alternations", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget_s
    dtype = getattr(torch, args.dtype) if args.device != "cpu" else torch.float32
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    run = Run(NAME, note=f"device {args.device}, {args.dtype}")
    drafter, verifier, tok = load_models(args.verifier, args.drafter, args.device, dtype, args.tokenizer)
    pad, m = int(tok.pad_token_id), args.max_new_tokens
    prompts = torch.tensor(stdlib_prompts(tok, args.prompts, args.context_tokens), device=args.device)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]

    def large() -> Any:
        return [verifier.generate(b, attention_mask=torch.ones_like(b), do_sample=False, max_new_tokens=m,
                                  min_new_tokens=m, pad_token_id=pad, eos_token_id=None) for b in batches]

    def spec(rule: str, alpha: float | None):
        def fn() -> Any:
            return [speculative_generate(drafter, verifier, b, torch.ones_like(b), m, rule=rule, alpha=alpha,
                                         gamma=args.gamma, stop_counts=[], pad_token_id=pad) for b in batches]
        return fn

    ref = large()
    outs = spec("spec_decode", None)()
    for r, o in zip(ref, outs):
        if r[:, prompts.shape[1]:].tolist() != o.tokens.tolist():
            raise AssertionError("spec_decode differs from the verifier's greedy decoding")
    methods = {"large_only": large, "spec_decode": spec("spec_decode", None)}
    for a in [float(x) for x in args.alphas.split(",") if x]:
        methods[f"token_v1_{a:g}"] = spec("token_v1", a)
        methods[f"token_v3_{a:g}"] = spec("token_v3", a)
    stats = {}
    for name, fn in methods.items():
        if name == "large_only":
            continue
        o = fn()
        tokens = sum(int(x.num_tokens.sum()) for x in o)
        stats[name] = {"verifier_calls_per_token": sum(int(x.verifier_calls.sum()) for x in o) / tokens,
                       "acceptance_rate": sum(int(x.accepted.sum()) for x in o) / max(sum(int(x.drafted.sum())
                                                                                         for x in o), 1)}
    half = start + (deadline - start) * 0.7
    times = timed_rounds(methods, half, args.alternations, sync)
    batch_ratios = ratios(times, "large_only")

    hf_prompts = [prompts[i:i + 1] for i in range(min(args.hf_prompts, len(prompts)))]
    kw = dict(do_sample=False, max_new_tokens=m, min_new_tokens=m, pad_token_id=pad, eos_token_id=None)

    def ours() -> None:
        for p in hf_prompts:
            speculative_generate(drafter, verifier, p, torch.ones_like(p), m, gamma=args.gamma, stop_counts=[])

    def hf() -> None:
        with hf_constant_drafting(drafter, args.gamma):
            for p in hf_prompts:
                verifier.generate(p, attention_mask=torch.ones_like(p), assistant_model=drafter, **kw)

    hf_times = timed_rounds({"hf_assisted": hf, "spec_decode": ours}, deadline, args.alternations, sync)
    hf_ratio = ratios(hf_times, "hf_assisted")["spec_decode"]
    results = {"verifier": args.verifier, "drafter": args.drafter, "device": args.device, "dtype": args.dtype,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "prompts": len(prompts), "batch": args.batch, "max_new_tokens": m, "gamma": args.gamma,
               "batch_times": times, "batch_ratios_over_large_only": batch_ratios, "decoding": stats,
               "hf_times": hf_times, "spec_decode_over_hf_assisted_batch1": hf_ratio}
    run.write({"results": results},
              [target_row(f"spec_decode / HF assisted generation, batch 1, {args.device}", 1.0, hf_ratio)])
    for name, r in batch_ratios.items():
        print(f"{name:>16}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) x large-only  {stats.get(name, {})}")
    print(f"spec_decode / HF assisted (batch 1): {hf_ratio['median']:.3f} ({hf_ratio['min']:.3f}-{hf_ratio['max']:.3f})"
          f"; total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
