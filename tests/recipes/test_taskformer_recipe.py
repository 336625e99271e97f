"""The TASK-former recipe through its real entry point: the smoke preset on constructed scenes, and COCO files
written by the test selected with ``data=coco`` (text-only baseline)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_cascades.runner import load_config
from tests.data.test_coco import write_tiny_coco

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"


def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "recipes.taskformer", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def _check_recalls(test, query_types):
    assert set(test) == set(query_types)
    for qt, m in test.items():
        assert 0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1, qt
        assert m["recall@1"] <= m["mrr@10"] <= m["recall@10"], qt


@pytest.mark.slow
def test_smoke_preset_through_the_real_entry_point(tmp_path):
    out = tmp_path / "run"
    proc = _run(["preset=smoke", f"output_dir={out}", "model.share_encoders=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[taskformer] data: constructed scenes (not natural images)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["n_train"] == 192 and metrics["data"]["n_test"] == 48
    assert metrics["query"] == "text+sketch" and metrics["params"] > 0
    _check_recalls(metrics["test"], ["text+sketch", "text", "sketch"])
    rows = list(csv.reader(open(out / "retrieval.csv")))
    assert rows[0] == ["query", "recall@1", "recall@5", "recall@10", "mrr@10"]
    assert {r[0] for r in rows[1:]} == {"text+sketch", "text", "sketch"}
    for r in rows[1:]:
        assert float(r[2]) == pytest.approx(metrics["test"][r[0]]["recall@5"], abs=1e-4)
    assert (out / "retrieval_examples.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "taskformer" / "final.ckpt").exists()
    logs = list(csv.DictReader(open(out / "logs" / "taskformer" / "metrics.csv")))
    assert any(row.get("val/retrieval/text+sketch/recall@1") for row in logs)
    assert any(row.get("train/contrastive") for row in logs)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "share_encoders: true" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_coco_files_text_only_baseline(tmp_path):
    root = write_tiny_coco(tmp_path / "coco", n_train=24, n_val=24)
    out = tmp_path / "run"
    proc = _run(["preset=smoke", "data=coco", f"data.root={root}", "data.image_size=32", "data.num_val=12",
                 "data.num_test=12", "data.batch_size=8", "data.num_workers=0", "data.vocab_min_count=1",
                 "query=text", "eval.recall_ks=[1,5]", f"output_dir={out}", "logger.wandb=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[taskformer] data: COCO 2014 captions" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["query"] == "text" and metrics["data"]["num_classes"] == 3
    assert set(metrics["test"]) == {"text"}
    m = metrics["test"]["text"]
    assert 0 <= m["recall@1"] <= m["recall@5"] <= 1
    assert (out / "retrieval_examples.png").exists()


def test_presets_compose():
    cfg, _ = load_config("taskformer", ["preset=coco", "data.root=/data/coco"], CONFIGS)
    assert cfg.data.source == "coco" and cfg.data.root == "/data/coco" and cfg.data.image_size == 224
    assert cfg.model.image_encoder.startswith("clip:") and cfg.model.image_encoder_kwargs is None
    assert cfg.model.w_contrastive == 100 and cfg.model.w_classification == 10 and cfg.model.w_caption == 1
    cfg, _ = load_config("taskformer", ["preset=text_only"], CONFIGS)
    assert cfg.query == "text" and cfg.data.source == "scenes"
    cfg, _ = load_config("taskformer", ["query=sketch", "data=coco"], CONFIGS)
    assert cfg.query == "sketch" and cfg.data.source == "coco" and cfg.model.image_encoder == "cnn"


@pytest.mark.slow
def test_missing_coco_root_fails_without_metrics(tmp_path):
    out = tmp_path / "run"
    proc = _run(["preset=smoke", "data=coco", f"data.root={tmp_path / 'nowhere'}", f"output_dir={out}",
                 "logger.wandb=false"], timeout=300)
    assert proc.returncode != 0
    assert "COCO root" in proc.stderr and "annotations/" in proc.stderr
    assert not (out / "metrics.json").exists()
