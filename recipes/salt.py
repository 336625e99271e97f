"""SALT: train a larger LM with KD from a small LM for the first steps (Rawat et al., arXiv:2410.18779).

    python -m recipes.salt                              # SALT; teacher = small model of runs/lm_pair/latest
    python -m recipes.salt method=baseline              # plain next-token training, same budget, same seed
    python -m recipes.salt method=salt_ds kd.steps=300 kd.weight=0.5 kd.temperature=1.0
    python -m recipes.salt method=all                   # baseline, SALT and SALT_DS in one run + one plot
    python -m recipes.salt pair.path=<pair dir>         # another teacher (the pair's `teacher.role` model)
    python -m recipes.salt preset=smoke                 # seconds (tests)

1. load the LM pair at ``pair.path`` (built with ``recipes.lm_pair preset=<pair.build_preset>`` if absent); its
   ``teacher.role`` model (default: the small one) is the teacher, its tokenizer and corpus are the data;
2. build a fresh student from ``student.arch`` (a GPT-2 config, larger than the teacher) or ``student.init``,
   re-seeded with ``seed`` for every method so all methods start from the same weights and see the same
   batch order (:class:`~lit_cascades.data.selection.StagedBatchSampler`);
3. train each method for ``train.steps`` optimizer steps: ``baseline`` (NTP only), ``salt`` (KD for
   ``kd.steps`` steps, then NTP), ``salt_ds`` (as ``salt`` with the KD stage on the top ``select.fraction``
   of sequences by the teacher's top-k median score, cached in ``select.cache_dir``);
4. report per method the final validation loss/perplexity, wall time, the validation curve, and (when the
   baseline ran in the same run) the first evaluated step at which each method reaches the baseline's final
   validation loss; ``val_loss.png`` plots val loss vs step for all methods that ran.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lit_cascades.data.lm import ensure_pad_token
from lit_cascades.data.selection import SALTDataModule, SequenceSelector
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.models.vision import count_parameters
from lit_cascades.modules.salt import SALT
from lit_cascades.plotting import new_axes
from lit_cascades.runner import ConfigError, Run, main
from recipes.lm_pair import load_or_build_pair, set_threads

METHODS = ("baseline", "salt", "salt_ds")


class ValCurve(L.Callback):
    """Records ``(global_step, val/loss)`` after every validation run."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.points.append((int(trainer.global_step), float(value)))


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is ≤ ``target`` (``None`` if never)."""
    return next((step for step, loss in curve if loss <= target), None)


def build_student(cfg: DictConfig, tokenizer: Any):
    if cfg.student.init:
        from lit_cascades.models.hf import load_causal_lm

        return load_causal_lm(cfg.student.init)
    config = gpt2_config(len(tokenizer), n_positions=cfg.student.n_positions, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **cfg.student.arch)
    return build_causal_lm(config)


def datamodule(cfg: DictConfig, pair, kd_steps: int) -> SALTDataModule:
    data = cfg.data if cfg.data is not None else pair.meta.get("corpus")
    if data is None:
        raise ValueError("this pair has no recorded corpus (a hub pair?): set data.source=stdlib (or another source)")
    kwargs = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    kwargs = {k: v for k, v in kwargs.items() if k != "vocab_size"}
    sel = cfg.select
    selector = SequenceSelector(fraction=sel.fraction, k=sel.k, highest=sel.highest, batch_size=sel.batch_size)
    return SALTDataModule(kd_steps=kd_steps, selector=selector, score_cache_dir=sel.cache_dir, seed=cfg.seed,
                          tokenizer=ensure_pad_token(pair.tokenizer), **kwargs)


def run_method(cfg: DictConfig, r: Run, pair, teacher, method: str) -> dict[str, Any]:
    kd_steps = 0 if method == "baseline" else int(cfg.kd.steps)
    dm = datamodule(cfg, pair, kd_steps)
    dm.setup()
    result: dict[str, Any] = {"kd_steps": kd_steps}
    if method == "salt_ds":
        start = time.perf_counter()
        selected = dm.select(teacher)
        result.update(selected=int(selected.numel()), train_sequences=len(dm.datasets["train"]),
                      score_cache_hit=bool(dm.cache_hit), score_seconds=time.perf_counter() - start,
                      unscored=int(dm.scores.isnan().sum()))
    L.seed_everything(int(cfg.seed), verbose=False)  # the same student initialisation for every method
    student = build_student(cfg, dm.get_tokenizer())
    t = cfg.train
    module = SALT(student, teacher if kd_steps > 0 else None, kd_steps=kd_steps, kd_weight=cfg.kd.weight,
                  schedule=cfg.kd.schedule, temperature=cfg.kd.temperature, chunk_size=cfg.kd.chunk_size,
                  selected_fraction=dm.selected_fraction, teacher_path=str(pair.path) if pair.path else None,
                  lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps)
    curve = ValCurve()
    start = time.perf_counter()
    r.fit(method, module, dm, callbacks=[curve], max_steps=t.steps, max_epochs=-1,
          val_check_interval=cfg.eval.val_every, check_val_every_n_epoch=None,
          limit_val_batches=cfg.eval.batches)
    result["train_seconds"] = time.perf_counter() - start
    result.update(student_params=count_parameters(student), curve=curve.points)
    if curve.points:
        result["final_val_loss"] = curve.points[-1][1]
        result["final_val_ppl"] = math.exp(curve.points[-1][1])
    return result


def plot_curves(r: Run, results: dict[str, dict[str, Any]], cfg: DictConfig) -> None:
    fig, ax = new_axes(figsize=(6.0, 4.0))
    for method, res in results.items():
        steps, losses = zip(*res["curve"]) if res["curve"] else ((), ())
        ax.plot(steps, losses, marker="o", markersize=3, label=method)
    if cfg.kd.steps and any(m != "baseline" for m in results):
        ax.axvline(cfg.kd.steps, color="gray", linestyle=":", label=f"kd.steps={cfg.kd.steps}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("SALT: val loss vs step")
    ax.legend()
    r.save_figure("val_loss", fig)


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    set_threads(cfg.threads)
    if cfg.method not in (*METHODS, "all"):
        raise ConfigError(f"method must be one of {[*METHODS, 'all']}; got {cfg.method!r}")
    if cfg.kd.steps > cfg.train.steps:
        raise ConfigError(f"kd.steps ({cfg.kd.steps}) must not exceed train.steps ({cfg.train.steps})")
    if cfg.train.steps % cfg.eval.val_every:
        raise ConfigError(f"train.steps ({cfg.train.steps}) must be a multiple of eval.val_every "
                          f"({cfg.eval.val_every}) so that the last step is evaluated")
    methods = list(METHODS) if cfg.method == "all" else [cfg.method]
    pair = load_or_build_pair(cfg.pair, r)
    teacher = getattr(pair, cfg.teacher.role)
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        results[method] = run_method(cfg, r, pair, teacher, method)
        print(f"[salt] {method}: final val loss {results[method].get('final_val_loss')}, "
              f"{results[method]['train_seconds']:.0f} s")
    if "baseline" in results and "final_val_loss" in results["baseline"]:
        target = results["baseline"]["final_val_loss"]
        for res in results.values():
            res["steps_to_baseline_final"] = steps_to_reach(res["curve"], target)
            if res["steps_to_baseline_final"] is not None:
                res["fraction_of_baseline_steps"] = res["steps_to_baseline_final"] / cfg.train.steps
    plot_curves(r, results, cfg)
    rows = [[m, res.get("final_val_loss"), res.get("final_val_ppl"), res.get("steps_to_baseline_final"),
             res["train_seconds"]] for m, res in results.items()]
    r.save_table("results", ["method", "final_val_loss", "final_val_ppl", "steps_to_baseline_final",
                             "train_seconds"], rows)
    curve_rows = [[m, s, v] for m, res in results.items() for s, v in res["curve"]]
    r.save_table("val_curves", ["method", "step", "val_loss"], curve_rows)
    return {"methods": results, "teacher_params": sum(p.numel() for p in teacher.parameters()), "seed": cfg.seed,
            "train_steps": cfg.train.steps, "kd": OmegaConf.to_container(cfg.kd, resolve=True),
            "select": OmegaConf.to_container(cfg.select, resolve=True)}


if __name__ == "__main__":
    main("salt", run)
