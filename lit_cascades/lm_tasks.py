"""What the LM recipes share: the pair they consume, the next-line task, generation records and their rules.

Every LM recipe (``lm_pair``, ``lm_cascade``, ``gatekeeper_lm``, ``speculative_cascade``, ``salt``) and the
speculative benchmark use these pieces, so that no recipe imports another:

* **The pair** (:func:`load_or_build_pair`): ``pair.small``/``pair.large`` (hub ids or directories), else
  ``pair.path`` (a directory written by :func:`~lit_cascades.models.lm_pair.save_pair`), else, with
  ``pair.build_preset`` set, a pair trained by :func:`train_pair` (the ``lm_pair`` recipe) with that preset.
  A built pair is a cross-run cache: it lives in ``lit_cascades.io.cache_dir("lm_pair", <its config>)``, so
  every run that asks for the same preset reuses it and a changed ``lm_pair`` config builds a new one.
* **The task data** (:func:`build_task_datamodule`): the corpus section of the recipe (``data``) or, when it is
  ``null``, the corpus recorded in the pair, built with the pair's tokenizer.
* **Generation** (:func:`generate_records`, :func:`plain_decode`): loops over prompt batches with a progress
  bar, returning *records* (dicts of tensors and lists of strings) that a stage memoises with
  ``stage.cached(...)``.
* **Rule comparison** (:func:`evaluate_rules`): a test stage of an :class:`~lit_cascades.modules.lm_cascade.
  LMCascade` over records with the shared :class:`~lit_cascades.callbacks.DeferralCurveLogger`; the per-rule
  scalars come back from the logged ``test/defer/<rule>/<scalar>`` metrics (so they survive ``ddp_spawn``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from lit_cascades import io
from lit_cascades._progress import progress_bar
from lit_cascades.data.lm import collate_prompts, ensure_pad_token, newline_counts, next_line
from lit_cascades.functional.sequence_scores import sequence_scores
from lit_cascades.functional.text import QUALITY_FUNCTIONS, text_quality
from lit_cascades.models.generation import generate_batches
from lit_cascades.models.lm_pair import LMPair, check_same_vocab, load_pair, model_vocab_size, save_pair
from lit_cascades.modules.lm_cascade import concat_records
from lit_cascades.runner.config import ConfigError, build, build_list, config_errors, load_config

#: the deferral-curve scalars every LM recipe reports per rule
REPORTED: tuple[str, ...] = ("auc_df", "auc_gain", "s_d", "auroc", "quality_at_rate")
TASK_SPLITS: tuple[str, ...] = ("val", "test")
#: corpus keys of a pair's recorded ``corpus`` that a consumer's tokenizer replaces
_TOKENIZER_KEYS = ("_target_", "tokenizer", "vocab_size")
DEFAULT_DATAMODULE = "lit_cascades.data.lm.LMCorpusDataModule"


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when set: one thread is much faster for tiny models on a busy machine."""
    if threads:
        torch.set_num_threads(int(threads))


def plain(node: Any) -> Any:
    """A config node as plain Python containers (``None`` stays ``None``)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


# --------------------------------------------------------------------------------------------------------
# checks of the plain (non-constructor) keys every LM recipe shares
# --------------------------------------------------------------------------------------------------------
def check_pair_section(pair_cfg: DictConfig) -> None:
    """``pair``: either ``small`` and ``large`` (both), or ``path`` and/or ``build_preset``."""
    if bool(pair_cfg.get("small")) != bool(pair_cfg.get("large")):
        missing = "pair.large" if pair_cfg.get("small") else "pair.small"
        raise ConfigError("give both pair.small and pair.large (hub ids or directories), or neither", key=missing)
    if not (pair_cfg.get("small") or pair_cfg.get("path") or pair_cfg.get("build_preset")):
        raise ConfigError("no pair: set pair.path=<pair dir>, pair.small/pair.large, or pair.build_preset=<preset>",
                          key="pair.path")


def check_task(task: DictConfig, counts: Sequence[str] = ("num_test",)) -> None:
    """The next-line task keys: counts >= 1, lengths >= 1, a known quality and split."""
    for key in (*counts, "context_tokens", "max_new_tokens", "batch_size"):
        value = task.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"expected an integer >= 1; got {value!r}", key=f"task.{key}")
    if task.get("min_context_lines") is not None and task.min_context_lines < 0:
        raise ConfigError(f"expected an integer >= 0; got {task.min_context_lines!r}", key="task.min_context_lines")
    if task.get("quality") is not None and task.quality not in QUALITY_FUNCTIONS:
        raise ConfigError(f"unknown quality {task.quality!r}; choose one of {sorted(QUALITY_FUNCTIONS)}",
                          key="task.quality")
    if task.get("split") is not None and task.split not in TASK_SPLITS:
        raise ConfigError(f"unknown split {task.split!r}; choose one of {list(TASK_SPLITS)}", key="task.split")


# --------------------------------------------------------------------------------------------------------
# the pair
# --------------------------------------------------------------------------------------------------------
def _pair_config_key(cfg: DictConfig) -> dict[str, Any]:
    """What a built pair depends on: the ``lm_pair`` config without the keys that do not change it."""
    d = plain(cfg)
    for key in ("output_dir", "resume", "logger", "threads"):
        d.pop(key, None)
    if d.get("drafter") is None:  # no feature drafter: the same key as before the section existed
        d.pop("drafter", None)
    d.get("trainer", {}).pop("enable_progress_bar", None)
    return {"recipe": "lm_pair", "config": d}


def cached_pair_dir(preset: str, config_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """Where :func:`build_pair_cached` keeps the pair of ``preset`` (``<cache>/lm_pair/<hash>/run/pair``; it holds
    a ``pair.json`` once built)."""
    cfg, _ = load_config("lm_pair", [f"preset={preset}", *overrides], config_dir)
    return io.cache_dir("lm_pair", _pair_config_key(cfg)) / "run" / "pair"


def pair_build_seconds(pair_dir: str | os.PathLike) -> float | None:
    """Wall time of the ``lm_pair`` run that built ``pair_dir`` (recorded in ``pair.json``; for pairs built before
    it was recorded: the run's creation time to the pair's writing), or ``None`` when unknown."""
    import datetime
    import json

    pair_dir = Path(pair_dir)
    meta = json.loads((pair_dir / "pair.json").read_text())
    if meta.get("build_seconds") is not None:
        return float(meta["build_seconds"])
    run_file = pair_dir.parent / "run.json"
    if not run_file.exists():
        return None
    created = json.loads(run_file.read_text()).get("created")
    if not created:
        return None
    start = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%S").timestamp()
    return (pair_dir / "pair.json").stat().st_mtime - start


def build_pair_cached(preset: str, config_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """The directory of the pair trained by the ``lm_pair`` recipe with ``preset`` (and ``overrides``).

    The pair is trained once into ``cache_dir("lm_pair", <its composed config>)/run`` (an ordinary run
    directory of :func:`train_pair`; an interrupted build is resumed) and reused by every later call with the
    same configuration. ``config_dir`` is the recipes' ``configs/`` directory.
    """
    from lit_cascades.runner.run import RUN_DIR_ENV, run_recipe

    pair_dir = cached_pair_dir(preset, config_dir, overrides)
    run_dir = pair_dir.parent
    if (pair_dir / "pair.json").exists():
        return pair_dir
    if (run_dir / "run.json").exists():
        args = [f"resume={run_dir}"]
    else:
        args = [f"preset={preset}", *overrides, f"output_dir={run_dir}", "logger.wandb=false"]
    print(f"[lm_pair] building the pair of preset {preset!r} into the cache {run_dir}", flush=True)
    outer = os.environ.get(RUN_DIR_ENV)
    try:
        run_recipe("lm_pair", train_pair, args, config_dir=config_dir)
    finally:  # the nested run points the environment at itself; the calling run owns it again
        if outer is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = outer
    return pair_dir


def load_or_build_pair(pair_cfg: DictConfig, config_dir: str | os.PathLike | None = None) -> LMPair:
    """Load the pair a recipe's ``pair`` section names.

    ``pair.small``/``pair.large`` (hub ids or directories) win over ``pair.path``. When ``pair.path`` is unset
    or holds no pair and ``pair.build_preset`` is set, the pair of that ``lm_pair`` preset is loaded from the
    cache, trained first when absent (:func:`build_pair_cached`, needs ``config_dir``).

    Raises:
        ConfigError: no pair at ``pair.path`` and nothing to build, or a pair that does not load.
    """
    with config_errors("pair", names=["path", "small", "large", "tokenizer"]):
        if pair_cfg.get("small") or pair_cfg.get("large"):
            return load_pair(small=pair_cfg.small, large=pair_cfg.large, tokenizer=pair_cfg.get("tokenizer"))
        path = Path(pair_cfg.path).expanduser() if pair_cfg.get("path") else None
        if path is not None and (path / "pair.json").exists():
            return load_pair(path)
        preset = pair_cfg.get("build_preset")
        if not preset:
            raise ConfigError(f"no LM pair at {str(path) if path else 'pair.path=null'}; pass pair.path=<dir of a "
                              "pair written by recipes.lm_pair>, or pair.build_preset=<lm_pair preset> to build one",
                              key="pair.path")
        if path is not None:
            raise ConfigError(f"no LM pair at {str(path)!r} (no pair.json); unset pair.path to use the cached pair "
                              f"of pair.build_preset={preset}", key="pair.path")
        if config_dir is None:
            raise ConfigError("pair.build_preset needs the recipes' configs directory", key="pair.build_preset")
        return load_pair(build_pair_cached(str(preset), config_dir))


def pair_name(pair: LMPair, pair_cfg: DictConfig) -> str:
    """How a pair appears in results: its directory, or ``small -> large``."""
    return str(pair.path) if pair.path else f"{pair_cfg.small} -> {pair_cfg.large}"


# --------------------------------------------------------------------------------------------------------
# the task data
# --------------------------------------------------------------------------------------------------------
def data_section(data_cfg: Any, pair: LMPair, default_target: str = DEFAULT_DATAMODULE) -> tuple[dict, bool]:
    """The corpus section to build: the recipe's ``data`` section, or (``None``) the pair's recorded corpus.

    Returns ``(section, from_pair)``. A recorded corpus loses its tokenizer keys (the pair's tokenizer is
    provided) and takes ``default_target``.
    """
    if data_cfg is not None:
        section = dict(plain(data_cfg))
        section.setdefault("_target_", default_target)
        return section, False
    corpus = pair.meta.get("corpus")
    if corpus is None:
        raise ConfigError("this pair has no recorded corpus (a hub pair?): set a data section, e.g. "
                          "+data.source=stdlib", key="data")
    section = {k: v for k, v in dict(corpus).items() if k not in _TOKENIZER_KEYS}
    section["_target_"] = default_target
    return section, True


def build_task_datamodule(data_cfg: Any, pair: LMPair, default_target: str = DEFAULT_DATAMODULE,
                          **provided: Any) -> Any:
    """The corpus DataModule (``data`` section or the pair's corpus) with the pair's tokenizer, set up.

    ``provided`` are constructor arguments the recipe sets (``block_size``, ``kd_steps``, ...); they replace a
    recorded corpus's values (and may not appear in a ``data`` section the user gives). Data errors become
    ``ConfigError`` s for ``data.<argument>``.
    """
    section, from_pair = data_section(data_cfg, pair, default_target)
    if from_pair:
        section = {k: v for k, v in section.items() if k not in provided}
    dm = build(section, "data", tokenizer=ensure_pad_token(pair.tokenizer), **provided)
    with config_errors("data", names=[k for k in section if k != "_target_"]):
        dm.setup()
    return dm


def next_line_loader(dm: Any, task: DictConfig, split: str, num_examples: int, pad_token_id: int) -> DataLoader:
    """Left-padded batches of ``num_examples`` next-line prompts of ``split`` (fixed order)."""
    with config_errors("task", names=["context_tokens", "max_new_tokens", "min_context_lines"]):
        ds = dm.next_line_dataset(split, num_examples=num_examples, context_tokens=task.context_tokens,
                                  max_target_tokens=task.max_new_tokens, min_context_lines=task.min_context_lines,
                                  seed=task.seed)
    return DataLoader(ds, batch_size=task.batch_size, shuffle=False, collate_fn=collate_prompts(pad_token_id))


# --------------------------------------------------------------------------------------------------------
# generation records
# --------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_records(module: Any, loader: DataLoader, desc: str = "generating",
                     progress: bool = True) -> dict[str, Any]:
    """``module.predict_step`` over every batch of ``loader`` (with a progress bar), concatenated.

    Used for :class:`~lit_cascades.modules.lm_cascade.LMCascade` and
    :class:`~lit_cascades.modules.speculative_cascade.SpeculativeCascade` records; memoise the result with
    ``stage.cached("records", lambda: generate_records(...))``.
    """
    if hasattr(module, "reset_generator"):
        module.reset_generator()
    out = [module.predict_step(batch, i)
           for i, batch in enumerate(progress_bar(loader, desc=desc, total=len(loader), unit="batch",
                                                  progress=progress))]
    return concat_records(out)


def plain_decode(model: nn.Module, loader: DataLoader, tokenizer: Any, max_new_tokens: int, include_stop: bool = True,
                 temperature: float = 0.0, seed: int = 0, progress: bool = True,
                 desc: str = "decoding") -> dict[str, Any]:
    """Autoregressive decoding of every prompt with one model (greedy at T = 0, sampling otherwise).

    Records per prompt: qualities, output length, ``seconds`` (batch time / batch size), ``forwards`` (one per
    generated token, the stop token included), per-token log-probs for the sequence-level cascade.
    """
    counts = newline_counts(tokenizer, model_vocab_size(model))
    torch.manual_seed(seed)
    out: list[dict[str, Any]] = []
    batches = generate_batches(model, loader, max_new_tokens, counts, tokenizer.pad_token_id, num_stops=2,
                               include_stop=include_stop, temperature=float(temperature), progress=progress,
                               desc=desc)
    start = time.perf_counter()
    for batch, gen in batches:
        seconds = time.perf_counter() - start
        b = gen.tokens.shape[0]
        texts = [next_line(t) for t in tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(gen.tokens, gen.mask)], skip_special_tokens=True)]
        forwards = gen.mask.sum(-1) + (gen.stopped & (not include_stop)).long()  # one per generated token
        rec = {"logprobs": gen.logprobs.cpu(), "mask": gen.mask.cpu(), "num_tokens": forwards.cpu(),
               "forwards": forwards.cpu(), "seconds": torch.full((b,), seconds / b, dtype=torch.float64)}
        for metric in QUALITY_FUNCTIONS:
            rec[metric] = text_quality(texts, batch["target"], metric)
        out.append(rec)
        start = time.perf_counter()
    return concat_records(out)


def plain_row(name: str, rec: Mapping[str, Any], quality: str, verifier: bool) -> dict[str, Any]:
    """One method row of a single model decoding alone (``verifier``: the large model)."""
    seconds = float(rec["seconds"].sum())
    calls = float(rec["forwards"].float().mean()) if verifier else 0.0
    tokens = float(rec["num_tokens"].float().sum())
    return {"method": name, "rule": "", "alpha": math.nan, "quality": float(rec[quality].mean()),
            "exact_match": float(rec["exact_match"].mean()), "token_f1": float(rec["token_f1"].mean()),
            "seconds_per_prompt": float(rec["seconds"].mean()), "tokens_per_second": tokens / max(seconds, 1e-12),
            "verifier_calls_per_prompt": calls,
            "verifier_calls_per_token": calls * len(rec["seconds"]) / max(tokens, 1),
            "drafter_calls_per_prompt": 0.0 if verifier else float(rec["forwards"].float().mean()),
            "acceptance_rate": math.nan, "tokens_per_verifier_call": math.nan,
            "deferral_rate": 1.0 if verifier else 0.0}


def speculative_row(name: str, rule: str, alpha: float | None, rec: Mapping[str, Any], quality: str) -> dict[str, Any]:
    """One method row of a speculative cascade's records."""
    seconds = float(rec["seconds"].sum())
    tokens = float(rec["num_tokens"].float().sum())
    calls = float(rec["verifier_calls"].float().sum())
    n = len(rec["seconds"])
    accept = float(rec["accepted"].sum() / rec["drafted"].sum().clamp(min=1))
    return {"method": name, "rule": rule, "alpha": math.nan if alpha is None else float(alpha),
            "quality": float(rec[quality].mean()), "exact_match": float(rec["exact_match"].mean()),
            "token_f1": float(rec["token_f1"].mean()), "seconds_per_prompt": seconds / n,
            "tokens_per_second": tokens / max(seconds, 1e-12), "verifier_calls_per_prompt": calls / n,
            "verifier_calls_per_token": calls / max(tokens, 1),
            "drafter_calls_per_prompt": float(rec["drafter_calls"].float().mean()),
            "acceptance_rate": accept, "tokens_per_verifier_call": tokens / max(calls, 1),
            "rejection_rate": 1.0 - accept,
            "deferral_rate": (float(rec["deferred"].float().sum()) / max(tokens, 1) if "deferred" in rec
                              else math.nan)}


def sequence_cascade_rows(small: Mapping[str, Any], large: Mapping[str, Any], rates: Sequence[float],
                          quality: str) -> list[dict[str, Any]]:
    """The sequence-level cascade (Chow-Average on the small model's greedy output) at each deferral rate.

    Prompts with the lowest Chow-Average are deferred; latency per prompt = small time + large time of the
    deferred prompts (from the two plain runs); verifier calls = the large model's forwards on them.
    """
    conf = sequence_scores(small["logprobs"], small["mask"])["chow_average"]
    order = torch.argsort(conf)  # least confident first
    n = conf.numel()
    rows = []
    for rate in rates:
        deferred = torch.zeros(n, dtype=torch.bool)
        deferred[order[: round(rate * n)]] = True
        q = {m: torch.where(deferred, large[m], small[m]) for m in QUALITY_FUNCTIONS}
        seconds = float(small["seconds"].sum() + large["seconds"][deferred].sum())
        tokens = float(torch.where(deferred, large["num_tokens"], small["num_tokens"]).float().sum())
        calls = float(large["forwards"][deferred].float().sum())
        rows.append({"method": f"seq_cascade_{rate:g}", "rule": "chow_average", "alpha": rate,
                     "quality": float(q[quality].mean()), "exact_match": float(q["exact_match"].mean()),
                     "token_f1": float(q["token_f1"].mean()), "seconds_per_prompt": seconds / n,
                     "tokens_per_second": tokens / max(seconds, 1e-12), "verifier_calls_per_prompt": calls / n,
                     "verifier_calls_per_token": calls / max(tokens, 1),
                     "drafter_calls_per_prompt": float(small["forwards"].float().mean()),
                     "acceptance_rate": math.nan, "tokens_per_verifier_call": math.nan, "deferral_rate": rate})
    return rows


# --------------------------------------------------------------------------------------------------------
# comparing deferral rules on records
# --------------------------------------------------------------------------------------------------------
def rules_from_logged(logged: Mapping[str, float], prefix: str = "test/defer/") -> dict[str, dict[str, float]]:
    """``{rule: {scalar: value}}`` from the metrics a :class:`DeferralCurveLogger` logged (``test/defer/<rule>/<k>``)."""
    rules: dict[str, dict[str, float]] = {}
    for key, value in logged.items():
        if key.startswith(prefix):
            rule, _, scalar = key[len(prefix):].rpartition("/")
            if rule:
                rules.setdefault(rule, {})[scalar] = float(value)
    return rules


def evaluate_rules(stage: Any, cascade: Any, records: Mapping[str, Any], rate: float, ideal: str, tag: str,
                   callbacks: Sequence[Any] = ()) -> dict[str, dict[str, float]]:
    """Deferral scalars of every rule of ``cascade`` on ``records`` (a test of ``stage``).

    The curves go to ``<stage>/deferral_<tag>_test.{csv,png}``; returns ``{rule: {auc_df, s_d, ...}}``.
    """
    from lit_cascades.callbacks import DeferralCurveLogger
    from lit_cascades.modules.lm_cascade import RecordsDataset

    cb = DeferralCurveLogger(rate=rate, ideal=ideal, output_dir=stage.dir, tag=tag)
    # one process: the rules score precomputed records (cheap), and a module holding Hugging Face models that
    # have run cannot be sent to spawned workers (transformers installs closures as forward hooks)
    logged = stage.test(cascade, dataloaders=DataLoader(RecordsDataset(records), batch_size=1024),
                        callbacks=[cb, *callbacks], devices=1, strategy="auto")
    return rules_from_logged(logged)


# --------------------------------------------------------------------------------------------------------
# the lm_pair recipe body
# --------------------------------------------------------------------------------------------------------
def takes_teacher(module_cfg: Any, key: str = "small.module") -> bool:
    """Whether a module section's class takes a ``teacher`` (then the ``lm_pair`` recipe passes the large model)."""
    import inspect

    from lit_cascades.runner.config import locate

    target = locate(str(module_cfg["_target_"]), key=f"{key}._target_")
    return "teacher" in inspect.signature(target).parameters


def train_pair(cfg: DictConfig, r: Any) -> dict[str, Any]:
    """Train (or load) a small and a large causal LM on one corpus with one tokenizer and save them as a pair.

    The body of ``python -m recipes.lm_pair`` (also run by :func:`build_pair_cached`). Stages ``small`` and
    ``large`` fit (``<role>.steps`` steps; skipped when 0) and test their ``<role>.module``; the pair is saved
    to ``<run>/pair`` with the corpus section recorded, so consumers can rebuild the task data. A small module
    whose class takes ``teacher`` (:class:`~lit_cascades.modules.salt.DistilledLM`) is given the large model
    and distils from it: the large stage then runs first. An optional ``drafter`` section (``steps``, ``module``:
    :class:`~lit_cascades.modules.feature_drafter.FeatureDrafterLM`) then trains an EAGLE feature drafter for the
    large model, saved in the pair as ``drafter`` (stage ``drafter``; test agreement in its ``metrics.json``).
    """
    from lit_cascades.models.vision import count_parameters

    set_threads(cfg.get("threads"))
    start = time.perf_counter()
    for role in ("small", "large"):
        steps = cfg[role].steps
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"expected an integer >= 0; got {steps!r}", key=f"{role}.steps")
    for key in ("val_every", "batches"):
        if not isinstance(cfg.eval[key], int) or cfg.eval[key] < 1:
            raise ConfigError(f"expected an integer >= 1; got {cfg.eval[key]!r}", key=f"eval.{key}")
    feature = cfg.get("drafter")  # optional: an EAGLE feature drafter for the large model
    if feature is not None and (not isinstance(feature.get("steps"), int) or feature.steps < 1):
        raise ConfigError(f"expected an integer >= 1; got {feature.get('steps')!r}", key="drafter.steps")
    dm = build(cfg.data, "data")
    with config_errors("data", names=[k for k in cfg.data if k != "_target_"]):
        dm.setup()
    tok = dm.get_tokenizer()
    models = {role: build(cfg[role].model, f"{role}.model", tokenizer=tok) for role in ("small", "large")}
    with config_errors("small.model"):
        check_same_vocab(models["small"], models["large"], tok, tok)
    distilled = takes_teacher(cfg.small.module)
    modules = {"large": build(cfg.large.module, "large.module", model=models["large"])}
    # a small module that takes a teacher (e.g. DistilledLM) distils from the large model, trained first
    modules["small"] = build(cfg.small.module, "small.module", model=models["small"],
                             **({"teacher": modules["large"].model} if distilled else {}))
    roles = ("large", "small") if distilled else ("small", "large")
    drafter_module = (None if feature is None
                      else build(feature.module, "drafter.module", teacher=modules["large"].model))
    extra = build_list(cfg.get("callbacks"), "callbacks")

    results: dict[str, Any] = {"data": {"source": dm.hparams.source, **dm.corpus.meta,
                                        **{f"tokens_{k}": len(v) * dm.hparams.block_size
                                           for k, v in dm.datasets.items()}},
                               "vocab_size": len(tok)}
    for role in roles:
        spec, module = cfg[role], modules[role]
        st = r.stage(role, kind=role, config={"role": role, role: plain(spec)}, seed=int(cfg.seed))
        if spec.steps > 0:
            st.fit(module, dm, callbacks=extra, max_steps=spec.steps, max_epochs=-1,
                   val_check_interval=min(cfg.eval.val_every, spec.steps), limit_val_batches=cfg.eval.batches,
                   check_val_every_n_epoch=None)
        logged = st.test(module, dm, limit_test_batches=cfg.eval.batches)
        results[role] = {"params": count_parameters(module.model), "steps": spec.steps,
                         "test_loss": logged["test/loss"], "test_ppl": math.exp(logged["test/loss"]),
                         "test_token_acc": logged["test/token_acc"]}
        st.finish(results[role])
    drafter = None
    if drafter_module is not None:
        st = r.stage("drafter", kind="drafter", config={"role": "drafter", "drafter": plain(feature)},
                     seed=int(cfg.seed))
        st.fit(drafter_module, dm, callbacks=extra, max_steps=feature.steps, max_epochs=-1,
               val_check_interval=min(cfg.eval.val_every, feature.steps), limit_val_batches=cfg.eval.batches,
               check_val_every_n_epoch=None)
        logged = st.test(drafter_module, dm, limit_test_batches=cfg.eval.batches)
        results["drafter"] = {"params": count_parameters(drafter_module.model), "steps": feature.steps,
                              "test_loss": logged["test/loss"], "test_agreement": logged["test/agreement"]}
        st.finish(results["drafter"])
        drafter = drafter_module.model.eval()
    results = {k: results[k] for k in ("data", "vocab_size", "small", "large", "drafter") if k in results}
    meta = {"corpus": plain(cfg.data), "results": results, "recipe": "lm_pair", "preset": r.preset,
            "seed": cfg.seed, "run_id": r.run_id, "build_seconds": time.perf_counter() - start}
    pair = LMPair(modules["small"].model.eval(), modules["large"].model.eval(), tok, drafter=drafter)
    pair_dir = r.dir / "pair"
    if r.writer:
        save_pair(pair, pair_dir, meta)
    results["pair_dir"] = str(pair_dir)
    return results


__all__ = [
    "REPORTED", "build_pair_cached", "build_task_datamodule", "cached_pair_dir", "check_pair_section", "check_task",
    "data_section", "evaluate_rules", "generate_records", "load_or_build_pair", "next_line_loader",
    "pair_build_seconds", "pair_name", "plain", "plain_decode", "plain_row", "rules_from_logged",
    "sequence_cascade_rows", "set_threads", "speculative_row", "takes_teacher", "train_pair",
]


# --------------------------------------------------------------------------------------------------------
# training curves and data-parallel layout
# --------------------------------------------------------------------------------------------------------
def val_curve(stage_dir: str | os.PathLike, key: str = "val/loss") -> list[tuple[int, float]]:
    """``[(step, value)]`` of ``key`` from a stage's fit logs (``<stage>/logs/fit*/metrics.csv``, every attempt
    of a resumed fit), sorted by step; a step logged twice keeps the later attempt's value.

    ``step`` is the optimizer step after which the value was measured (the CSV logger records a validation run
    inside the training loop at the index of the last batch, one less).
    """
    import csv

    points: dict[int, float] = {}
    files = sorted(Path(stage_dir).glob("logs/fit*/metrics.csv"), key=lambda p: (len(p.parent.name), p.parent.name))
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(key) not in (None, ""):
                    points[int(row["step"]) + 1] = float(row[key])
    return sorted(points.items())


def data_parallel_size(trainer_cfg: Any) -> int:
    """How many processes a ``trainer`` config trains with (``devices`` x ``num_nodes`` under a DDP strategy)."""
    t = plain(trainer_cfg) or {}
    strategy = str(t.get("strategy", "auto"))
    devices = t.get("devices", 1)
    if "ddp" not in strategy and "fsdp" not in strategy:
        return 1
    n = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 0 else 1
    return int(n) * int(t.get("num_nodes", 1) or 1)
