"""The USTAD recipe through its real entry point: the smoke preset with the distillation stage on the embedded
stdlib task, and the separate-models baseline on MS MARCO files written by the test (``data=msmarco``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_cascades.runner import load_config
from tests.data.test_retrieval_data import write_tiny_msmarco

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"
NAMES = ["mrr@10", "recall@1", "recall@10", "recall@100", "ndcg@10"]


def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "recipes.ustad", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def _check(m):
    assert set(m) == set(NAMES)
    assert 0 <= m["recall@1"] <= m["mrr@10"] <= m["recall@10"] <= m["recall@100"] <= 1


def test_config_groups_and_keys():
    cfg, _ = load_config("ustad", ["data=msmarco", "data.root=/x", "model=separate", "stage=distill",
                                   "student=symmetric"], CONFIGS)
    assert cfg.data.source == "msmarco" and cfg.data.root == "/x" and cfg.model == "separate"
    assert cfg.student == "symmetric" and cfg.distill.alpha_score == 1.0
    cfg, _ = load_config("ustad", ["preset=smoke"], CONFIGS)
    assert cfg.teacher.encoder == "tiny-bert" and cfg.data.source == "stdlib"


@pytest.mark.slow
def test_smoke_distill_through_the_real_entry_point(tmp_path):
    out = tmp_path / "run"
    proc = _run(["preset=smoke", "stage=distill", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ustad] data: Python stdlib code search" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["n_train_queries"] == 48 and metrics["data"]["n_test_queries"] == 24
    assert metrics["data"]["n_test_docs"] > 100  # the whole test split's corpus
    for key in ("teacher", "student", "student_no_teacher"):
        _check(metrics[key]["de"])
    _check(metrics["teacher"]["rerank"])
    assert metrics["student"]["params"]["trainable"] < metrics["teacher"]["params"]["trainable"] / 5
    rows = list(csv.reader(open(out / "retrieval.csv")))
    assert rows[0] == ["model", "scorer", "params", "trainable_params", *NAMES] and len(rows) == 5
    assert float(rows[3][4]) == pytest.approx(metrics["student"]["de"]["mrr@10"], abs=1e-4)
    for stage in ("teacher", "student", "student_no_teacher"):
        assert (out / "checkpoints" / stage / "final.ckpt").exists()
    logs = list(csv.DictReader(open(out / "logs" / "teacher" / "metrics.csv")))
    assert any(row.get("val/retrieval/de/mrr@10") for row in logs)
    assert any(row.get("val/retrieval/rerank/mrr@10") for row in logs)
    assert any(row.get("train/ce") for row in logs) and any(row.get("data/truncated/encoder_doc") for row in logs)
    logs = list(csv.DictReader(open(out / "logs" / "student" / "metrics.csv")))
    assert any(row.get("train/score_ce") for row in logs) and any(row.get("train/emb") for row in logs)
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_msmarco_files_separate_models(tmp_path):
    write_tiny_msmarco(tmp_path / "msmarco")
    out = tmp_path / "run"
    proc = _run(["preset=smoke", "data=msmarco", f"data.root={tmp_path / 'msmarco'}", "model=separate",
                 "data.batch_size=2", "data.num_workers=0", "data.max_test_queries=3", "data.max_val_queries=3",
                 "eval.recall_ks=[1,2,3]", "teacher.rerank_depth=3", "logger.wandb=false", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 3 queries have no relevant document" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["model"] == "separate" and metrics["data"]["n_test_docs"] == 8
    m = metrics["teacher"]["de"]
    assert 0 <= m["recall@1"] <= m["mrr@10"] <= m["recall@3"] <= 1
