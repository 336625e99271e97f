import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lit_cascades.runner import ConfigError, run_recipe
from recipes.bipartite_ranking import _source_shorthand, run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_preset_through_the_entry_point(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "recipes.bipartite_ranking", "preset=smoke", "data=digits",
                           f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["labels"] == ["even", "high"]
    points = metrics["sweep_weights"]["points"]
    assert [(p["aggregation"], p["weight"]) for p in points] == [("loss", 0.3), ("label", 0.3), ("loss", 0.7),
                                                                 ("label", 0.7)]
    for p in points:
        assert 0.0 <= p["auc_min"] <= p["auc_mean"] <= 1.0
        assert p["auc_min"] == pytest.approx(min(p["auc_even"], p["auc_high"]))
    rows = list(csv.DictReader(open(out / "pareto_even_vs_high.csv")))
    assert len(rows) == 4 and float(rows[0]["auc_even"]) == pytest.approx(points[0]["auc_even"])
    assert (out / "pareto_even_vs_high.png").stat().st_size > 1000
    assert (out / "checkpoints" / "loss_w0.3_seed0" / "final.ckpt").exists()


def _table(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3))
    df = pd.DataFrame({"f0": x[:, 0], "f1": x[:, 1], "kind": rng.choice(["a", "b"], 600),
                       "helpful": np.where(x[:, 0] + rng.normal(size=600) > 0, "yes", "no"),
                       "correct": (x[:, 1] + rng.normal(size=600) > 1).astype(int)})
    path = tmp_path / "my.csv"
    df.to_csv(path, index=False)
    return path


def test_csv_source_compares_both_aggregations(tmp_path):
    path = _table(tmp_path)
    argv = _source_shorthand(["preset=smoke", "data=csv", f"data.path={path}", "data.labels=[helpful,correct]",
                              "sweep=none", "model.epochs=30", "data.batch_size=64", f"output_dir={tmp_path / 'run'}"])
    r, metrics = run_recipe("bipartite_ranking", run, argv)
    assert set(metrics) >= {"data", "loss_aggregation", "label_aggregation"}
    assert metrics["data"]["labels"] == ["helpful", "correct"]
    for obj in ("loss_aggregation", "label_aggregation"):
        assert 0.5 < metrics[obj]["auc_helpful"] <= 1.0  # the first feature carries the first label
    rows = list(csv.DictReader(open(r.dir / "results.csv")))
    assert [row["objective"] for row in rows] == ["loss_aggregation", "label_aggregation"]
    assert (r.dir / "auc_by_objective.png").exists()


def test_bad_data_config_fails_clearly_without_metrics(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"data=csv needs data.path"):
        run_recipe("bipartite_ranking", run, _source_shorthand(["preset=smoke", "data=csv", f"output_dir={out}"]))
    assert not (out / "metrics.json").exists()
    path = _table(tmp_path)
    with pytest.raises(ValueError, match=r"columns \['clicked'\] not found.*columns found"):
        run_recipe("bipartite_ranking", run, _source_shorthand(
            ["preset=smoke", "data=csv", f"data.path={path}", "data.labels=[helpful,clicked]", f"output_dir={out}"]))
    assert not (out / "metrics.json").exists()
