"""Smoke presets of the LM recipes (lm_pair, lm_cascade, gatekeeper_lm) through the runner, asserting on the run
directories they write, and config errors that stop a run before any work."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

CHOW = {"chow_sum", "chow_average", "chow_quantile_0", "chow_quantile_0.25", "chow_quantile_0.5"}


def run_lm_recipe(name: str, *args: str):
    """``run_recipe`` of ``recipes.<name>`` in this process; returns ``(run, metrics)``."""
    import importlib

    from lit_cascades.runner import run_recipe

    module = importlib.import_module(f"recipes.{name}")
    return run_recipe(name, module.run, list(args))


def config_error(name: str, capsys, *args: str) -> str:
    """Run ``recipes.<name>``'s command line; assert exit status 2 and one ``error:`` line (the last on stderr)."""
    import importlib

    from lit_cascades.runner import main

    module = importlib.import_module(f"recipes.{name}")
    with pytest.raises(SystemExit) as exc:
        main(name, module.run, list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # loading bars of transformers may come first
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err[-3:]
    return errors[0]


def check_rule_metrics(m: dict) -> None:
    assert 0.0 <= m["auc_df"] <= 1.0
    assert 0.0 <= m["quality_at_rate"] <= 1.0


def check_pair_quality(small: float, large: float) -> None:
    """The tiny pair's next-line token F1 is not degenerate: an empty or unstopped byte-salad answer scores 0, the
    large model completes lines (0.18-0.19 on the smoke prompts) and beats the small one (about 0.02)."""
    assert large > 0.1, large
    assert large > small + 0.05, (small, large)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_lm_pair_smoke_saves_a_reloadable_pair(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run_lm_recipe("lm_pair", "preset=smoke", f"output_dir={out}", "logger.wandb=false")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["small"]["params"] < saved["large"]["params"]
    assert saved["vocab_size"] == 1024 and saved["small"]["steps"] == 300
    for role in ("small", "large"):
        assert math.isfinite(saved[role]["test_loss"]) and saved[role]["test_loss"] < math.log(1024) - 1.0
        for f in ("metrics.json", "config.yaml", "model.pt", "logs/fit/metrics.csv", "logs/test/metrics.csv"):
            assert (out / role / f).exists(), f
    info = json.loads((out / "pair" / "pair.json").read_text())
    assert info["corpus"]["max_docs"] == 24
    tok = AutoTokenizer.from_pretrained(out / "pair" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(out / "pair" / "large")
    ids = tok("import os\n", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "run"}  # nothing written elsewhere


@pytest.mark.slow
def test_lm_cascade_smoke_compares_every_rule(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    run_lm_recipe("lm_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"]["n_train"] == 24 and metrics["task"]["n_test"] == 24
    for key in ("small_quality", "large_quality"):
        assert 0.0 <= metrics["task"][key] <= 1.0
    check_pair_quality(metrics["task"]["small_quality"], metrics["task"]["large_quality"])
    assert metrics["task"]["large_better_rate"] >= 0.25  # a deferral rule has something to find
    rules = metrics["rules"]
    assert CHOW <= set(rules)
    for features in ("quantile", "embed1", "embed1+2"):
        assert f"post_hoc_{features}_seed0" in rules and rules[f"post_hoc_{features}"]["seeds"] == [0]
        stage = out / "post_hoc" / f"{features.replace('+', '_')}_seed0"
        assert (stage / "model.pt").exists() and (stage / "logs" / "fit" / "metrics.csv").exists()
    for m in rules.values():
        check_rule_metrics(m)
    table = list(csv.reader(open(out / "evaluate" / "deferral_lm_cascade_test.csv")))
    assert table[0][:5] == ["rate", "small_only", "large_only", "random", "ideal"]
    assert set(table[0][5:]) == {k for k in rules if "seed" in k or k.startswith("chow")}
    assert len(table) == 24 + 2
    assert {r["rule"] for r in csv.DictReader(open(out / "rules.csv"))} == set(table[0][5:])
    from lit_cascades.io import safe_torch_load

    records = safe_torch_load(out / "generate" / "test" / "records.pt")
    assert records["small_logprobs"].shape == (24, 12) and len(records["small_text"]) == 24
    assert float(records["small_token_f1"].float().mean()) == pytest.approx(metrics["task"]["small_quality"])


@pytest.mark.slow
def test_lm_cascade_generation_is_per_run(tmp_path, tiny_pair_dir):
    """A second run with fewer prompts generates its own records (nothing is reused across runs)."""
    _, m = run_lm_recipe("lm_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={tmp_path / 'a'}",
                         "task.num_test=8", "task.num_train=8", "post_hoc.enabled=false")
    assert m["task"]["n_test"] == 8 and m["task"]["n_train"] == 8


@pytest.mark.slow
def test_gatekeeper_lm_smoke_compares_finetunes(tmp_path, tiny_pair_dir):
    out = tmp_path / "run"
    run_lm_recipe("gatekeeper_lm", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pretrained", "next_token", "gatekeeper_a0.5"} <= set(metrics)
    check_pair_quality(metrics["pretrained"]["small_quality"], metrics["large_quality"])
    for variant in ("next_token", "gatekeeper_a0.5"):
        m = metrics[variant]
        assert CHOW == set(m["rules"])
        assert 0.0 <= m["small_quality"] <= 1.0
        assert 0.0 <= m["token_small_quality"] <= 1.0 and 0.0 <= m["token_auroc"] <= 1.0
        assert (out / "finetune" / variant / "model.pt").exists()
        assert (out / "finetune" / variant / f"deferral_{variant}_val.png").exists()
        assert (out / "evaluate" / variant / f"deferral_{variant}_test.csv").exists()
        for rule in m["rules"].values():
            check_rule_metrics(rule)
    assert len(list(csv.DictReader(open(out / "variants.csv")))) == 3 * len(CHOW)


def test_lm_recipes_reject_bad_values_before_work(tmp_path, tiny_pair_dir, capsys):
    pair = f"pair.path={tiny_pair_dir}"
    cases = [
        ("lm_cascade", ["cascade.quality=foo"], "error: cascade.quality:"),
        ("lm_cascade", ["task.num_test=0"], "error: task.num_test:"),
        ("lm_cascade", ["+post_hoc.module.depth=3"], "error: post_hoc.module.depth: not an argument of"),
        ("gatekeeper_lm", ["finetune.module.normalize=foo"], "error: finetune.module.normalize:"),
        ("lm_pair", ["+small.model.width=3"], "error: small.model.width: not an argument of"),
    ]
    for i, (name, args, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        line = config_error(name, capsys, "preset=smoke", pair if name != "lm_pair" else "seed=0",
                            f"output_dir={out}", *args)
        assert line.startswith(expected), line
        assert not out.exists()


def test_missing_pair_is_a_config_error(tmp_path, capsys):
    line = config_error("lm_cascade", capsys, f"pair.path={tmp_path / 'nope'}", "pair.build_preset=null",
                        f"output_dir={tmp_path / 'run'}")
    assert line.startswith("error: pair.path: no LM pair")
    assert not Path(tmp_path / "run").exists()


@pytest.mark.slow
def test_lm_cascade_runs_a_post_hoc_subclass(tmp_path, tiny_pair_dir):
    """``post_hoc.module._target_`` swaps in a user's subclass; its own argument is added with ``+``."""
    from lit_cascades.io import safe_torch_load

    out = tmp_path / "run"
    _, m = run_lm_recipe("lm_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}",
                         "task.num_train=8", "task.num_test=8", "post_hoc.feature_sets=[quantile]",
                         "post_hoc.module._target_=tests.helpers.TemperedPostHocDeferral",
                         "+post_hoc.module.temperature=0.5")
    state = safe_torch_load(out / "post_hoc" / "quantile_seed0" / "model.pt")
    assert float(state["temperature"]) == 0.5  # the subclass's buffer: it was built, with the configured value
    assert set(m["rules"]) == CHOW | {"post_hoc_quantile_seed0", "post_hoc_quantile"}
    check_rule_metrics(m["rules"]["post_hoc_quantile_seed0"])


@pytest.mark.slow
def test_lm_cascade_resume_reloads_generation_and_fits(tmp_path, tiny_pair_dir, monkeypatch):
    """``resume=<run dir>`` replays the recipe: generation records and post-hoc weights are reloaded from the
    stage directories (generating or fitting again would raise here) and the results are the same."""
    import lightning.pytorch as pl

    import recipes.lm_cascade
    from lit_cascades.modules.lm_cascade import LMCascade

    out = tmp_path / "run"
    run_lm_recipe("lm_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    first = json.loads((out / "metrics.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must reload this, not recompute it")

    monkeypatch.setattr(LMCascade, "predict_step", refuse)
    monkeypatch.setattr(recipes.lm_cascade, "generate_records", refuse)
    monkeypatch.setattr(pl.Trainer, "fit", refuse)
    run_lm_recipe("lm_cascade", f"resume={out}")
    again = json.loads((out / "metrics.json").read_text())
    assert again["run"]["run_id"] == first["run"]["run_id"]
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in first.items() if k != "run"}
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
