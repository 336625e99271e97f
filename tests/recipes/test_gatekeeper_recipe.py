import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_preset_through_the_real_entry_point(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.gatekeeper", "preset=smoke", f"output_dir={out}", "gatekeeper.alpha=0.3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"large", "small_ce", "gatekeeper", "ce_finetune"}
    for stage in ("small_ce", "gatekeeper", "ce_finetune"):
        m = metrics[stage]
        for key in ("test_acc", "auroc", "auc_df", "s_o", "quality_at_rate"):
            assert 0.0 <= m[key] <= 1.0, (stage, key, m[key])
        assert m["auc_random"] == pytest.approx((m["small_quality"] + m["large_quality"]) / 2)
        assert -5 < m["s_d"] < 5
    assert metrics["data"]["n_train"] == 300
    rows = list(csv.reader(open(out / "deferral_curves.csv")))
    assert rows[0] == ["rate", "small_only", "large_only", "random", "ideal", "cross-entropy",
                       "gatekeeper (α=0.3)", "cross-entropy fine-tune"]
    assert len(rows) == metrics["data"]["n_test"] + 2
    assert (out / "deferral_curves.png").stat().st_size > 5000
    for stage in ("large", "small", "gatekeeper", "ce_finetune"):
        assert (out / "checkpoints" / stage / "final.ckpt").exists()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "alpha: 0.3" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_bad_key_fails_fast_without_outputs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.gatekeeper", "gatekeeper.alfa=0.3", f"output_dir={tmp_path / 'x'}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "valid keys under 'gatekeeper': alpha" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sweep_smoke_writes_the_seed_table(tmp_path):
    from lit_cascades.runner import run_recipe
    from recipes.gatekeeper import run

    out = tmp_path / "sweep"
    _, metrics = run_recipe("gatekeeper", run, ["preset=sweep_smoke", f"output_dir={out}"])
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    methods = ["cross-entropy", "gatekeeper α=0.1", "gatekeeper α=0.9", "cross-entropy fine-tune"]
    assert [(r["method"], int(r["seed"])) for r in rows] == [(m, s) for s in (0, 1) for m in methods]
    for method in methods:
        values = [float(r["s_d"]) for r in rows if r["method"] == method]
        mean, std = metrics["summary"][method]["s_d"]
        assert mean == pytest.approx(sum(values) / 2)
        assert std == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    table = (out / "sweep_table.md").read_text()
    assert "| gatekeeper α=0.9 |" in table and "seeds [0, 1]" in table
    assert (out / "sweep.png").stat().st_size > 5000
