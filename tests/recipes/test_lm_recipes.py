"""Smoke presets of the LM recipes through their real entry points, asserting on the files they write."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CHOW = {"chow_sum", "chow_average", "chow_quantile_0", "chow_quantile_0.25", "chow_quantile_0.5"}


def run_recipe(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"recipes.{name}", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_rule_metrics(m: dict) -> None:
    assert 0.0 <= m["auc_df"] <= 1.0
    assert 0.0 <= m["quality_at_rate"] <= 1.0


@pytest.mark.slow
def test_lm_pair_smoke_saves_a_reloadable_pair(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run_recipe("lm_pair", "preset=smoke", f"output_dir={out}", f"publish_dir={tmp_path / 'latest'}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["small"]["params"] < metrics["large"]["params"]
    assert metrics["vocab_size"] == 384 and metrics["small"]["steps"] == 30
    for role in ("small", "large"):
        assert math.isfinite(metrics[role]["test_loss"]) and metrics[role]["test_loss"] < math.log(384)
        assert (out / "checkpoints" / role / "final.ckpt").exists()
    info = json.loads((out / "pair" / "pair.json").read_text())
    assert info["corpus"]["max_docs"] == 24
    for pair_dir in (out / "pair", tmp_path / "latest"):
        tok = AutoTokenizer.from_pretrained(pair_dir / "tokenizer")
        model = AutoModelForCausalLM.from_pretrained(pair_dir / "large")
        ids = tok("import os\n", return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_lm_cascade_smoke_compares_every_rule(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    run_recipe("lm_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"]["n_train"] == 24 and metrics["task"]["n_test"] == 24
    for key in ("small_quality", "large_quality"):
        assert 0.0 <= metrics["task"][key] <= 1.0
    rules = metrics["rules"]
    assert CHOW <= set(rules)
    for features in ("quantile", "embed1", "embed1+2"):
        assert f"post_hoc_{features}_seed0" in rules and rules[f"post_hoc_{features}"]["seeds"] == [0]
    for m in rules.values():
        check_rule_metrics(m)
    # every rule is compared on the same generations: the random line is the same for all of them
    assert len({round(m.get("auc_random", -1), 9) for m in rules.values() if "auc_random" in m}) == 1
    table = list(csv.reader(open(out / "deferral_lm_cascade_test.csv")))
    assert table[0][:5] == ["rate", "small_only", "large_only", "random", "ideal"]
    assert set(table[0][5:]) == {k for k in rules if "seed" in k or k.startswith("chow")}
    assert len(table) == 24 + 2
    assert (out / "deferral_lm_cascade_test.png").stat().st_size > 5000
    rows = list(csv.DictReader(open(out / "rules.csv")))
    assert {r["rule"] for r in rows} == set(table[0][5:])
    records = torch.load(out / "records_test.pt", weights_only=False)
    assert records["small_logprobs"].shape == (24, 12) and len(records["small_text"]) == 24
    assert torch.equal(records[f"small_{metrics['task']['quality']}"].float().mean(),
                       torch.tensor(metrics["task"]["small_quality"], dtype=torch.float32))


@pytest.mark.slow
def test_gatekeeper_lm_smoke_builds_its_pair_and_compares_finetunes(tmp_path):
    out = tmp_path / "run"
    run_recipe("gatekeeper_lm", "preset=smoke", f"output_dir={out}")
    assert (out / "lm_pair" / "pair" / "pair.json").exists()  # no pair given: built with lm_pair preset=smoke
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pretrained", "next_token", "gatekeeper_a0.5"} <= set(metrics)
    for variant in ("next_token", "gatekeeper_a0.5"):
        m = metrics[variant]
        assert CHOW == set(m["rules"])
        assert 0.0 <= m["small_quality"] <= 1.0
        assert 0.0 <= m["token_small_quality"] <= 1.0 and 0.0 <= m["token_auroc"] <= 1.0
        assert (out / "checkpoints" / variant / "final.ckpt").exists()
        assert (out / f"deferral_{variant}_test.csv").exists()
        assert (out / "token_level" / f"deferral_{variant}_val.png").exists()
        for rule in m["rules"].values():
            check_rule_metrics(rule)
    rows = list(csv.DictReader(open(out / "variants.csv")))
    assert len(rows) == 3 * len(CHOW)
