"""The committed results of the Gatekeeper, bipartite-ranking, USTAD, TASK-former and LM-cascade docs: every raw file parses, holds at
least 3 seeds per reported configuration, and every table in ``docs/results/<paper>/`` is exactly what the
results script's table function makes from the raw file (so a table cannot be edited by hand)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import (
    results_bipartite,
    results_gatekeeper,
    results_gatekeeper_lm,
    results_lm_cascade,
    results_taskformer,
    results_ustad,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"bipartite": results_bipartite, "ustad": results_ustad, "taskformer": results_taskformer,
           "lm_cascade": results_lm_cascade, "gatekeeper_lm": results_gatekeeper_lm}


def _raw(paper: str) -> dict:
    path = ROOT / "docs" / "results" / paper / "raw.json"
    assert path.is_file(), f"{path} is missing: run python -m benchmarks.results_{paper}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("paper", list(SCRIPTS))
def test_raw_file_has_provenance(paper: str) -> None:
    raw = _raw(paper)
    for key in ("command", "commit", "seeds", "machine"):
        assert raw.get(key), f"{paper}: raw.json has no {key}"
    assert raw["command"].startswith(f"python -m benchmarks.results_{paper}")
    assert len(raw["commit"]) == 40 and int(raw["commit"], 16) >= 0
    assert "loadavg_1_5_15" in raw["machine"]


def test_bipartite_every_experiment_has_three_seeds() -> None:
    raw = _raw("bipartite")
    assert set(results_bipartite.DEFAULT_EXPERIMENTS) <= set(raw["experiments"]) <= set(results_bipartite.EXPERIMENTS)
    for name, exp in raw["experiments"].items():
        assert exp["command"].startswith("python -m recipes.bipartite_ranking")
        groups: dict[tuple, set[int]] = {}
        for s in exp["stages"]:
            key = (s.get("objective"), s.get("aggregation"), s.get("weight"), s.get("prior"))
            groups.setdefault(key, set()).add(s["seed"])
            assert 0.0 <= s["auc_min"] <= 1.0
        assert groups, name
        assert all(len(seeds) >= 3 for seeds in groups.values()), f"{name}: a configuration with < 3 seeds"


def test_ustad_runs_have_three_seeds() -> None:
    ustad = _raw("ustad")
    for run in ("ustad", "separate"):
        assert len({r["seed"] for r in ustad["runs"] if r["run"] == run}) >= 3, run


def test_ustad_runs_are_recipe_runs() -> None:
    for r in _raw("ustad")["runs"]:
        assert r["command"].startswith("python -m recipes.ustad")
        assert 0.0 <= r["metrics"]["teacher"]["de"]["mrr@10"] <= 1.0


def test_taskformer_runs_have_three_seeds() -> None:
    tf = _raw("taskformer")
    configs = {r["config"] for r in tf["runs"]}
    assert {"TASK-former", "text only (baseline)", "sketch only (baseline)"} <= configs
    for c in configs:
        assert len({r["seed"] for r in tf["runs"] if r["config"] == c}) >= 3, c
    for r in tf["runs"]:
        assert r["command"].startswith("python -m recipes.taskformer")


def test_lm_cascade_runs_have_three_seeds_and_a_quality_gap() -> None:
    raw = _raw("lm_cascade")
    assert len({s["seed"] for s in raw["per_seed"]}) >= 3
    for s in raw["per_seed"]:
        assert s["run"]["command"].startswith("python -m recipes.lm_cascade preset=results")
        assert set(results_lm_cascade.CHOW) | set(results_lm_cascade.POST_HOC) <= set(s["rules"])
        assert s["task"]["large_quality"] > s["task"]["small_quality"]  # the pair has a gap to defer into
        assert all(0.0 <= r["auc_df"] <= 1.0 for r in s["rules"].values())


def test_gatekeeper_lm_runs_have_three_seeds_and_the_baseline() -> None:
    raw = _raw("gatekeeper_lm")
    assert len({s["seed"] for s in raw["per_seed"]}) >= 3
    for s in raw["per_seed"]:
        assert s["run"]["command"].startswith("python -m recipes.gatekeeper_lm preset=sweep")
        variants = set(s["variants"])
        assert {"pretrained", results_gatekeeper_lm.BASELINE} <= variants
        assert len([v for v in variants if v.startswith("gatekeeper_a")]) >= 3
        for name, v in s["variants"].items():
            if name != "pretrained":
                assert 0.0 <= v["token_small_quality"] <= 1.0 and -1.0 <= v["token_s_d"] <= 1.0


@pytest.mark.parametrize("paper", list(SCRIPTS))
def test_tables_regenerate_from_raw(paper: str) -> None:
    made = SCRIPTS[paper].tables(_raw(paper))
    folder = ROOT / "docs" / "results" / paper
    on_disk = {p.name for p in folder.glob("*.md")}
    assert set(made) == on_disk, f"{paper}: tables made {sorted(made)} vs committed {sorted(on_disk)}"
    for name, text in made.items():
        assert (folder / name).read_text() == text, f"docs/results/{paper}/{name} differs from its raw file"


@pytest.mark.parametrize("data", results_gatekeeper.DATA)
def test_gatekeeper_tables_regenerate_from_raw(data: str) -> None:
    raw = _raw(f"gatekeeper_{data}")
    assert {r["seed"] for r in raw["rows"]} >= {0, 1, 2}
    assert (ROOT / "docs" / "results" / f"gatekeeper_{data}" / "table.md").read_text() == \
        results_gatekeeper.table_md(raw, data), f"docs/results/gatekeeper_{data}/table.md differs from its raw file"


def test_gatekeeper_paired_cells_match_the_raw_rows() -> None:
    """One paired row of the Fashion-MNIST sweep recomputed from the raw rows with scipy (not the table helpers)."""
    from scipy import stats

    rows = _raw("gatekeeper_fashion_mnist")["rows"]
    by = {m: {r["seed"]: r["s_d"] for r in rows if r["method"] == m}
          for m in ("gatekeeper α=0.1", "cross-entropy fine-tune")}
    d = [by["gatekeeper α=0.1"][s] - by["cross-entropy fine-tune"][s] for s in sorted(by["gatekeeper α=0.1"])]
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d), scale=stats.sem(d))
    row = next(line for line in (ROOT / "docs/results/gatekeeper_fashion_mnist/table.md").read_text().splitlines()
               if line.startswith("| gatekeeper α=0.1 | +"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == " / ".join(f"{x:+.3f}" for x in d)
    assert cells[3] == f"[{lo:+.3f}, {hi:+.3f}]"
    same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
    assert cells[4] == ("beyond seed spread" if same_sign and abs(statistics.fmean(d)) > 2 * statistics.stdev(d)
                        else "noise")


def test_table_means_match_raw_values() -> None:
    """An independent recomputation of one cell per paper (not through the scripts' formatting helpers)."""
    raw = _raw("taskformer")
    vals = [100 * r["test"]["text+sketch"]["recall@1"] for r in raw["runs"] if r["config"] == "TASK-former"]
    cell = f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}"
    row = next(line for line in (ROOT / "docs/results/taskformer/table.md").read_text().splitlines()
               if line.startswith("| TASK-former | text+sketch |"))
    assert row.split(" | ")[3] == cell

    raw = _raw("bipartite")
    loa = [s["auc_min"] for s in raw["experiments"]["digits"]["stages"] if s.get("objective") == "loss_aggregation"]
    row = next(line for line in (ROOT / "docs/results/bipartite/table.md").read_text().splitlines()
               if line.startswith("| digits") and "| LoA |" in line)
    assert row.split(" | ")[4] == f"{statistics.fmean(loa):.3f} ± {statistics.stdev(loa):.3f}"


def test_paired_interval_cells_match_scipy() -> None:
    """The 95% interval column of the USTAD paired table, recomputed from the raw runs with scipy's t interval."""
    from scipy import stats

    raw = _raw("ustad")
    by = {run: {r["seed"]: r["metrics"]["teacher"]["rerank"]["mrr@10"] for r in raw["runs"] if r["run"] == run}
          for run in ("ustad", "separate")}
    d = [by["ustad"][s] - by["separate"][s] for s in sorted(by["ustad"]) if s in by["separate"]]
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d), scale=stats.sem(d))
    row = next(line for line in (ROOT / "docs/results/ustad/table.md").read_text().splitlines()
               if line.startswith("| DE+CE MRR@10 |"))
    assert row.split(" | ")[4].rstrip(" |") == f"[{lo:+.3f}, {hi:+.3f}]"


@pytest.mark.parametrize(("paper", "drop"), [
    ("ustad", lambda r: r["run"] == "separate" and r["seed"] == min(s["seed"] for s in _raw("ustad")["runs"])),
    ("taskformer", lambda r: r["config"] == "sketch only (baseline)" and r["seed"] == 0),
])
def test_a_seed_missing_on_one_side_fails_the_table(paper: str, drop) -> None:
    """Paired tables pair by seed and never silently drop one: with a baseline seed removed the table raises
    (before, it reported the effect over the remaining seeds under a header naming all of them)."""
    raw = _raw(paper)
    kept = [r for r in raw["runs"] if not drop(r)]
    assert len(kept) < len(raw["runs"])
    with pytest.raises(ValueError, match="expected the same seeds on both sides"):
        SCRIPTS[paper].tables({**raw, "runs": kept})


def test_feature_drafter_screen_table_regenerates_from_raw() -> None:
    """The single-seed screen behind ``lm_pair preset=smollm2_feature_drafter_xl``: every variant of the script
    has its run's command, wall time and agreements, and the committed table is what the script makes of them."""
    from benchmarks import results_feature_drafter as screen

    raw = json.loads((ROOT / "docs" / "results" / "feature_drafter" / "raw.json").read_text())
    assert set(raw["variants"]) == set(screen.VARIANTS)
    assert len(raw["git_commit"]) == 40 and raw["machine"]
    for name, v in raw["variants"].items():
        assert v["command"] == " ".join(["python", "-m", "recipes.lm_pair", *screen.BASE, *screen.VARIANTS[name][1],
                                         f"output_dir=runs/results_feature_drafter/{name}"])
        assert v["wall_seconds"] > 0 and 0 < v["test_agreement"] <= 1
        assert set(v["val_agreement"]) == {"160", "320"}
        dec = v["decoding"]  # depth agreements and greedy acceptance of the variant's drafter
        assert len(dec["depth_agreement"]) == 4 and all(0 <= a <= 1 for a in dec["depth_agreement"])
        assert 0 <= dec["accepted"] <= dec["drafted"] and dec["acceptance_rate"] == dec["accepted"] / dec["drafted"]
    made = screen.tables(raw)
    assert set(made) == {p.name for p in (ROOT / "docs" / "results" / "feature_drafter").glob("*.md")}
    for name, text in made.items():
        assert (ROOT / "docs" / "results" / "feature_drafter" / name).read_text() == text


def test_feature_drafter_depth_table_regenerates_from_raw() -> None:
    """Agreement by draft depth of the SmolLM2 feature drafters: provenance, agreements in [0, 1] for every depth,
    and the committed table is what the script makes of the raw file."""
    from benchmarks import feature_drafter_depth as depth

    folder = ROOT / "docs" / "results" / "feature_drafter_depth"
    raw = json.loads((folder / "raw.json").read_text())
    assert raw["command"].startswith("python -m benchmarks.feature_drafter_depth")
    assert len(raw["git_commit"]) == 40 and raw["machine"] and raw["positions"] == raw["blocks"] * 4 * 128
    assert set(raw["presets"]) <= set(depth.PRESETS) and raw["presets"]
    for r in raw["presets"].values():
        assert len(r["agreement"]) == depth.DEPTHS and all(0 <= a <= 1 for a in r["agreement"])
    made = depth.tables(raw)
    assert set(made) == {p.name for p in folder.glob("*.md")}
    for name, text in made.items():
        assert (folder / name).read_text() == text
