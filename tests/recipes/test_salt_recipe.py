"""The SALT recipe's smoke preset through its real entry point, asserting on the files it writes."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tests.recipes.test_lm_recipes import run_recipe


@pytest.mark.slow
def test_salt_smoke_runs_the_three_methods_and_plots_them(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    run_recipe("salt", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}",
               f"select.cache_dir={tmp_path / 'cache'}")
    m = json.loads((out / "metrics.json").read_text())
    methods = m["methods"]
    assert set(methods) == {"baseline", "salt", "salt_ds"}
    for name, res in methods.items():
        assert [s for s, _ in res["curve"]] == [4, 8, 12]
        assert math.isfinite(res["final_val_loss"]) and res["final_val_loss"] < math.log(384)
        assert res["final_val_ppl"] == pytest.approx(math.exp(res["final_val_loss"]))
        assert res["student_params"] > m["teacher_params"] > 0
        assert res["kd_steps"] == (0 if name == "baseline" else 6)
        ckpt = torch.load(out / "checkpoints" / name / "final.ckpt", map_location="cpu", weights_only=False)
        assert all(k.startswith("model.") for k in ckpt["state_dict"])  # the student only
    assert methods["baseline"]["steps_to_baseline_final"] == 12
    ds = methods["salt_ds"]
    assert ds["selected"] == round(0.5 * ds["train_sequences"]) and not ds["score_cache_hit"]
    assert len(list((tmp_path / "cache").glob("salt_scores-*.pt"))) == 1
    # logged components: KD only during the first 6 steps, stage 1 then 2, selected fraction 0.5 for SALT_DS
    rows = list(csv.DictReader(open(out / "logs" / "salt_ds" / "metrics.csv")))
    train = [r for r in rows if r["train/stage"]]
    assert {int(r["step"]) < 6 for r in train if float(r["train/stage"]) == 1.0} == {True}
    assert all(float(r["train/selected_fraction"]) == pytest.approx(0.5, abs=1e-3) for r in train
               if float(r["train/stage"]) == 1.0)
    assert all(r["train/kd"] == "nan" for r in train if float(r["train/stage"]) == 2.0)
    assert any(r["val/ppl"] for r in rows)
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in table] == ["baseline", "salt", "salt_ds"]
    assert (out / "val_loss.png").stat().st_size > 5000
