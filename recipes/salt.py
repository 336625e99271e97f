"""SALT: train a larger LM with KD from a small LM for the first steps (Rawat et al., arXiv:2410.18779).

    python -m recipes.salt                              # all four methods, one seed (preset default: ~4 CPU min)
    python -m recipes.salt seed=1                       # another seed (benchmarks/results_salt.py runs 3)
    python -m recipes.salt method=salt kd.steps=60 student.module.kd_weight=0.3
    python -m recipes.salt preset=paper                 # the larger setting (hours on a CPU; not run here)
    python -m recipes.salt preset=smoke                 # seconds (tests)
    python -m recipes.salt preset=smoke trainer.devices=2 trainer.strategy=ddp_spawn   # same results, 2 processes

1. the data (``data``: a :class:`~lit_cascades.data.selection.SALTDataModule` section; ``data: null`` takes the
   corpus and tokenizer of an LM pair, ``pair``) and the teacher: ``teacher.source=train`` builds
   ``teacher.model`` and trains it (stage ``teacher``, ``teacher.module``, ``teacher.steps`` steps) on the same
   training data and batch stream as the students; ``teacher.source=pair`` takes the pair's ``teacher.role``
   model instead;
2. builds, for every method, the datamodule (the ``select`` selector for SALT_DS), a fresh student from
   ``student.model`` (re-seeded with ``seed``: every method starts from the same weights) and its
   :class:`~lit_cascades.modules.salt.SALT` module (``student.module``), all before any work;
3. one stage per method, ``train.steps`` optimizer steps on **one batch stream**
   (:class:`~lit_cascades.data.selection.StagedBatchSampler`: the batch of step ``s`` is the same for every
   method): ``baseline`` (NTP only), ``salt`` (KD with weight ω for ``kd.steps`` steps, then NTP), ``control``
   (as ``salt`` with ω = 0: the teacher runs, the KD term has weight 0; equals the baseline up to float
   rounding when the stream is shared), ``salt_ds`` (as ``salt``; its stage-1 batches are the top
   ``select.fraction`` of a window of the stream scored by the teacher, stage 2 is the common stream from
   step ``kd.steps`` on; see :class:`~lit_cascades.data.selection.SALTDataModule`);
4. reports per method the validation curve, final validation loss/perplexity, wall time, the fingerprints of its
   stage-1/stage-2 batch streams, the teacher's margin over the student in the KD window, and (when the
   baseline ran) the first evaluated step at which it reaches the baseline's final validation loss;
   ``val_loss.png``, ``results.csv`` and ``val_curves.csv`` in the run directory. Several seeds and the
   published table/figure: ``python -m benchmarks.results_salt``.

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

from lit_cascades.data.selection import stream_fingerprint
from lit_cascades.lm_tasks import (
    build_task_datamodule,
    check_pair_section,
    data_parallel_size,
    load_or_build_pair,
    plain,
    val_curve,
)
from lit_cascades.modules.salt import count_non_embedding_parameters
from lit_cascades.plotting import new_axes
from lit_cascades.runner import ConfigError, Run, build, build_list, main
from lit_cascades.runner.config import config_errors

METHODS = ("baseline", "salt", "control", "salt_ds")
SALT_DATAMODULE = "lit_cascades.data.selection.SALTDataModule"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is ≤ ``target`` (``None`` if never)."""
    return next((step for step, loss in curve if loss <= target), None)


def teacher_margin(curve: list[tuple[int, float]], teacher_loss: float, kd_steps: int) -> float | None:
    """``min`` over the evaluated steps ``≤ kd_steps`` of (student val loss − teacher val loss).

    Positive: the teacher was better than the student at every evaluation inside the KD window. ``None`` when
    no evaluation falls in the window.
    """
    inside = [loss - teacher_loss for step, loss in curve if step <= kd_steps]
    return min(inside) if inside else None


def check(cfg: DictConfig) -> list[str]:
    """The plain keys (not constructor arguments); returns the methods to run."""
    if cfg.method not in (*METHODS, "all"):
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {[*METHODS, 'all']}", key="method")
    if cfg.teacher.source not in ("train", "pair"):
        raise ConfigError(f"expected train or pair; got {cfg.teacher.source!r}", key="teacher.source")
    if cfg.teacher.role not in ("small", "large"):
        raise ConfigError(f"expected small or large; got {cfg.teacher.role!r}", key="teacher.role")
    for key, value in (("train.steps", cfg.train.steps), ("eval.val_every", cfg.eval.val_every),
                       ("eval.batches", cfg.eval.batches), ("teacher.steps", cfg.teacher.steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"expected an integer >= 1; got {value!r}", key=key)
    if not isinstance(cfg.kd.steps, int) or not 0 <= cfg.kd.steps <= cfg.train.steps:
        raise ConfigError(f"expected an integer in [0, train.steps={cfg.train.steps}]; got {cfg.kd.steps!r}",
                          key="kd.steps")
    for key, steps in (("train.steps", cfg.train.steps), ("teacher.steps", cfg.teacher.steps)):
        if steps % cfg.eval.val_every:
            raise ConfigError(f"{key} ({steps}) must be a multiple of eval.val_every so that the last step is "
                              "evaluated", key="eval.val_every")
    if cfg.data is None or cfg.teacher.source == "pair":
        check_pair_section(cfg.pair)
    return list(METHODS) if cfg.method == "all" else [cfg.method]


class DataFactory:
    """Builds the identically configured datamodules of the teacher and the methods (one tokenizer).

    ``data: null`` or ``teacher.source=pair``: the pair's tokenizer (and, with ``data: null``, its corpus).
    Otherwise the ``data`` section's own tokenizer (``tokenizer: null`` trains a BPE tokenizer once, on the
    first datamodule, and hands it to the others).
    """

    def __init__(self, cfg: DictConfig, pair: Any) -> None:
        self.cfg, self.pair, self.tokenizer = cfg, pair, None

    def __call__(self, kd_steps: int, selector: Any = None) -> Any:
        cfg = self.cfg
        provided = dict(kd_steps=kd_steps, seed=int(cfg.seed), score_cache_dir=bool(cfg.score_cache))
        if selector is not None:
            provided["selector"] = selector
        if self.pair is not None:
            return build_task_datamodule(cfg.data, self.pair, default_target=SALT_DATAMODULE, **provided)
        section = dict(plain(cfg.data))
        section.setdefault("_target_", SALT_DATAMODULE)
        if self.tokenizer is not None:
            section.pop("tokenizer", None)
            provided["tokenizer"] = self.tokenizer
        dm = build(section, "data", **provided)
        with config_errors("data", names=[k for k in section if k != "_target_"]):
            dm.setup()
        self.tokenizer = dm.get_tokenizer()
        return dm


def per_process_batch(dm: Any, world: int) -> None:
    """``data.batch_size`` is the global batch: every process takes its slice."""
    if world > 1:
        if dm.hparams.batch_size % world:
            raise ConfigError(f"the global batch {dm.hparams.batch_size} must be divisible by the {world} processes",
                              key="data.batch_size")
        dm.hparams.batch_size //= world


def build_teacher(cfg: DictConfig, pair: Any, make_dm: DataFactory, world: int) -> tuple[Any, Any, Any]:
    """``(teacher model, its training module or None, its datamodule or None)``."""
    if cfg.teacher.source == "pair":
        return getattr(pair, cfg.teacher.role), None, None
    dm = make_dm(0)
    per_process_batch(dm, world)
    pl.seed_everything(int(cfg.seed) + 1, verbose=False)  # not the student's initialisation
    model = build(cfg.teacher.model, "teacher.model", tokenizer=dm.get_tokenizer())
    module = build(cfg.teacher.module, "teacher.module", model=model)
    return model, module, dm


def build_method(cfg: DictConfig, make_dm: DataFactory, teacher: Any, method: str, world: int,
                 teacher_path: str | None) -> tuple[Any, Any]:
    """The datamodule and the SALT module of ``method`` (the student re-seeded: the same start for every method)."""
    kd_steps = 0 if method == "baseline" else int(cfg.kd.steps)
    selector = build(cfg.select, "select") if method == "salt_ds" else None
    dm = make_dm(kd_steps, selector)
    per_process_batch(dm, world)
    pl.seed_everything(int(cfg.seed), verbose=False)  # the same student initialisation for every method
    student = build(cfg.student.model, "student.model", tokenizer=dm.get_tokenizer())
    extra = {"kd_weight": 0.0} if method == "control" else {}
    if method == "control" and "kd_weight" in cfg.student.module:
        section = {k: v for k, v in plain(cfg.student.module).items() if k != "kd_weight"}
    else:
        section = cfg.student.module
    module = build(section, "student.module", student=student, teacher=teacher if kd_steps > 0 else None,
                   kd_steps=kd_steps, selected_fraction=cfg.select.fraction if method == "salt_ds" else 1.0,
                   teacher_path=teacher_path, **extra)
    return dm, module


def plot_curves(r: Run, results: dict[str, dict[str, Any]], teacher: dict[str, Any], kd_steps: int) -> None:
    fig, ax = new_axes(figsize=(6.5, 4.2))
    for method, res in results.items():
        steps, losses = zip(*res["curve"]) if res["curve"] else ((), ())
        ax.plot(steps, losses, marker="o", markersize=2, label=method)
    if teacher.get("curve"):
        steps, losses = zip(*teacher["curve"])
        ax.plot(steps, losses, color="black", linestyle="--", linewidth=1, label="teacher (its own training)")
    if teacher.get("final_val_loss") is not None:
        ax.axhline(teacher["final_val_loss"], color="black", linestyle=":", linewidth=1,
                   label="teacher used for KD")
    if kd_steps and any(m != "baseline" for m in results):
        ax.axvspan(0, kd_steps, color="gray", alpha=0.12, label=f"KD window (steps < {kd_steps})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("SALT: validation loss vs step (one seed)")
    ax.legend(loc="upper right", fontsize=8)
    r.save_figure("val_loss", fig)


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    methods = check(cfg)
    world = data_parallel_size(cfg.trainer)
    pair = load_or_build_pair(cfg.pair, CONFIG_DIR) if cfg.data is None or cfg.teacher.source == "pair" else None
    make_dm = DataFactory(cfg, pair)
    teacher, teacher_module, teacher_dm = build_teacher(cfg, pair, make_dm, world)
    teacher_path = str(pair.path) if cfg.teacher.source == "pair" and pair.path else None
    built = {m: build_method(cfg, make_dm, teacher, m, world, teacher_path) for m in methods}
    extra = build_list(cfg.callbacks, "callbacks")
    fit_args = dict(max_epochs=-1, val_check_interval=cfg.eval.val_every, check_val_every_n_epoch=None,
                    limit_val_batches=cfg.eval.batches * world, use_distributed_sampler=False)

    teacher_info: dict[str, Any] = {"source": cfg.teacher.source, "params": sum(p.numel() for p in teacher.parameters()),
                                    "non_embedding_params": count_non_embedding_parameters(teacher)}
    if teacher_module is not None:
        st = r.stage("teacher", kind="teacher", config={"teacher": plain(cfg.teacher)}, seed=int(cfg.seed))
        teacher_module.model.train().requires_grad_(True)  # the SALT modules froze it when they were built
        start = time.perf_counter()
        st.fit(teacher_module, teacher_dm, callbacks=extra, max_steps=cfg.teacher.steps, **fit_args)
        teacher_info["train_seconds"] = time.perf_counter() - start
        teacher_info["steps"] = int(cfg.teacher.steps)
        teacher_info["curve"] = val_curve(st.dir)
        teacher_info["final_val_loss"] = teacher_info["curve"][-1][1] if teacher_info["curve"] else None
        st.finish({k: v for k, v in teacher_info.items() if k != "curve"})
        teacher = teacher_module.model
        teacher_path = str(st.dir / "model.pt")
        for _, module in built.values():
            if module.teacher is not None:
                module.set_teacher(teacher, teacher_path)
    print(f"[salt] teacher: {teacher_info['params']:,} parameters ({teacher_info['non_embedding_params']:,} "
          f"non-embedding), final val loss {teacher_info.get('final_val_loss')}")

    results: dict[str, dict[str, Any]] = {}
    kd = int(cfg.kd.steps)
    for method, (dm, module) in built.items():
        st = r.stage(method, kind="method", config={"method": method, "kd_steps": module.hparams.kd_steps,
                                                     "kd_weight": module.hparams.kd_weight,
                                                     "student": plain(cfg.student), "select": plain(cfg.select)},
                     seed=int(cfg.seed))
        result: dict[str, Any] = {"kd_steps": module.hparams.kd_steps,
                                  "kd_weight": module.hparams.kd_weight if module.hparams.kd_steps else 0.0}
        if method == "salt_ds":
            def select(dm=dm) -> dict[str, torch.Tensor]:
                start = time.perf_counter()
                selected = dm.select(teacher)
                return {"selected": selected, "pool": dm.pool, "scores": dm.scores,
                        "cache_hit": torch.tensor(bool(dm.cache_hit)),
                        "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}

            sel = st.cached("selection", select)
            dm.selected, dm.pool, dm.scores = sel["selected"], sel["pool"], sel["scores"]
            module.hparams.selected_fraction = dm.selected_fraction
            result.update(selected=int(sel["selected"].numel()), pool=int(sel["pool"].numel()),
                          train_sequences=len(dm.datasets["train"]), select_pool=dm.select_pool,
                          score_cache_hit=bool(sel["cache_hit"]), score_seconds=float(sel["seconds"]),
                          unscored=int(sel["scores"].isnan().sum()))
        stream = dm.batch_stream(int(cfg.train.steps))
        acc = dm.accumulate
        result.update(stream_stage1=stream_fingerprint(stream[:kd * acc]),
                      stream_stage2=stream_fingerprint(stream[kd * acc:]))
        start = time.perf_counter()
        st.fit(module, dm, callbacks=extra, max_steps=cfg.train.steps, **fit_args)
        result["train_seconds"] = time.perf_counter() - start
        curve = val_curve(st.dir)
        result.update(student_params=sum(p.numel() for p in module.model.parameters()),
                      student_non_embedding_params=count_non_embedding_parameters(module.model), curve=curve)
        if curve:
            result["final_val_loss"] = curve[-1][1]
            result["final_val_ppl"] = math.exp(curve[-1][1])
        if teacher_info.get("final_val_loss") is not None:
            result["teacher_margin_in_kd_window"] = teacher_margin(curve, teacher_info["final_val_loss"], kd)
        st.finish({k: v for k, v in result.items() if k != "curve"})
        results[method] = result
        print(f"[salt] {method}: final val loss {result.get('final_val_loss')}, {result['train_seconds']:.0f} s",
              flush=True)
    if "baseline" in results and "final_val_loss" in results["baseline"]:
        target = results["baseline"]["final_val_loss"]
        for res in results.values():
            res["steps_to_baseline_final"] = steps_to_reach(res["curve"], target)
            if res["steps_to_baseline_final"] is not None:
                res["fraction_of_baseline_steps"] = res["steps_to_baseline_final"] / cfg.train.steps
    plot_curves(r, results, teacher_info, kd)
    r.save_table("results", ["method", "final_val_loss", "final_val_ppl", "steps_to_baseline_final", "train_seconds"],
                 [[m, res.get("final_val_loss"), res.get("final_val_ppl"), res.get("steps_to_baseline_final"),
                   res["train_seconds"]] for m, res in results.items()])
    r.save_table("val_curves", ["method", "step", "val_loss"],
                 [[m, s, v] for m, res in results.items() for s, v in res["curve"]]
                 + [["teacher", s, v] for s, v in teacher_info.get("curve", [])])
    any_student = next(iter(results.values()), {})
    return {"methods": results, "teacher": teacher_info, "teacher_params": teacher_info["params"],
            "non_embedding_ratio": (teacher_info["non_embedding_params"] / any_student["student_non_embedding_params"]
                                    if any_student else None),
            "seed": cfg.seed, "train_steps": cfg.train.steps, "kd_steps": cfg.kd.steps,
            "student_module": plain(cfg.student.module), "select": plain(cfg.select), "world_size": world}


if __name__ == "__main__":
    main("salt", run)
