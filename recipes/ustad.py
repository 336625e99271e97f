"""USTAD: one encoder for cross-encoder ranking and dual-encoder retrieval, and distilled students
(Kim et al., ICML 2024).

    python -m recipes.ustad                                   # embedded stdlib code search, MiniLM, CPU minutes
    python -m recipes.ustad teacher.model=separate            # separate CE and DE encoders, same budget
    python -m recipes.ustad stage=distill                     # also distil a small query encoder from the teacher
    python -m recipes.ustad stage=distill student.student=symmetric   # a symmetric student
    python -m recipes.ustad stage=distill distill.teacher_checkpoint=runs/ustad/<run>/teacher/model.pt
    python -m recipes.ustad data=msmarco data.root=/path/to/msmarco   # MS MARCO passage files
    python -m recipes.ustad teacher._target_=my_pkg.MyUSTAD   # a subclass (e.g. another DE pooling)
    python -m recipes.ustad --help                            # presets, config groups and every key

Components are built from their config sections (``_target_`` plus constructor arguments): ``data`` (a
:class:`~lit_cascades.data.RetrievalDataModule`; the recipe supplies ``seed``), ``teacher`` (a
:class:`~lit_cascades.modules.USTAD`), ``student`` (a :class:`~lit_cascades.modules.USTADStudent`; the recipe
supplies ``teacher``) and ``callbacks`` (extra Lightning callbacks for every fit). Before any training the
recipe sets up the data, builds the teacher, loads ``distill.teacher_checkpoint`` (with ``weights_only=True``)
and builds every student from the (untrained) teacher, so a bad value stops the run at once
(``error: <key>: ...``, exit status 2). The students are built again from the trained teacher.

Stages (one directory each, with ``config.yaml``, ``metrics.json``, ``model.pt`` and ``logs/{fit,test}``):

1. ``teacher``: train the teacher (``teacher.model=ustad``: one encoder, CE + DE losses; ``separate``: two
   encoders), or load it from ``distill.teacher_checkpoint`` (no fit); test it: DE retrieval over the whole test
   corpus, and CE reranking of the DE top-``teacher.rerank_depth``;
2. ``stage=distill``: ``student`` (kind ``distillation``) trains the student from the teacher, and
   ``student_no_teacher`` (kind ``student``, with ``distill.baseline``) the same student without the teacher
   (``alpha_score = beta_emb = 0``); both are tested (DE retrieval);
3. ``retrieval.csv`` (one row per model and scorer, with parameter counts) and ``metrics.json`` in the run dir.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from lit_cascades.data import RetrievalDataModule
from lit_cascades.functional.retrieval import metric_names
from lit_cascades.io import safe_torch_load
from lit_cascades.modules.ustad import USTAD, USTADStudent, describe_parameters, load_teacher_state
from lit_cascades.runner import ConfigError, Run, build, build_list, config_errors, main

STAGES = ("teacher", "distill")
#: the student trained without its teacher: the distillation losses switched off
NO_TEACHER = {"alpha_score": 0.0, "beta_emb": 0.0}


def _section(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _scores(logged: dict[str, float], kind: str, names: list[str]) -> dict[str, float]:
    return {n: logged[f"test/retrieval/{kind}/{n}"] for n in names}


def load_teacher_checkpoint(teacher: USTAD, path: str) -> None:
    """Load a teacher's weights from ``path``: a state dict (``<run>/teacher/model.pt``) or a Lightning
    checkpoint (its ``state_dict``), read with ``weights_only=True``. Errors are ``distill.teacher_checkpoint``."""
    key = "distill.teacher_checkpoint"
    with config_errors(key):
        state = safe_torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no state dict (expected a teacher/model.pt or a Lightning .ckpt)", key=key)
    try:
        load_teacher_state(teacher, state)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:400]
        raise ConfigError(f"{path} does not fit the configured teacher (same teacher.* settings as the run that "
                          f"trained it?): {first}", key=key) from None


def build_student(cfg: DictConfig, teacher: USTAD, variant: str) -> USTADStudent:
    """The ``student`` section's student of ``teacher``; ``variant="student_no_teacher"`` without distillation."""
    node = {**_section(cfg.student), **(NO_TEACHER if variant == "student_no_teacher" else {})}
    student = build(node, "student", teacher=teacher)
    if not isinstance(student, USTADStudent):
        raise ConfigError(f"expected a USTADStudent subclass; got {type(student).__qualname__}", key="student._target_")
    return student


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    # -- build and check everything before any work ----------------------------------------------------
    if cfg.stage not in STAGES:
        raise ConfigError(f"expected one of {', '.join(STAGES)}; got {cfg.stage!r}", key="stage")
    if int(cfg.train.epochs) < 0:
        raise ConfigError(f"expected an integer >= 0 (0: test the untrained teacher); got {cfg.train.epochs}",
                          key="train.epochs")
    if int(cfg.train.student_epochs) < 1:
        raise ConfigError(f"expected an integer >= 1; got {cfg.train.student_epochs}", key="train.student_epochs")
    teacher = build(cfg.teacher, "teacher")
    if not isinstance(teacher, USTAD):
        raise ConfigError(f"expected a USTAD subclass; got {type(teacher).__qualname__}", key="teacher._target_")
    distill = cfg.stage == "distill"
    ckpt = cfg.distill.teacher_checkpoint if distill else None
    if ckpt:
        load_teacher_checkpoint(teacher, str(ckpt))
        print(f"[ustad] teacher loaded from {ckpt}")
    variants = ["student", *(["student_no_teacher"] if cfg.distill.baseline else [])] if distill else []
    for variant in variants:  # check the student section against a copy of the teacher (a student freezes its
        build_student(cfg, copy.deepcopy(teacher), variant)  # teacher); the students are rebuilt after its fit
    callbacks = lambda: build_list(cfg.get("callbacks"), "callbacks")  # noqa: E731  (fresh objects per fit)
    callbacks()
    dm = build(cfg.data, "data", seed=int(cfg.seed))  # last: reading the data is the slow part of the checks
    if not isinstance(dm, RetrievalDataModule):
        raise ConfigError(f"expected a RetrievalDataModule subclass; got {type(dm).__qualname__}", key="data._target_")
    with config_errors("data", names=list(cfg.data)):
        dm.setup()
    print(f"[ustad] data: {dm.description}")
    names = metric_names(list(teacher.hparams.recall_ks))
    show = bool(cfg.trainer.get("enable_progress_bar", True))

    # -- teacher ---------------------------------------------------------------------------------------
    st = r.stage("teacher", kind="teacher", config={"teacher": _section(cfg.teacher), "data": _section(cfg.data),
                                                    "epochs": int(cfg.train.epochs), "checkpoint": ckpt})
    if not ckpt and int(cfg.train.epochs) > 0:  # train.epochs=0: the zero-shot teacher
        st.fit(teacher, dm, callbacks=callbacks(), max_epochs=int(cfg.train.epochs))
    logged = st.test(teacher, dm, enable_progress_bar=show)  # evaluation encodes the corpus, reranks: a bar
    params = describe_parameters(teacher)
    model = teacher.hparams.model
    label = "USTAD (one encoder)" if model == "ustad" else "separate CE + DE"
    results: dict[str, Any] = {"teacher": {"model": model, "params": params, "de": _scores(logged, "de", names)}}
    rows = [[label, "DE retrieval", params["total"], params["trainable"],
             *(round(v, 4) for v in results["teacher"]["de"].values())]]
    if teacher.hparams.rerank_depth:
        results["teacher"]["rerank"] = _scores(logged, "rerank", names)
        rows.append([label, f"DE top-{teacher.hparams.rerank_depth} + CE rerank", params["total"], params["trainable"],
                     *(round(v, 4) for v in results["teacher"]["rerank"].values())])
    st.finish(results["teacher"])

    # -- students --------------------------------------------------------------------------------------
    kind_name = cfg.student.student
    for variant in variants:
        overrides = NO_TEACHER if variant == "student_no_teacher" else {}
        st = r.stage(variant, kind="distillation" if variant == "student" else "student",
                     config={"student": {**_section(cfg.student), **overrides}, "data": _section(cfg.data),
                             "epochs": int(cfg.train.student_epochs), "teacher_checkpoint": ckpt})
        pl.seed_everything(st.seed, workers=True, verbose=False)  # the same initial student on a resumed run
        student = build_student(cfg, teacher, variant)
        st.fit(student, dm, callbacks=callbacks(), max_epochs=int(cfg.train.student_epochs))
        logged = st.test(student, dm, enable_progress_bar=show)
        sp = describe_parameters(student)
        results[variant] = {"student": kind_name, "params": sp, "online_params": describe_parameters(student.query_encoder),
                            "de": _scores(logged, "de", names)}
        st.finish(results[variant])
        title = f"{kind_name} student" + (" (distilled)" if variant == "student" else " (no teacher)")
        rows.append([title, "DE retrieval", sp["total"], sp["trainable"],
                     *(round(v, 4) for v in results[variant]["de"].values())])
    if distill and results["teacher"]["de"]["mrr@10"] > 0:
        results["student"]["mrr@10_vs_teacher_de"] = results["student"]["de"]["mrr@10"] / results["teacher"]["de"]["mrr@10"]
    r.save_table("retrieval", ["model", "scorer", "params", "trainable_params", *names], rows)
    return {"data": {"description": dm.description,
                     **{f"n_{k}_queries": len(s.query_ids) for k, s in dm.splits.items()},
                     **{f"n_{k}_docs": len(s.doc_ids) for k, s in dm.splits.items()}},
            "stage": cfg.stage, **results}


if __name__ == "__main__":
    main("ustad", run)
