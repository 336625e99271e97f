"""USTAD: one encoder for cross-encoder ranking and dual-encoder retrieval, and distilled students
(Kim et al., ICML 2024).

    python -m recipes.ustad                                   # embedded stdlib code search, MiniLM, CPU minutes
    python -m recipes.ustad model=separate                    # separate CE and DE encoders, same budget
    python -m recipes.ustad stage=distill student=asymmetric  # distil a small query encoder from the teacher
    python -m recipes.ustad stage=distill distill.teacher_checkpoint=runs/ustad/<run>/checkpoints/teacher/final.ckpt
    python -m recipes.ustad data=msmarco data.root=/path/to/msmarco   # MS MARCO passage files
    python -m recipes.ustad --help                            # presets, config groups and every key

1. build the data (the log names the source and the split sizes);
2. train the teacher (``model=ustad``: one encoder, CE + DE losses; ``model=separate``: two encoders), or load
   it from ``distill.teacher_checkpoint``; test it: DE retrieval over the whole test corpus, and CE reranking
   of the DE top-``rerank_depth``;
3. ``stage=distill``: train the student from the teacher, and (``distill.baseline``) the same student without
   the teacher; test both (DE retrieval);
4. write retrieval.csv (one row per model and scorer, with parameter counts) and metrics.json.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lit_cascades.data.retrieval import RetrievalDataModule
from lit_cascades.functional.retrieval import metric_names
from lit_cascades.modules.ustad import USTAD, USTADStudent, describe_parameters, load_teacher_state
from lit_cascades.runner import ConfigError, Run, main


def _section(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _scores(logged: dict[str, float], stage: str, kind: str, names: list[str]) -> dict[str, float]:
    return {n: logged[f"{stage}/retrieval/{kind}/{n}"] for n in names}


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.stage not in ("teacher", "distill"):
        raise ConfigError(f"stage must be 'teacher' or 'distill'; got {cfg.stage!r}")
    dm = RetrievalDataModule(**_section(cfg.data), seed=cfg.seed)
    dm.setup()
    print(f"[ustad] data: {dm.description}")
    recall_ks = list(cfg.eval.recall_ks)
    names = metric_names(recall_ks)

    teacher = USTAD(model=cfg.model, recall_ks=recall_ks, **_section(cfg.teacher))
    ckpt = cfg.distill.teacher_checkpoint if cfg.stage == "distill" else None
    if ckpt:
        load_teacher_state(teacher, torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
        print(f"[ustad] teacher loaded from {ckpt}")
    else:
        r.fit("teacher", teacher, dm, max_epochs=cfg.train.epochs)
    logged = r.test("teacher_test", teacher, dm)
    params = describe_parameters(teacher)
    label = "USTAD (one encoder)" if cfg.model == "ustad" else "separate CE + DE"
    results: dict[str, Any] = {"teacher": {"model": cfg.model, "params": params,
                                           "de": _scores(logged, "test", "de", names)}}
    rows = [[label, "DE retrieval", params["total"], params["trainable"],
             *(round(v, 4) for v in results["teacher"]["de"].values())]]
    if teacher.hparams.rerank_depth:
        results["teacher"]["rerank"] = _scores(logged, "test", "rerank", names)
        rows.append([label, f"DE top-{teacher.hparams.rerank_depth} + CE rerank", params["total"], params["trainable"],
                     *(round(v, 4) for v in results["teacher"]["rerank"].values())])

    if cfg.stage == "distill":
        kwargs = _section(cfg.distill)
        kwargs.pop("teacher_checkpoint")
        baseline = kwargs.pop("baseline")
        variants = [("student", kwargs)]
        if baseline:
            variants.append(("student_no_teacher", {**kwargs, "alpha_score": 0.0, "beta_emb": 0.0}))
        for name, kw in variants:
            student = USTADStudent(teacher, student=cfg.student, recall_ks=recall_ks, **kw)
            r.fit(name, student, dm, max_epochs=cfg.train.student_epochs)
            logged = r.test(f"{name}_test", student, dm)
            sp = describe_parameters(student)
            online = describe_parameters(student.query_encoder)
            results[name] = {"student": cfg.student, "params": sp, "online_params": online,
                             "de": _scores(logged, "test", "de", names)}
            title = f"{cfg.student} student" + (" (no teacher)" if name != "student" else " (distilled)")
            rows.append([title, "DE retrieval", sp["total"], sp["trainable"],
                         *(round(v, 4) for v in results[name]["de"].values())])
        t_mrr = results["teacher"]["de"]["mrr@10"]
        if t_mrr > 0:
            results["student"]["mrr@10_vs_teacher_de"] = results["student"]["de"]["mrr@10"] / t_mrr
    r.save_table("retrieval", ["model", "scorer", "params", "trainable_params", *names], rows)
    return {"data": {"description": dm.description,
                     **{f"n_{k}_queries": len(s.query_ids) for k, s in dm.splits.items()},
                     **{f"n_{k}_docs": len(s.doc_ids) for k, s in dm.splits.items()}},
            "stage": cfg.stage, **results}


if __name__ == "__main__":
    main("ustad", run)
