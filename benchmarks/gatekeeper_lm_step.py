"""Token-level Gatekeeper training step / plain next-token training step, same causal LM and batch.

    python -m benchmarks.gatekeeper_lm_step [--threads 1]

Target: ratio <= 1.05. One step = forward, loss, backward and AdamW update of a GPT-2-config causal LM on a
``[16, 128]`` batch, through the modules' own ``compute_loss`` (``CausalLM`` vs ``GatekeeperLM``). Two settings:
the small LM of the default pair (1 layer, 128-d, vocabulary 4096: the loss over the vocabulary is a large part
of the step, the worst case) and its large LM (4 layers, 256-d). The Gatekeeper step runs twice: through the
library's default dispatch (the C++ kernel once built: this script builds it first, and records the reason where it
cannot) and with the fused torch path forced (what runs without a build). The steps alternate
(``benchmarks._common.interleaved_ratios``, 30 alternations after warm-up, each timing a block of ``--inner`` 3
steps: single steps vary by ±20% on a quiet machine, and 10 one-step alternations moved the median by several
percent between runs); the median per-alternation ratio to the next-token step is reported with its min-max. Writes
docs/results/benchmarks/gatekeeper_lm_step.json.
"""

from __future__ import annotations

import torch

import lit_cascades.functional.gatekeeper as gk_impl
from benchmarks._common import Run, interleaved_ratios, target_row
from benchmarks.gatekeeper_step import loss_path, native_kernel
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules.causal_lm import CausalLM, GatekeeperLM, shifted_logits_and_labels


def make_step(module: CausalLM, batch: dict[str, torch.Tensor], path: str = "default"):
    """One training step (forward, the module's loss, backward, AdamW), the Gatekeeper loss through ``path``
    (``benchmarks.gatekeeper_step.loss_path``)."""
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-4)

    def step() -> None:
        logits, labels = shifted_logits_and_labels(module.model, batch)
        with loss_path(path):
            loss, _ = module.compute_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--alternations", type=int, default=30)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("gatekeeper_lm_step")
    settings = {"small_1x128": (1, 128), "large_4x256": (4, 256)}
    batch = {"input_ids": torch.randint(0, args.vocab, (16, 128), generator=torch.Generator().manual_seed(0))}
    _, why_not = native_kernel()  # built before timing starts (about 40 s the first time on a machine)
    default = "C++ kernel" if gk_impl.cpu_kernel() is not None else f"fused torch path: {why_not}"
    results, targets = {}, []
    for name, (layers, dim) in settings.items():
        torch.manual_seed(0)
        model = build_causal_lm(gpt2_config(args.vocab, n_layer=layers, n_embd=dim, n_head=4))
        gk = GatekeeperLM(model, alpha=0.5)
        out = interleaved_ratios({"ntp": make_step(CausalLM(model), batch), "gk": make_step(gk, batch),
                                  "gk_torch": make_step(gk, batch, "torch")},
                                 baseline="ntp", alternations=args.alternations, warmup=2, inner=args.inner)
        results[name] = out
        targets.append(target_row(f"Gatekeeper-LM step / next-token step, {name}", 1.05, out["ratios"]["gk"]))
        targets.append(target_row(f"Gatekeeper-LM step / next-token step, {name}, fused torch path (no kernel build)",
                                  1.05, out["ratios"]["gk_torch"]))
    run.write({"batch": [16, 128], "vocab": args.vocab, "torch_threads": args.threads, "inner": args.inner,
               "default_loss_path": default, "results": results},
              targets)

if __name__ == "__main__":
    main()
