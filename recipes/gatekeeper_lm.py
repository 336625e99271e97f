"""Gatekeeper for LMs: token-level confidence tuning of a cascade's small causal LM (Rabanser et al., 2025).

    python -m recipes.gatekeeper_lm                            # the pair of lm_pair preset=default (built once, cached)
    python -m recipes.gatekeeper_lm finetune.alphas=[0.3] finetune.steps=400
    python -m recipes.gatekeeper_lm preset=smoke                # seconds (tests)

Before any work the recipe loads the pair, builds the data, the test prompts, every fine-tuning module
(``finetune.module`` per α of ``finetune.alphas``, ``finetune.baseline_module``) and the cascades. Stages:

1. ``finetune/<variant>``: fine-tune a copy of the pair's small LM on the training corpus for ``finetune.steps``
   steps, with the token-level Gatekeeper loss for each α (``gatekeeper_a<α>``) and (the fair baseline,
   ``next_token``) with plain next-token cross-entropy, same steps, learning rate and data order. Validation
   also reports a token-level cascade (score = max next-token probability, quality = next-token correctness of
   the small vs the frozen large LM) through the shared deferral callback (``<stage>/deferral_<variant>_val.*``);
2. ``generate/large`` once, then ``generate/<variant>`` for every variant and the untouched small LM
   (``pretrained``): greedy next-line completions of the same test prompts (records memoised per stage);
3. ``evaluate/<variant>``: the sequence-level cascade of ``recipes.lm_cascade`` with that small LM, deferral by
   Chow-Sum / Chow-Average / Chow-Quantile(α);
4. ``variants.csv`` (variant x rule: small quality, AUC-DF, gain over random, s_d, AUROC) and ``metrics.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lit_cascades.callbacks import DeferralCurveLogger
from lit_cascades.lm_tasks import (
    REPORTED,
    build_task_datamodule,
    check_pair_section,
    check_task,
    evaluate_rules,
    generate_records,
    load_or_build_pair,
    next_line_loader,
    pair_name,
    plain,
    val_curve,
)
from lit_cascades.modules.lm_cascade import merge_records
from lit_cascades.runner import ConfigError, Run, build, build_list, main

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TOKEN_KEYS = ("small_quality", "large_quality", "auc_df", "s_d", "auroc")


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    ft, task = cfg.finetune, cfg.task
    check_pair_section(cfg.pair)
    check_task(task)
    for key in ("steps", "block_size", "batch_size", "val_batches"):
        if not isinstance(ft[key], int) or ft[key] < 1:
            raise ConfigError(f"expected an integer >= 1; got {ft[key]!r}", key=f"finetune.{key}")
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR)

    # -- build everything before any work ---------------------------------------------------------------
    dm = build_task_datamodule(cfg.data, pair, block_size=ft.block_size, batch_size=ft.batch_size)
    tok = dm.get_tokenizer()
    loader = next_line_loader(dm, task, "test", task.num_test, tok.pad_token_id)
    modules: dict[str, Any] = {}
    if ft.baseline:
        modules["next_token"] = build(ft.baseline_module, "finetune.baseline_module", model=copy.deepcopy(pair.small),
                                      large_model=pair.large)
    for alpha in ft.alphas:
        modules[f"gatekeeper_a{alpha:g}"] = build(ft.module, "finetune.module", model=copy.deepcopy(pair.small),
                                                  alpha=alpha, large_model=pair.large)

    def cascade(small: Any, roles: tuple[str, ...]) -> Any:
        return build(cfg.cascade, "cascade", small=small, large=pair.large, tokenizer=tok, embed_large=False,
                     roles=roles)

    large_cascade = cascade(pair.small, ("large",))
    quality = large_cascade.hparams.quality
    extra = build_list(cfg.callbacks, "callbacks")

    # -- 1. fine-tuning ---------------------------------------------------------------------------------
    variants: dict[str, Any] = {"pretrained": pair.small}
    token_level: dict[str, dict[str, float]] = {}
    for name, module in modules.items():
        st = r.stage(f"finetune/{name}", kind="finetune", config={"variant": name, "finetune": plain(ft)},
                     seed=int(cfg.seed))  # the same seed: same data order for every variant
        cb = DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=st.dir, tag=name)
        st.fit(module, dm, callbacks=[cb, *extra], max_steps=ft.steps, max_epochs=-1, val_check_interval=ft.steps,
               check_val_every_n_epoch=None, limit_val_batches=ft.val_batches)
        token_level[name] = {f"token_{k}": curve[-1][1] for k in TOKEN_KEYS
                             if (curve := val_curve(st.dir, f"val/defer/max_prob/{k}"))}
        st.finish(token_level[name])
        variants[name] = module.model.eval()

    # -- 2./3. generation and the sequence-level cascade ------------------------------------------------
    st = r.stage("generate/large", kind="generate", config={"role": "large", "task": plain(task)})
    large_records = st.cached("records", lambda: generate_records(large_cascade, loader, desc="generating (large)"))
    st.finish({"large_quality": float(large_records[f"large_{quality}"].mean())})
    large_only = {k: v for k, v in large_records.items() if k.startswith("large_")}
    results: dict[str, Any] = {"pair": pair_name(pair, cfg.pair), "finetune": {"steps": ft.steps, "lr": ft.module.lr},
                               "large_quality": float(large_records[f"large_{quality}"].mean())}
    rows = []
    for name, small in variants.items():
        small_cascade = cascade(small, ("small",))
        st = r.stage(f"generate/{name}", kind="generate", config={"role": "small", "variant": name,
                                                                  "task": plain(task)})
        small_records = st.cached("records", lambda c=small_cascade, n=name: generate_records(
            c, loader, desc=f"generating ({n})"))
        st.finish({"small_quality": float(small_records[f"small_{quality}"].mean())})
        records = merge_records(small_records, large_only)
        st = r.stage(f"evaluate/{name}", kind="evaluate", config={"variant": name, "eval": plain(cfg.eval)})
        reports = evaluate_rules(st, small_cascade, records, cfg.eval.rate, cfg.eval.ideal, name)
        q_small = float(records[f"small_{quality}"].mean())
        results[name] = {"small_quality": q_small, **token_level.get(name, {}),
                         "rules": {rule: {k: rep[k] for k in REPORTED} for rule, rep in reports.items()}}
        st.finish(results[name])
        rows += [[name, rule, q_small, *(rep[k] for k in REPORTED)] for rule, rep in reports.items()]
    r.save_table("variants", ["variant", "rule", "small_quality", *REPORTED], rows)
    return results


if __name__ == "__main__":
    main("gatekeeper_lm", run)
