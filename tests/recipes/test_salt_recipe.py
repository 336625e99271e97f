"""The SALT recipe's smoke preset through the runner (one shared 1-process run), a config error, and the same
metrics under ``trainer.devices=2 trainer.strategy=ddp_spawn``."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tests.lm_helpers import TINY_PAIR_DATA
from tests.recipes.test_lm_recipes import config_error, run_lm_recipe

#: DDP splits every global batch over 2 processes: the same optimisation up to float reduction order
#: (measured on CPU: at most 9.5e-7 relative, on final_val_ppl of the salt method)
DDP_RTOL = 1e-5


@pytest.fixture(scope="module")
def salt_run(tmp_path_factory, tiny_pair_dir):
    out = tmp_path_factory.mktemp("salt") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIT_CASCADES_CACHE", str(out.parent / "cache"))
        run_lm_recipe("salt", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}")
    return out


def comparable(metrics: dict) -> dict:
    """metrics.json without what differs between runs by nature (run ids, wall times, the process count)."""
    out = {k: v for k, v in metrics.items() if k not in ("run", "world_size")}
    out["teacher"] = {k: v for k, v in metrics["teacher"].items() if not k.endswith("_seconds")}
    out["methods"] = {m: {k: v for k, v in res.items() if not k.endswith("_seconds")}
                      for m, res in metrics["methods"].items()}
    return out


@pytest.mark.slow
def test_salt_smoke_trains_a_teacher_and_runs_the_four_methods_on_one_stream(salt_run):
    out = salt_run
    m = json.loads((out / "metrics.json").read_text())
    methods = m["methods"]
    assert set(methods) == {"baseline", "salt", "control", "salt_ds"}
    teacher = m["teacher"]
    assert teacher["source"] == "train" and [s for s, _ in teacher["curve"]] == [4, 8, 12]
    assert (out / "teacher" / "model.pt").exists() and (out / "teacher" / "metrics.json").exists()
    assert 0.4 <= m["non_embedding_ratio"] <= 0.6
    for name, res in methods.items():
        assert [s for s, _ in res["curve"]] == [4, 8, 12]
        assert math.isfinite(res["final_val_loss"]) and res["final_val_loss"] < math.log(TINY_PAIR_DATA["vocab_size"]) - 0.5  # learned
        assert res["final_val_ppl"] == pytest.approx(math.exp(res["final_val_loss"]))
        assert res["student_params"] > m["teacher_params"] > 0
        assert res["kd_steps"] == (0 if name == "baseline" else 4)
        for f in ("metrics.json", "config.yaml", "model.pt", "logs/fit/metrics.csv"):
            assert (out / name / f).exists(), (name, f)
        from lit_cascades.io import safe_torch_load

        assert all(k.startswith("model.") for k in safe_torch_load(out / name / "model.pt"))  # the student only
        # the trained teacher (12 steps) beats the student at every evaluation inside the KD window (step 4)
        assert res["teacher_margin_in_kd_window"] > 0
    # one batch stream: identical for baseline, SALT and the control; SALT_DS differs in stage 1 only
    base = methods["baseline"]
    for name in ("salt", "control", "salt_ds"):
        assert methods[name]["stream_stage2"] == base["stream_stage2"], name
    assert methods["salt"]["stream_stage1"] == methods["control"]["stream_stage1"] == base["stream_stage1"]
    assert methods["salt_ds"]["stream_stage1"] != base["stream_stage1"]
    # the control (teacher runs, KD weight 0) trains exactly like the baseline; SALT's KD changes the student
    assert methods["control"]["kd_weight"] == 0.0 and methods["salt"]["kd_weight"] == 0.5
    for (_, c), (_, b) in zip(methods["control"]["curve"], base["curve"]):
        assert c == pytest.approx(b, rel=1e-5)
    assert abs(methods["salt"]["curve"][0][1] - base["curve"][0][1]) > 1e-4
    assert base["steps_to_baseline_final"] == 12
    ds = methods["salt_ds"]
    # window pool: ceil(4 steps x 8 sequences / 0.5) = 64 scored, half of them selected
    assert ds["pool"] == 64 and ds["selected"] == 32 and not ds["score_cache_hit"]
    assert (out / "salt_ds" / "selection.pt").exists()
    assert not (out.parent / "cache" / "selection_scores").exists()  # score_cache=false in the smoke preset
    # logged components: KD only during the first 4 steps, stage 1 then 2, selected fraction 0.5 for SALT_DS
    rows = list(csv.DictReader(open(out / "salt_ds" / "logs" / "fit" / "metrics.csv")))
    train = [r for r in rows if r.get("train/stage")]
    assert {int(r["step"]) < 4 for r in train if float(r["train/stage"]) == 1.0} == {True}
    assert all(float(r["train/selected_fraction"]) == pytest.approx(0.5, abs=1e-3) for r in train
               if float(r["train/stage"]) == 1.0)
    assert all(r["train/kd"] == "nan" for r in train if float(r["train/stage"]) == 2.0)
    assert any(r["val/ppl"] for r in rows)
    assert [r["method"] for r in csv.DictReader(open(out / "results.csv"))] == list(methods)
    assert {r["method"] for r in csv.DictReader(open(out / "val_curves.csv"))} == {*methods, "teacher"}
    assert (out / "val_loss.png").stat().st_size > 5000


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_presets_keep_the_experiment_constraints(preset):
    """Teacher 0.4-0.6x the student's non-embedding parameters, KD for 15-25% of the steps, eval at the end."""
    from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
    from lit_cascades.modules.salt import count_non_embedding_parameters
    from lit_cascades.runner.config import load_config
    from recipes.salt import CONFIG_DIR

    cfg, _ = load_config("salt", [f"preset={preset}"], CONFIG_DIR)

    def size(section):
        m = build_causal_lm(gpt2_config(cfg.data.vocab_size, n_layer=section.n_layer, n_embd=section.n_embd,
                                        n_head=section.n_head, n_positions=section.n_positions))
        return count_non_embedding_parameters(m), sum(p.numel() for p in m.parameters())

    (t_ne, t_all), (s_ne, s_all) = size(cfg.teacher.model), size(cfg.student.model)
    assert 0.4 <= t_ne / s_ne <= 0.6
    assert t_all < s_all
    assert 0.15 <= cfg.kd.steps / cfg.train.steps <= 0.25
    assert cfg.teacher.source == "train" and cfg.teacher.steps >= cfg.train.steps
    assert cfg.train.steps % cfg.eval.val_every == 0 and cfg.kd.steps % cfg.eval.val_every == 0


def test_salt_rejects_bad_values_before_work(tmp_path, tiny_pair_dir, capsys, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "cache"))
    cases = [(["method=foo"], "error: method: unknown method"),
             (["student.module.temperature=0.0"], "error: student.module.temperature:"),
             (["kd.steps=99"], "error: kd.steps:"),
             (["teacher.source=foo"], "error: teacher.source:"),
             (["teacher.steps=0"], "error: teacher.steps:"),
             (["teacher.model.n_layer=0"], "error: teacher.model.n_layer:"),
             (["select.fraction=0.0"], "error: select.fraction:")]
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        line = config_error("salt", capsys, "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}", *args)
        assert line.startswith(expected), line
        assert not out.exists()


@pytest.mark.slow
def test_salt_ddp_spawn_gives_the_same_metrics(salt_run, tmp_path, tiny_pair_dir, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ddp"
    run_lm_recipe("salt", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}", "trainer.devices=2",
                  "trainer.strategy=ddp_spawn", "trainer.accelerator=cpu")
    one = comparable(json.loads((salt_run / "metrics.json").read_text()))
    two = comparable(json.loads((out / "metrics.json").read_text()))
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    flat_one, flat_two = _flat(one), _flat(two)
    assert flat_two.keys() == flat_one.keys()
    for key, value in flat_one.items():
        if isinstance(value, float):
            assert flat_two[key] == pytest.approx(value, rel=DDP_RTOL), key
        else:
            assert flat_two[key] == value, key


def _flat(d, prefix=""):
    """``{"a/b/0/1": number}`` of every leaf (pytest.approx does not recurse into nested dicts and lists)."""
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
    if items is None:
        return {prefix: d}
    for k, v in items:
        out.update(_flat(v, f"{prefix}/{k}"))
    return out


def test_published_salt_results_regenerate_from_raw_and_hold_three_seeds():
    """docs/results/salt: provenance, >= 3 seeds per method, the table exactly what the script makes from raw.json,
    and one cell, one verdict and one interval recomputed here independently of the script's helpers."""
    import statistics
    from pathlib import Path

    from benchmarks import results_salt

    folder = Path(__file__).resolve().parents[2] / "docs" / "results" / "salt"
    raw = json.loads((folder / "raw.json").read_text())
    for key in ("command", "commit", "seeds", "machine"):
        assert raw.get(key), key
    assert raw["command"].startswith("python -m benchmarks.results_salt") and len(raw["commit"]) == 40
    assert len(raw["seeds"]) >= 3 and sorted(r["seed"] for r in raw["runs"]) == sorted(raw["seeds"])
    for r in raw["runs"]:
        assert r["command"].startswith("python -m recipes.salt") and r["cpu_seconds"] > 0
        assert set(r["metrics"]["methods"]) == {"baseline", "salt", "control", "salt_ds"}
        assert 0.4 <= r["metrics"]["non_embedding_ratio"] <= 0.6
        assert 0.15 <= r["metrics"]["kd_steps"] / r["metrics"]["train_steps"] <= 0.25
    for name, text in results_salt.tables(raw).items():
        assert (folder / name).read_text() == text, name
    finals = [r["metrics"]["methods"]["salt"]["curve"][-1][1] for r in raw["runs"]]
    row = next(line for line in (folder / "table.md").read_text().splitlines() if line.startswith("| SALT (KD"))
    assert row.split(" | ")[1] == f"{statistics.fmean(finals):.3f} ± {statistics.stdev(finals):.3f}"
    diffs = [r["metrics"]["methods"]["salt"]["curve"][-1][1] - r["metrics"]["methods"]["baseline"]["curve"][-1][1]
             for r in raw["runs"]]
    beyond = (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)) and \
        abs(statistics.fmean(diffs)) > 2 * statistics.stdev(diffs)
    assert row.split(" | ")[4] == ("beyond seed spread" if beyond else "noise")
    from scipy import stats

    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=statistics.fmean(diffs), scale=stats.sem(diffs))
    assert row.split(" | ")[3] == f"[{lo:+.3f}, {hi:+.3f}]"
