"""``benchmarks.reproduce``: reruns of published benchmarks, compared figure by figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import reproduce

# A stand-in benchmark: writes one target row and one nested ratio through benchmarks._common.Run (so the rerun's
# output directory comes from LIT_CASCADES_BENCHMARK_DIR), or fails when asked to.
FAKE = '''
import sys
from benchmarks._common import Run, target_row

args = dict(a.split("=") for a in sys.argv[1:])
if args.get("fail"):
    raise SystemExit("asked to fail")
ratio = {"median": float(args["median"]), "min": float(args["median"]) - 0.1, "max": float(args["median"]) + 0.1}
Run("fakebench").write({"timing": {"ratios": {"side": ratio}}, "memory": {"median": 5.0, "min": 5.0, "max": 5.0}},
                       [target_row("side / baseline", 1.0, {"median": 0.5, "min": 0.4, "max": 0.6})])
'''


@pytest.fixture
def fakebench(tmp_path: Path, monkeypatch) -> None:
    """The stand-in benchmark, importable as ``fakebench`` by the rerun's child process."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "fakebench.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(pkg))


def _payload(command: str = "python -m fakebench median=1.0") -> dict:
    return {"benchmark": "fakebench", "command": command, "started_utc": "2026-01-01T00:00:00+00:00",
            "git_commit": "abc", "load": {"loadavg_start": [0.5, 0, 0], "loadavg_end": [1.0, 0, 0]},
            "targets": [{"what": "side / baseline", "unit": "time", "target": 1.0, "median": 0.5, "min": 0.4,
                         "max": 0.6, "pass": True}],
            "timing": {"ratios": {"side": {"median": 1.0, "min": 0.9, "max": 1.1}}},
            "memory": {"median": 5.0, "min": 5.0, "max": 5.0}}


def test_figures_names_target_rows_and_nested_ratios_once() -> None:
    payload = _payload()
    payload["results"] = {"dup": {"median": 0.5, "min": 0.4, "max": 0.6}, "text": {"median": "n/a"},
                          "again": {"median": 1.0, "min": 0.9, "max": 1.1}}  # timing/ratios/side under a 2nd name
    figs = reproduce.figures(payload)
    assert figs == {"side / baseline": {"median": 0.5, "min": 0.4, "max": 0.6, "target": 1.0},
                    "timing/ratios/side": {"median": 1.0, "min": 0.9, "max": 1.1},
                    "memory": {"median": 5.0, "min": 5.0, "max": 5.0}}


def test_reproduces_is_the_published_spread_widened_by_the_tolerance() -> None:
    pub = {"median": 1.0, "min": 0.9, "max": 1.2}
    assert reproduces_at(pub, 0.9) and reproduces_at(pub, 1.2) and reproduces_at(pub, 1.0)
    assert reproduces_at(pub, 0.891) and not reproduces_at(pub, 0.889)  # 1% of the median = 0.01 below min
    assert reproduces_at(pub, 1.209) and not reproduces_at(pub, 1.211)
    assert not reproduces_at(pub, 1.209, tolerance=0.0)
    tight = {"median": 480.0, "min": 479.99, "max": 480.01}  # memory repeats: KiB apart
    assert reproduces_at(tight, 482.0) and not reproduces_at(tight, 490.0)


def reproduces_at(pub: dict, median: float, tolerance: float = reproduce.TOLERANCE) -> bool:
    return reproduce.reproduces(pub, {"median": median, "min": median, "max": median}, tolerance)


def test_compare_keeps_shared_figures_and_both_target_verdicts() -> None:
    pub, new = _payload(), _payload()
    new["targets"][0].update(median=1.3, min=1.2, max=1.4)
    del new["memory"]  # a part the rerun's command did not run
    rows = {r["figure"]: r for r in reproduce.compare(pub, new)}
    assert set(rows) == {"side / baseline", "timing/ratios/side"}
    target = rows["side / baseline"]
    assert (target["reproduces"], target["verdict_published"], target["verdict_rerun"]) == (False, True, False)
    assert rows["timing/ratios/side"]["reproduces"] and "verdict_published" not in rows["timing/ratios/side"]


@pytest.mark.slow
def test_rerun_runs_the_published_command_elsewhere_and_records_the_comparison(tmp_path: Path, fakebench) -> None:
    published = tmp_path / "published"
    published.mkdir()
    (published / "fakebench.json").write_text(json.dumps(_payload("python -m fakebench median=1.5")))
    before = (published / "fakebench.json").read_text()

    dest = reproduce.rerun("fakebench", published_dir=published, timeout_s=120)
    assert (published / "fakebench.json").read_text() == before  # the published file is untouched
    assert dest.parent == published / "reruns" and dest.name.startswith("fakebench-")
    record = json.loads(dest.read_text())
    assert record["timing"]["ratios"]["side"]["median"] == 1.5  # the rerun's own output, argv passed through
    rep = record["reproduction"]
    assert rep["published"]["started_utc"] == "2026-01-01T00:00:00+00:00"
    rows = {r["figure"]: r["reproduces"] for r in rep["figures"]}
    assert rows == {"side / baseline": True, "timing/ratios/side": False, "memory": True}

    table = reproduce.render(published / "reruns")
    assert "| `fakebench` | timing/ratios/side | 1.000 (0.900–1.100) | 1.500 (1.400–1.600) | **no** |" in table
    assert "| `fakebench` | side / baseline | 0.500 (0.400–0.600) | 0.500 (0.400–0.600) | yes | meets → meets |" in table
    assert "Figures that reproduce: 2 of 3." in table and "†" not in table
    newer = {**_payload("python -m fakebench median=1.5"), "started_utc": "2026-02-01T00:00:00+00:00"}
    (published / "fakebench.json").write_text(json.dumps(newer))  # the benchmark published again since
    table = reproduce.render(published / "reruns")
    assert "| `fakebench` | timing/ratios/side | 1.000 (0.900–1.100) † | 1.500 (1.400–1.600) | **no** |" in table
    assert "† the published run this rerun was compared with has since been replaced" in table
    (published / "fakebench.json").write_text(before)

    other = reproduce.rerun("fakebench", published_dir=published, timeout_s=120,
                            command="python -m fakebench median=1.0")  # a command other than the recorded one
    assert other != dest and dest.exists()  # the first record is kept
    record = json.loads(other.read_text())["reproduction"]
    assert record["command"].endswith("-m fakebench median=1.0")
    assert {r["figure"]: r["reproduces"] for r in record["figures"]}["timing/ratios/side"] is True
    with pytest.raises(SystemExit):
        reproduce.main(["a", "b", "--command", "python -m fakebench"])


@pytest.mark.slow
def test_a_failed_rerun_records_nothing_and_names_the_cause(tmp_path: Path, fakebench) -> None:
    (tmp_path / "fakebench.json").write_text(json.dumps(_payload("python -m fakebench median=1 fail=1")))
    with pytest.raises(RuntimeError, match="exit status 1") as info:
        reproduce.rerun("fakebench", published_dir=tmp_path, timeout_s=120)
    assert "asked to fail" in str(info.value)  # the tail of the rerun's output
    assert not (tmp_path / "reruns").exists()
    with pytest.raises(FileNotFoundError, match="no published results for 'nope'"):
        reproduce.rerun("nope", published_dir=tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"benchmark": "old"}))
    with pytest.raises(ValueError, match="old.json records no command"):
        reproduce.rerun("old", published_dir=tmp_path)


def test_the_committed_reproduction_table_is_generated_from_the_reruns() -> None:
    assert reproduce.main(["--check"]) == 0, "run python -m benchmarks.reproduce --table"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["sequence_scores", "--n", "300", "--t", "8", "--alternations", "2"],
    ["ranking_pairwise", "--batch", "64", "--loop-rows", "4", "--draws", "3", "--repeats", "1", "--alternations", "2"],
    ["taskformer_gallery", "--gallery", "300", "--queries", "8", "--encode", "64", "--eval-batch", "32",
     "--repeats", "2"],
])
def test_benchmarks_record_a_rerunnable_command_and_spread_figures(argv, tmp_path: Path) -> None:
    """Every benchmark writes through Run (its command, so `reproduce` can rerun it) and reports its ratios as
    median with min–max (so a rerun can be compared)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LIT_CASCADES_BENCHMARK_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", f"benchmarks.{argv[0]}", *argv[1:]], cwd=Path(reproduce.__file__).parents[1],
                   env=env, check=True, capture_output=True, timeout=600)
    payload = json.loads((tmp_path / f"{argv[0]}.json").read_text())
    assert reproduce.published_command(argv[0], payload) == ["-m", f"benchmarks.{argv[0]}", *argv[1:]]
    figs = reproduce.figures(payload)
    assert figs and all(f["min"] <= f["median"] <= f["max"] for f in figs.values())
    ratios = [name for name in figs if "ratio" in name or "speedup" in name]
    assert ratios, f"no ratio among the figures: {sorted(figs)}"
