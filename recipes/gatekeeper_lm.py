"""Gatekeeper for LMs: token-level confidence tuning of a cascade's small causal LM (Rabanser et al., 2025).

    python -m recipes.gatekeeper_lm                            # the pair in runs/lm_pair/latest (built if absent)
    python -m recipes.gatekeeper_lm finetune.alphas=[0.3] finetune.steps=400
    python -m recipes.gatekeeper_lm preset=smoke                # seconds (tests)

1. fine-tune copies of the pair's small LM on the training corpus for ``finetune.steps`` steps: with the
   token-level Gatekeeper loss for each α in ``finetune.alphas``, and (the fair baseline) with plain next-token
   cross-entropy for the same steps, learning rate and data order. During validation each variant also
   reports a token-level cascade (score = max next-token probability, quality = next-token correctness of the
   small vs the frozen large LM) through the shared deferral callback;
2. evaluate every variant (and the untouched small LM) as the first stage of the sequence-level cascade of
   ``recipes.lm_cascade``: greedy next-line completions on the same test prompts, the large LM's completions
   generated once, deferral by Chow-Sum / Chow-Average / Chow-Quantile(α);
3. write ``variants.csv`` (variant x rule: small quality, AUC-DF, gain over random, s_d, AUROC),
   ``deferral_<variant>_test.{csv,png}`` and ``metrics.json``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
from omegaconf import DictConfig

from lit_cascades.callbacks import DeferralCurveLogger
from lit_cascades.modules.causal_lm import CausalLM, GatekeeperLM
from lit_cascades.modules.lm_cascade import LMCascade, merge_records
from lit_cascades.runner import Run, main
from recipes.lm_cascade import REPORTED, evaluate_rules, generate_records, task_datamodule
from recipes.lm_pair import load_or_build_pair, set_threads


def finetune(r: Run, cfg: DictConfig, stage: str, module: CausalLM, dm) -> dict[str, float]:
    """Train ``module`` for ``finetune.steps`` steps; returns its final validation scalars."""
    ft = cfg.finetune
    cb = DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=r.dir / "token_level", tag=stage)
    r.fit(stage, module, dm, callbacks=[cb], max_steps=ft.steps, max_epochs=-1, val_check_interval=ft.steps,
          check_val_every_n_epoch=None, limit_val_batches=ft.val_batches)
    out = {}
    rep = cb.reports.get("val", {}).get("max_prob")
    if rep is not None:
        out = {f"token_{k}": rep.scalars[k] for k in ("small_quality", "large_quality", "auc_df", "s_d", "auroc")}
    return out


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    set_threads(cfg.threads)
    pair = load_or_build_pair(cfg.pair, r)
    dm = task_datamodule(cfg, pair, block_size=cfg.finetune.block_size, batch_size=cfg.finetune.batch_size)
    dm.setup()
    ft, task = cfg.finetune, cfg.task

    variants: dict[str, Any] = {"pretrained": pair.small}
    token_level: dict[str, dict[str, float]] = {}
    stages: dict[str, CausalLM] = {}
    if ft.baseline:
        stages["next_token"] = CausalLM(copy.deepcopy(pair.small), lr=ft.lr, warmup_steps=ft.warmup_steps,
                                        large_model=pair.large)
    for alpha in ft.alphas:
        stages[f"gatekeeper_a{alpha:g}"] = GatekeeperLM(
            copy.deepcopy(pair.small), alpha=alpha, normalize=ft.normalize, lr=ft.lr, warmup_steps=ft.warmup_steps,
            large_model=pair.large)
    for stage, module in stages.items():
        L.seed_everything(cfg.seed, verbose=False)  # same initial state and data order for every variant
        token_level[stage] = finetune(r, cfg, stage, module, dm)
        variants[stage] = module.model.eval()

    def cascade(small, roles):
        return LMCascade(small, pair.large, pair.tokenizer, max_new_tokens=task.max_new_tokens, quality=task.quality,
                         chow_alphas=list(cfg.chow_alphas), embed_large=False, include_stop=task.include_stop,
                         roles=roles)

    large_records = generate_records(r, cascade(pair.small, ("large",)), dm, "test", task.num_test, task, "test_large")
    results: dict[str, Any] = {"pair": pair.path, "finetune": {"steps": ft.steps, "lr": ft.lr},
                               "large_quality": float(large_records[f"large_{task.quality}"].mean())}
    rows = []
    for name, small in variants.items():
        small_records = generate_records(r, cascade(small, ("small",)), dm, "test", task.num_test, task,
                                         f"test_small_{name}")
        records = merge_records(small_records, {k: v for k, v in large_records.items() if k.startswith("large_")})
        reports = evaluate_rules(r, cfg, cascade(small, ("small",)), records, name)
        q_small = float(records[f"small_{task.quality}"].mean())
        results[name] = {"small_quality": q_small, **token_level.get(name, {}),
                         "rules": {rule: {k: rep.scalars[k] for k in REPORTED} for rule, rep in reports.items()}}
        rows += [[name, rule, q_small, *(rep.scalars[k] for k in REPORTED)] for rule, rep in reports.items()]
    r.save_table("variants", ["variant", "rule", "small_quality", *REPORTED], rows)
    return results


if __name__ == "__main__":
    main("gatekeeper_lm", run)
