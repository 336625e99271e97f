"""LM cascade: deferral rules for a sequence-level cascade of two causal LMs (Gupta et al., ICLR 2024).

    python -m recipes.lm_cascade                               # the pair in runs/lm_pair/latest (built if absent)
    python -m recipes.lm_cascade pair.path=runs/lm_pair/smollm2
    python -m recipes.lm_cascade preset=gpt2                   # gpt2 -> gpt2-medium from the hub
    python -m recipes.lm_cascade preset=smoke                  # seconds (tests)

Task: next-line completion on held-out files of the pair's corpus. Both models greedily complete each prompt;
the per-example quality is exact match (``task.quality=token_f1`` for the softer score).

1. generate once with both models on ``task.num_train`` prompts from the val split (to train the post-hoc
   rules) and ``task.num_test`` prompts from the test split; the records (tokens, per-token log-probs,
   qualities, Embed-1/Embed-2 features) are cached in ``<run>/records_{train,test}.pt``;
2. train a :class:`PostHocDeferral` MLP per feature set (Post-Hoc-Quantile, -Embed-1, -Embed-1+2) on the
   golden deferral label, for each seed in ``post_hoc.seeds``;
3. score the test records with Chow-Sum, Chow-Average, Chow-Quantile(α) and every post-hoc rule, and compare
   them on deferral curves (AUC-DF, gain over random, s_d, ...): ``deferral_lm_cascade_test.{csv,png}``,
   ``rules.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import statistics
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lit_cascades.callbacks import DeferralCurveLogger
from lit_cascades.data.lm import collate_prompts, ensure_pad_token
from lit_cascades.modules.lm_cascade import (
    LMCascade,
    PostHocDeferral,
    RecordsDataset,
    concat_records,
    post_hoc_dataset,
)
from lit_cascades.runner import Run, main
from recipes.lm_pair import corpus_datamodule, load_or_build_pair, set_threads

REPORTED = ("auc_df", "auc_gain", "s_d", "auroc", "quality_at_rate")


def task_datamodule(cfg: DictConfig, pair, **overrides: Any) -> Any:
    """The corpus of the pair (from its ``pair.json`` unless ``cfg.data`` is given) with its tokenizer."""
    data = cfg.data if cfg.data is not None else pair.meta.get("corpus")
    if data is None:
        raise ValueError("this pair has no recorded corpus (a hub pair?): set data.source=stdlib (or another source)")
    return corpus_datamodule(data, tokenizer=ensure_pad_token(pair.tokenizer), **overrides)


def generate_records(r: Run, cascade: LMCascade, dm, split: str, num_examples: int, task: DictConfig,
                     name: str) -> dict[str, Any]:
    """Records of ``num_examples`` prompts of ``split`` (cached as ``<run>/records_<name>.pt``)."""
    path = r.dir / f"records_{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    ds = dm.next_line_dataset(split, num_examples=num_examples, context_tokens=task.context_tokens,
                              max_target_tokens=task.max_new_tokens, min_context_lines=task.min_context_lines,
                              seed=task.seed)
    loader = DataLoader(ds, batch_size=task.batch_size, shuffle=False,
                        collate_fn=collate_prompts(cascade.pad_token_id))
    trainer = r.trainer("generate", checkpoint=False, logger=False, enable_progress_bar=False)
    records = concat_records(trainer.predict(cascade, dataloaders=loader))
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(records, tmp)
    tmp.replace(path)
    return records


def train_post_hoc(r: Run, cfg: DictConfig, records: dict[str, Any], features: str, seed: int) -> PostHocDeferral:
    """Fit one post-hoc rule on the training records (a held-out part monitors it through the callback)."""
    ph = cfg.post_hoc
    L.seed_everything(seed, verbose=False)
    data = post_hoc_dataset(records, features, ph.alphas, cfg.task.quality)
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(ph.val_fraction * n)
    train_idx, val_idx = perm[n_val:], perm[:n_val]
    train = torch.utils.data.Subset(data, train_idx.tolist())
    rule = PostHocDeferral(data.records["features"].shape[1], features=features, alphas=list(ph.alphas),
                           hidden=ph.hidden, num_layers=ph.num_layers, dropout=ph.dropout, lr=ph.lr,
                           weight_decay=ph.weight_decay, label=ph.label)
    rule.fit_normalizer(data.records["features"][train_idx])
    stage = f"post_hoc_{features.replace('+', '_')}_seed{seed}"
    val_loader = None
    callbacks = []
    if n_val > 0:
        val_loader = DataLoader(torch.utils.data.Subset(data, val_idx.tolist()), batch_size=1024)
        callbacks = [DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=r.dir / "post_hoc",
                                         tag=stage)]
    trainer = r.trainer(stage, callbacks=callbacks, checkpoint=False, max_epochs=ph.epochs,
                        limit_val_batches=1.0 if n_val > 0 else 0, check_val_every_n_epoch=ph.epochs)
    trainer.fit(rule, DataLoader(train, batch_size=ph.batch_size, shuffle=True), val_loader)
    return rule.eval()


def rule_rows(reports: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The per-rule table: AUC-DF, relative gain over random, s_d, AUROC, quality at the fixed rate."""
    rows = [[name, *(rep.scalars[k] for k in REPORTED)] for name, rep in reports.items()]
    return ["rule", *REPORTED], rows


def evaluate_rules(r: Run, cfg: DictConfig, cascade: LMCascade, records: dict[str, Any], tag: str) -> dict[str, Any]:
    """Deferral reports of every rule of ``cascade`` on ``records`` (curves written by the shared callback)."""
    cb = DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=r.dir, tag=tag)
    trainer = r.trainer(tag, callbacks=[cb], checkpoint=False, enable_progress_bar=False)
    trainer.test(cascade, dataloaders=DataLoader(RecordsDataset(records), batch_size=1024), verbose=False)
    return cb.reports["test"]


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    set_threads(cfg.threads)
    pair = load_or_build_pair(cfg.pair, r)
    dm = task_datamodule(cfg, pair)
    task = cfg.task
    cascade = LMCascade(pair.small, pair.large, pair.tokenizer, max_new_tokens=task.max_new_tokens,
                        quality=task.quality, chow_alphas=list(cfg.chow_alphas), large_layer=cfg.post_hoc.large_layer,
                        embed_large="embed1+2" in cfg.post_hoc.feature_sets, include_stop=task.include_stop)
    records = {"train": generate_records(r, cascade, dm, "val", task.num_train, task, "train"),
               "test": generate_records(r, cascade, dm, "test", task.num_test, task, "test")}

    post_hoc_runs: dict[str, list[str]] = {}
    for features in cfg.post_hoc.feature_sets if cfg.post_hoc.enabled else []:
        for seed in cfg.post_hoc.seeds:
            name = f"post_hoc_{features}_seed{seed}"
            cascade.add_post_hoc(name, train_post_hoc(r, cfg, records["train"], features, seed))
            post_hoc_runs.setdefault(features, []).append(name)
    reports = evaluate_rules(r, cfg, cascade, records["test"], "lm_cascade")
    r.save_table("rules", *rule_rows(reports))

    q = task.quality
    test = records["test"]
    results: dict[str, Any] = {
        "task": {"quality": q, "n_train": len(records["train"]["target"]), "n_test": len(test["target"]),
                 "small_quality": float(test[f"small_{q}"].mean()), "large_quality": float(test[f"large_{q}"].mean()),
                 "small_token_f1": float(test["small_token_f1"].mean()),
                 "large_token_f1": float(test["large_token_f1"].mean()),
                 "small_mean_len": float(test["small_mask"].sum(-1).float().mean()),
                 "large_better_rate": float((test[f"large_{q}"] > test[f"small_{q}"]).float().mean())},
        "pair": pair.path or f"{cfg.pair.small} -> {cfg.pair.large}",
        "rules": {name: {k: rep.scalars[k] for k in (*REPORTED, "auc_random", "auc_ideal")}
                  for name, rep in reports.items()},
    }
    for features, names in post_hoc_runs.items():  # mean and spread over post-hoc training seeds
        summary = {}
        for k in REPORTED:
            values = [reports[n].scalars[k] for n in names]
            summary[k] = statistics.mean(values)
            summary[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        results["rules"][f"post_hoc_{features}"] = {**summary, "seeds": list(cfg.post_hoc.seeds)}
    return results


if __name__ == "__main__":
    main("lm_cascade", run)
