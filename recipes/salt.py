"""SALT: train a larger LM with KD from a small LM for the first steps (Rawat et al., arXiv:2410.18779).

    python -m recipes.salt                              # SALT; teacher = small model of lm_pair preset=default
    python -m recipes.salt method=baseline              # plain next-token training, same budget, same seed
    python -m recipes.salt method=salt_ds kd.steps=300 student.module.kd_weight=0.5
    python -m recipes.salt method=all                   # baseline, SALT and SALT_DS in one run + one plot
    python -m recipes.salt pair.path=<run>/pair         # the pair of an lm_pair run (its `teacher.role` model teaches)
    python -m recipes.salt preset=smoke                 # seconds (tests)
    python -m recipes.salt preset=smoke trainer.devices=2 trainer.strategy=ddp_spawn   # same results, 2 processes

1. load the LM pair (``pair``); its ``teacher.role`` model (default: the small one) is the teacher, its
   tokenizer and corpus are the data (``data: null``; or a ``data`` section);
2. build, for every method, the data (:class:`~lit_cascades.data.selection.SALTDataModule` with the
   ``select`` selector), a fresh student from ``student.model`` (re-seeded with ``seed``, so all methods start
   from the same weights) and its :class:`~lit_cascades.modules.salt.SALT` module (``student.module``) — all
   before any work, so a bad value stops the run within seconds;
3. one stage per method, trained for ``train.steps`` optimizer steps with the same seeded batch order
   (:class:`~lit_cascades.data.selection.StagedBatchSampler`): ``baseline`` (NTP only), ``salt`` (KD for
   ``kd.steps`` steps, then NTP), ``salt_ds`` (as ``salt`` with the KD stage on the top ``select.fraction`` of
   sequences by the teacher's top-k median score; scores memoised in ``salt_ds/selection.pt`` and cached
   across runs under ``<cache root>/selection_scores`` unless ``score_cache=false``);
4. report per method the final validation loss/perplexity, wall time, the validation curve (from the stage's
   fit log) and, when the baseline ran, the first evaluated step at which each method reaches the baseline's
   final validation loss; ``val_loss.png``, ``results.csv`` and ``val_curves.csv`` in the run directory.

Data parallel: ``data.batch_size`` is the global batch; with ``trainer.devices=N`` under DDP each process
takes its slice of every global batch and validates on the same batches, so the metrics equal the
1-process run's up to floating-point reduction order (``*_seconds`` aside).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from lit_cascades.lm_tasks import (
    build_task_datamodule,
    check_pair_section,
    data_parallel_size,
    load_or_build_pair,
    plain,
    set_threads,
    val_curve,
)
from lit_cascades.models.vision import count_parameters
from lit_cascades.plotting import new_axes
from lit_cascades.runner import ConfigError, Run, build, build_list, main

METHODS = ("baseline", "salt", "salt_ds")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is ≤ ``target`` (``None`` if never)."""
    return next((step for step, loss in curve if loss <= target), None)


def check(cfg: DictConfig) -> list[str]:
    """The plain keys (not constructor arguments); returns the methods to run."""
    if cfg.method not in (*METHODS, "all"):
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {[*METHODS, 'all']}", key="method")
    if cfg.teacher.role not in ("small", "large"):
        raise ConfigError(f"expected small or large; got {cfg.teacher.role!r}", key="teacher.role")
    for key, value in (("train.steps", cfg.train.steps), ("eval.val_every", cfg.eval.val_every),
                       ("eval.batches", cfg.eval.batches)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"expected an integer >= 1; got {value!r}", key=key)
    if not isinstance(cfg.kd.steps, int) or not 0 <= cfg.kd.steps <= cfg.train.steps:
        raise ConfigError(f"expected an integer in [0, train.steps={cfg.train.steps}]; got {cfg.kd.steps!r}",
                          key="kd.steps")
    if cfg.train.steps % cfg.eval.val_every:
        raise ConfigError(f"train.steps ({cfg.train.steps}) must be a multiple of eval.val_every so that the last "
                          "step is evaluated", key="eval.val_every")
    check_pair_section(cfg.pair)
    return list(METHODS) if cfg.method == "all" else [cfg.method]


def build_method(cfg: DictConfig, pair, teacher, method: str, world: int) -> tuple[Any, Any]:
    """The datamodule and the SALT module of ``method`` (the student re-seeded: the same start for every method)."""
    kd_steps = 0 if method == "baseline" else int(cfg.kd.steps)
    selector = build(cfg.select, "select")
    dm = build_task_datamodule(cfg.data, pair, default_target="lit_cascades.data.selection.SALTDataModule",
                               kd_steps=kd_steps, selector=selector, seed=int(cfg.seed),
                               score_cache_dir=bool(cfg.score_cache))
    if world > 1:  # data.batch_size is the global batch: every process takes its slice
        if dm.hparams.batch_size % world:
            raise ConfigError(f"the global batch {dm.hparams.batch_size} must be divisible by the {world} processes",
                              key="data.batch_size")
        dm.hparams.batch_size //= world
    pl.seed_everything(int(cfg.seed), verbose=False)  # the same student initialisation for every method
    student = build(cfg.student.model, "student.model", tokenizer=dm.get_tokenizer())
    module = build(cfg.student.module, "student.module", student=student, teacher=teacher if kd_steps > 0 else None,
                   kd_steps=kd_steps, selected_fraction=cfg.select.fraction if method == "salt_ds" else 1.0,
                   teacher_path=str(pair.path) if pair.path else None)
    return dm, module


def plot_curves(r: Run, results: dict[str, dict[str, Any]], kd_steps: int) -> None:
    fig, ax = new_axes(figsize=(6.0, 4.0))
    for method, res in results.items():
        steps, losses = zip(*res["curve"]) if res["curve"] else ((), ())
        ax.plot(steps, losses, marker="o", markersize=3, label=method)
    if kd_steps and any(m != "baseline" for m in results):
        ax.axvline(kd_steps, color="gray", linestyle=":", label=f"kd.steps={kd_steps}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("SALT: val loss vs step")
    ax.legend()
    r.save_figure("val_loss", fig)


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    set_threads(cfg.threads)
    methods = check(cfg)
    world = data_parallel_size(cfg.trainer)
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR)
    teacher = getattr(pair, cfg.teacher.role)
    built = {m: build_method(cfg, pair, teacher, m, world) for m in methods}
    extra = build_list(cfg.callbacks, "callbacks")
    fit_args = dict(max_steps=cfg.train.steps, max_epochs=-1, val_check_interval=cfg.eval.val_every,
                    check_val_every_n_epoch=None, limit_val_batches=cfg.eval.batches * world,
                    use_distributed_sampler=False)

    results: dict[str, dict[str, Any]] = {}
    for method, (dm, module) in built.items():
        st = r.stage(method, kind="method", config={"method": method, "kd_steps": module.hparams.kd_steps,
                                                     "student": plain(cfg.student), "select": plain(cfg.select)},
                     seed=int(cfg.seed))
        result: dict[str, Any] = {"kd_steps": module.hparams.kd_steps}
        if method == "salt_ds":
            def select(dm=dm) -> dict[str, torch.Tensor]:
                start = time.perf_counter()
                selected = dm.select(teacher)
                return {"selected": selected, "scores": dm.scores, "cache_hit": torch.tensor(bool(dm.cache_hit)),
                        "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}

            sel = st.cached("selection", select)
            dm.selected, dm.scores = sel["selected"], sel["scores"]
            module.hparams.selected_fraction = dm.selected_fraction
            result.update(selected=int(sel["selected"].numel()), train_sequences=len(dm.datasets["train"]),
                          score_cache_hit=bool(sel["cache_hit"]), score_seconds=float(sel["seconds"]),
                          unscored=int(sel["scores"].isnan().sum()))
        start = time.perf_counter()
        st.fit(module, dm, callbacks=extra, **fit_args)
        result["train_seconds"] = time.perf_counter() - start
        curve = val_curve(st.dir)
        result.update(student_params=count_parameters(module.model), curve=curve)
        if curve:
            result["final_val_loss"] = curve[-1][1]
            result["final_val_ppl"] = math.exp(curve[-1][1])
        st.finish({k: v for k, v in result.items() if k != "curve"})
        results[method] = result
        print(f"[salt] {method}: final val loss {result.get('final_val_loss')}, {result['train_seconds']:.0f} s")
    if "baseline" in results and "final_val_loss" in results["baseline"]:
        target = results["baseline"]["final_val_loss"]
        for res in results.values():
            res["steps_to_baseline_final"] = steps_to_reach(res["curve"], target)
            if res["steps_to_baseline_final"] is not None:
                res["fraction_of_baseline_steps"] = res["steps_to_baseline_final"] / cfg.train.steps
    plot_curves(r, results, int(cfg.kd.steps))
    r.save_table("results", ["method", "final_val_loss", "final_val_ppl", "steps_to_baseline_final", "train_seconds"],
                 [[m, res.get("final_val_loss"), res.get("final_val_ppl"), res.get("steps_to_baseline_final"),
                   res["train_seconds"]] for m, res in results.items()])
    r.save_table("val_curves", ["method", "step", "val_loss"],
                 [[m, s, v] for m, res in results.items() for s, v in res["curve"]])
    return {"methods": results, "teacher_params": sum(p.numel() for p in teacher.parameters()), "seed": cfg.seed,
            "train_steps": cfg.train.steps, "kd_steps": cfg.kd.steps, "student_module": plain(cfg.student.module),
            "select": plain(cfg.select), "world_size": world}


if __name__ == "__main__":
    main("salt", run)
