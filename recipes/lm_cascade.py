"""LM cascade: deferral rules for a sequence-level cascade of two causal LMs (Gupta et al., ICLR 2024).

    python -m recipes.lm_cascade                               # the pair of lm_pair preset=default (built once, cached)
    python -m recipes.lm_cascade pair.path=runs/lm_pair/<run>/pair
    python -m recipes.lm_cascade preset=gpt2                   # gpt2 -> gpt2-medium from the hub
    python -m recipes.lm_cascade preset=smoke                  # seconds (tests)
    python -m recipes.lm_cascade cascade._target_=my_pkg.MyCascade   # a subclass with another rule

Task: next-line completion on held-out files of the pair's corpus. Both models greedily complete each prompt;
the per-example quality is ``cascade.quality`` (exact match, or ``token_f1`` for the softer score).

Before any work the recipe loads the pair, builds the data, the prompts, the cascade (``cascade``) and every
post-hoc rule (``post_hoc.module`` per feature set and seed), so a bad value stops it within seconds. Stages:

1. ``generate/train`` and ``generate/test``: both models complete ``task.num_train`` prompts of the val split
   (training data of the post-hoc rules) and ``task.num_test`` prompts of the test split; the records (tokens,
   per-token log-probs, qualities, Embed-1/Embed-2 features) are memoised in ``<stage>/records.pt``;
2. ``post_hoc/<features>_seed<s>``: fit a :class:`PostHocDeferral` MLP on the golden deferral label (a held-out
   ``post_hoc.val_fraction`` of the records monitors it through the deferral callback);
3. ``evaluate``: score the test records with Chow-Sum, Chow-Average, Chow-Quantile(α) and every post-hoc rule
   and compare them on deferral curves (AUC-DF, gain over random, s_d, ...):
   ``evaluate/deferral_lm_cascade_test.{csv,png}``, ``rules.csv`` and ``metrics.json`` in the run directory.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

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
)
from lit_cascades.modules.lm_cascade import post_hoc_dataset, post_hoc_in_features
from lit_cascades.runner import ConfigError, Run, build, build_list, main

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def check_post_hoc(ph: DictConfig) -> None:
    from lit_cascades.modules.lm_cascade import FEATURE_SETS

    bad = [f for f in ph.feature_sets if f not in FEATURE_SETS]
    if bad:
        raise ConfigError(f"unknown feature set(s) {bad}; choose from {list(FEATURE_SETS)}", key="post_hoc.feature_sets")
    if not 0.0 <= ph.val_fraction < 1.0:
        raise ConfigError(f"expected a value in [0, 1); got {ph.val_fraction}", key="post_hoc.val_fraction")
    for key in ("epochs", "batch_size"):
        if not isinstance(ph[key], int) or ph[key] < 1:
            raise ConfigError(f"expected an integer >= 1; got {ph[key]!r}", key=f"post_hoc.{key}")
    if ph.enabled and not ph.seeds:
        raise ConfigError("expected at least one seed", key="post_hoc.seeds")


def post_hoc_data(records: dict[str, Any], features: str, alphas: list[float], quality: str, val_fraction: float,
                  batch_size: int, seed: int) -> tuple[dict[str, DataLoader | None], torch.Tensor, bool]:
    """Train/held-out split of the post-hoc examples (seeded); returns ``(loaders, train features, has_val)``
    with ``loaders = {"train_dataloaders": ..., "val_dataloaders": ... | None}`` (picklable, for ddp_spawn)."""
    data = post_hoc_dataset(records, features, alphas, quality)
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * n)
    train_idx, val_idx = perm[n_val:], perm[:n_val]
    train = torch.utils.data.Subset(data, train_idx.tolist())
    val = torch.utils.data.Subset(data, val_idx.tolist()) if n_val > 0 else None
    loaders = {"train_dataloaders": DataLoader(train, batch_size=batch_size, shuffle=True),
               "val_dataloaders": DataLoader(val, batch_size=batch_size) if val is not None else None}
    return loaders, data.records["features"][train_idx], n_val > 0


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    task, ph = cfg.task, cfg.post_hoc
    check_pair_section(cfg.pair)
    check_task(task, counts=("num_train", "num_test"))
    check_post_hoc(ph)
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR)

    # -- build everything before any work ---------------------------------------------------------------
    dm = build_task_datamodule(cfg.data, pair)
    tok = dm.get_tokenizer()
    loaders = {"train": next_line_loader(dm, task, "val", task.num_train, tok.pad_token_id),
               "test": next_line_loader(dm, task, "test", task.num_test, tok.pad_token_id)}
    cascade = build(cfg.cascade, "cascade", small=pair.small, large=pair.large, tokenizer=tok,
                    embed_large=ph.enabled and "embed1+2" in ph.feature_sets)
    quality = cascade.hparams.quality
    alphas = list(plain(ph.module).get("alphas", []))
    rules: dict[tuple[str, int], Any] = {}
    for features in ph.feature_sets if ph.enabled else []:
        width = post_hoc_in_features(features, alphas, pair.small, pair.large)
        for seed in ph.seeds:
            rules[(features, seed)] = build(ph.module, "post_hoc.module", in_features=width, features=features)
    extra = build_list(cfg.callbacks, "callbacks")

    # -- 1. generation (memoised per run) ---------------------------------------------------------------
    records = {}
    for name, split in (("train", "val"), ("test", "test")):
        n = task.num_train if name == "train" else task.num_test
        st = r.stage(f"generate/{name}", kind="generate", config={"split": split, "num_examples": n,
                                                                  "task": plain(task), "cascade": plain(cfg.cascade)})
        records[name] = st.cached("records", lambda name=name: generate_records(
            cascade, loaders[name], desc=f"generating ({name})"))
        st.finish({"n": len(records[name]["target"]),
                   "small_quality": float(records[name][f"small_{quality}"].mean()),
                   "large_quality": float(records[name][f"large_{quality}"].mean())})

    # -- 2. post-hoc rules ------------------------------------------------------------------------------
    post_hoc_runs: dict[str, list[str]] = {}
    for (features, seed), rule in rules.items():
        name = f"post_hoc_{features}_seed{seed}"
        st = r.stage(f"post_hoc/{features.replace('+', '_')}_seed{seed}", kind="post_hoc",
                     config={"features": features, "seed": seed, "post_hoc": plain(ph)}, seed=seed)
        data, train_features, has_val = post_hoc_data(records["train"], features, alphas, quality,
                                                      ph.val_fraction, ph.batch_size, seed)
        rule.fit_normalizer(train_features)
        callbacks = [*extra]
        if has_val:
            callbacks.append(DeferralCurveLogger(rate=cfg.eval.rate, ideal=cfg.eval.ideal, output_dir=st.dir,
                                                 tag=name))
        st.fit(rule, callbacks=callbacks, **data, max_epochs=ph.epochs, limit_val_batches=1.0 if has_val else 0,
               check_val_every_n_epoch=ph.epochs)
        st.finish({})
        cascade.add_post_hoc(name, rule.eval())
        post_hoc_runs.setdefault(features, []).append(name)

    # -- 3. every rule on the test records --------------------------------------------------------------
    st = r.stage("evaluate", kind="evaluate", config={"eval": plain(cfg.eval), "rules": list(post_hoc_runs)})
    reports = evaluate_rules(st, cascade, records["test"], cfg.eval.rate, cfg.eval.ideal, "lm_cascade")
    r.save_table("rules", ["rule", *REPORTED], [[n, *(rep[k] for k in REPORTED)] for n, rep in reports.items()])

    test = records["test"]
    q = quality
    results: dict[str, Any] = {
        "task": {"quality": q, "n_train": len(records["train"]["target"]), "n_test": len(test["target"]),
                 "small_quality": float(test[f"small_{q}"].mean()), "large_quality": float(test[f"large_{q}"].mean()),
                 "small_token_f1": float(test["small_token_f1"].mean()),
                 "large_token_f1": float(test["large_token_f1"].mean()),
                 "small_mean_len": float(test["small_mask"].sum(-1).float().mean()),
                 "large_better_rate": float((test[f"large_{q}"] > test[f"small_{q}"]).float().mean())},
        "pair": pair_name(pair, cfg.pair),
        "rules": {name: {k: rep[k] for k in (*REPORTED, "auc_random", "auc_ideal") if k in rep}
                  for name, rep in reports.items()},
    }
    st.finish(results["rules"])
    for features, names in post_hoc_runs.items():  # mean and spread over post-hoc training seeds
        summary = {}
        for k in REPORTED:
            values = [reports[n][k] for n in names]
            summary[k] = statistics.mean(values)
            summary[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        results["rules"][f"post_hoc_{features}"] = {**summary, "seeds": list(ph.seeds)}
    return results


if __name__ == "__main__":
    main("lm_cascade", run)
