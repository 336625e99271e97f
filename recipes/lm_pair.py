"""LM pair: a small and a large causal LM sharing one tokenizer, trained on one corpus and saved together.

    python -m recipes.lm_pair                      # stdlib corpus, BPE-4096, GPT-2 2x128 and 4x256, CPU minutes
    python -m recipes.lm_pair preset=smollm2       # SmolLM2-135M as the large LM, its first layers as the small
    python -m recipes.lm_pair preset=smoke         # seconds (tests)

1. load and split the corpus (file level); train a byte-level BPE tokenizer on the training split, or take a
   pretrained tokenizer (``tokenizer.pretrained``);
2. build each model from a GPT-2 config (or load ``<role>.init``, optionally keeping its first
   ``<role>.truncate_layers`` layers) and train it with next-token cross-entropy for ``<role>.steps`` steps;
3. report held-out loss/perplexity and save the pair with ``save_pretrained`` to ``<run>/pair`` and, when
   ``publish_dir`` is set (default ``runs/lm_pair/latest``), to that stable directory, which the other LM
   recipes (``lm_cascade``, ``gatekeeper_lm``, speculative cascades, SALT) read by default as ``pair.path``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lit_cascades.data.lm import LMCorpusDataModule
from lit_cascades.models.hf import load_causal_lm
from lit_cascades.models.lm_pair import (
    LMPair,
    build_causal_lm,
    check_same_vocab,
    gpt2_config,
    load_pair,
    save_pair,
    truncated_copy,
)
from lit_cascades.models.vision import count_parameters
from lit_cascades.modules.causal_lm import CausalLM
from lit_cascades.runner import Run, main, run_recipe

DEFAULT_PAIR_DIR = "runs/lm_pair/latest"


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when set: one thread is much faster for tiny models on a busy machine."""
    if threads:
        torch.set_num_threads(int(threads))


def corpus_datamodule(data: DictConfig | dict[str, Any], tokenizer: Any = None, **overrides: Any) -> LMCorpusDataModule:
    """The corpus DataModule from a ``data`` config section (shared by every LM recipe)."""
    kwargs = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    kwargs.update(overrides)
    return LMCorpusDataModule(tokenizer=tokenizer, **kwargs)


def build_model(spec: DictConfig, tokenizer: Any, n_positions: int):
    """A model for one role: from ``spec.init`` (optionally truncated) or a fresh GPT-2 config."""
    if spec.init:
        model = load_causal_lm(spec.init)
        if spec.truncate_layers:
            model = truncated_copy(model, int(spec.truncate_layers))
        return model
    config = gpt2_config(len(tokenizer), n_positions=n_positions, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **spec.arch)
    return build_causal_lm(config)


def publish(pair_dir: Path, target: str | Path) -> Path:
    """Copy a saved pair to ``target`` atomically (replacing an older pair there)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    shutil.rmtree(tmp)
    shutil.copytree(pair_dir, tmp)
    old = target.with_name(f".{target.name}-old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    set_threads(cfg.threads)
    dm = corpus_datamodule(cfg.data, tokenizer=cfg.tokenizer.pretrained, vocab_size=cfg.tokenizer.vocab_size)
    dm.setup()
    tok = dm.get_tokenizer()
    results: dict[str, Any] = {"data": {"source": cfg.data.source, **dm.corpus.meta,
                                        **{f"tokens_{k}": len(v) * cfg.data.block_size for k, v in dm.datasets.items()}},
                               "vocab_size": len(tok)}
    models = {}
    for role in ("small", "large"):
        spec = cfg[role]
        model = build_model(spec, tok, cfg.n_positions)
        module = CausalLM(model, lr=spec.lr, weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps)
        if spec.steps > 0:
            r.fit(role, module, dm, max_steps=spec.steps, max_epochs=-1, val_check_interval=cfg.eval.val_every,
                  limit_val_batches=cfg.eval.batches, check_val_every_n_epoch=None)
        logged = r.test(f"{role}_eval", module, dm, limit_test_batches=cfg.eval.batches)
        results[role] = {"params": count_parameters(model), "steps": spec.steps, "test_loss": logged["test/loss"],
                         "test_ppl": math.exp(logged["test/loss"]), "test_token_acc": logged["test/token_acc"]}
        models[role] = model.eval()
    check_same_vocab(models["small"], models["large"], tok, tok)
    meta = {"corpus": OmegaConf.to_container(cfg.data, resolve=True), "results": results,
            "recipe": "lm_pair", "preset": r.preset, "seed": cfg.seed}
    pair_dir = save_pair(LMPair(models["small"], models["large"], tok), r.dir / "pair", meta)
    results["pair_dir"] = str(pair_dir)
    if cfg.publish_dir:
        results["published_to"] = str(publish(pair_dir, cfg.publish_dir))
    return results


def load_or_build_pair(pair_cfg: DictConfig, r: Run | None = None) -> LMPair:
    """Load the pair a recipe's ``pair`` section names, building it with ``recipes.lm_pair`` if asked.

    ``pair.small``/``pair.large`` (hub ids or directories) win over ``pair.path``. When ``pair.path`` does not
    exist and ``pair.build_preset`` is set, ``python -m recipes.lm_pair preset=<build_preset>`` is run first
    (into ``<run>/lm_pair``, published to ``pair.path``).
    """
    if pair_cfg.get("small") or pair_cfg.get("large"):
        return load_pair(small=pair_cfg.small, large=pair_cfg.large, tokenizer=pair_cfg.get("tokenizer"))
    path = Path(pair_cfg.path) if pair_cfg.path else None
    if path is None or not (path / "pair.json").exists():
        preset = pair_cfg.get("build_preset")
        if not preset:
            where = f"'{path}'" if path else "pair.path=null"
            raise FileNotFoundError(f"no LM pair at {where}; run `python -m recipes.lm_pair` first, set "
                                    "pair.build_preset=<preset> to build it now, or pass pair.path=<dir>")
        out = (r.dir if r is not None else Path("runs")) / "lm_pair"
        args = [f"preset={preset}", f"output_dir={out}", "logger.wandb=false"]
        args.append(f"publish_dir={path}" if path else "publish_dir=null")
        print(f"[lm_pair] no pair at {path}; building one with recipes.lm_pair preset={preset}")
        _, metrics = run_recipe("lm_pair", run, args, config_dir=Path(__file__).parent / "configs")
        path = Path(metrics["published_to"] if path else metrics["pair_dir"])
    return load_pair(path)


if __name__ == "__main__":
    main("lm_pair", run)
