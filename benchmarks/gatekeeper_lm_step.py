"""Token-level Gatekeeper training step vs plain next-token step on the same model and batch.

One step = forward, loss, backward and AdamW update of a GPT-2-config causal LM (default: the small model of
the default LM pair, 2 layers, 128-d, vocabulary 4096) on a ``[batch, block]`` batch. The two losses are timed
interleaved, in alternating order (median of ``--steps`` steps each, after warm-up), so machine load affects
both alike. Target:
ratio <= 1.05. Writes benchmarks/results/gatekeeper_lm_step.json.

    python -m benchmarks.gatekeeper_lm_step [--batch 16] [--block 128] [--vocab 4096] [--layers 2] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules.causal_lm import CausalLM, GatekeeperLM, shifted_logits_and_labels


def step_time(module, opt, batch) -> float:
    t0 = time.perf_counter()
    logits, labels = shifted_logits_and_labels(module.model, batch)
    loss, _ = module.compute_loss(logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_causal_lm(gpt2_config(args.vocab, n_layer=args.layers, n_embd=args.dim, n_head=4,
                                        n_positions=max(256, args.block)))
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.block))}
    modules = {"next_token": CausalLM(model), "gatekeeper": GatekeeperLM(model, alpha=0.5)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {k: [] for k in modules}
    names = list(modules)
    for i in range(args.warmup + args.steps):
        for name in names if i % 2 == 0 else names[::-1]:  # alternate the order: no first-mover bias
            module = modules[name]
            t = step_time(module, opt, batch)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["gatekeeper"] / med["next_token"]
    result = {"config": vars(args), "median_s": med, "ratio_gatekeeper_over_next_token": ratio, "target": 1.05,
              "torch_threads": torch.get_num_threads()}
    print(f"next-token step {med['next_token'] * 1e3:.1f} ms, Gatekeeper step {med['gatekeeper'] * 1e3:.1f} ms, "
          f"ratio {ratio:.3f} (target <= 1.05)")
    out = Path(__file__).parent / "results" / "gatekeeper_lm_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
