"""The benchmark helpers: interleaved timing reports the right per-alternation ratios, the memory helper
measures a known allocation, stays non-negative and stable, and never hangs on a stuck child."""

from __future__ import annotations

import statistics
import time

import pytest

from benchmarks import _common as common

MIB = 1024 * 1024


class FakeClock:
    """A clock the timed functions advance by known amounts, with a log of who ran when."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def cost(self, name: str, costs: list[float]):
        it = iter(costs)

        def fn() -> None:
            self.log.append(name)
            self.now += next(it)

        return fn


def test_interleaved_ratios_with_a_fake_clock():
    clock = FakeClock()
    warm, alt = 2, 6
    a_costs = [9.0] * warm + [1.0, 2.0, 1.0, 4.0, 1.0, 1.0]
    b_costs = [9.0] * warm + [2.0, 3.0, 5.0, 4.0, 1.5, 2.0]
    out = common.interleaved_ratios({"a": clock.cost("a", a_costs), "b": clock.cost("b", b_costs)}, baseline="a",
                                    alternations=alt, warmup=warm, clock=clock)
    # warm-up in order, then alternations with the order reversed every other time
    assert clock.log == ["a", "b"] * warm + ["a", "b", "b", "a"] * (alt // 2)
    assert out["seconds"]["a"] == a_costs[warm:] and out["seconds"]["b"] == b_costs[warm:]
    expected = [b / a for a, b in zip(a_costs[warm:], b_costs[warm:], strict=True)]  # 2, 1.5, 5, 1, 1.5, 2
    r = out["ratios"]["b"]
    assert r["per_alternation"] == pytest.approx(expected)
    assert r["median"] == pytest.approx(1.75) and r["min"] == pytest.approx(1.0) and r["max"] == pytest.approx(5.0)
    # the ratio of best times would say 1.5; the per-alternation median is what is reported
    assert out["median_s"]["a"] == pytest.approx(1.0)
    assert "a" not in out["ratios"]


def test_inner_repeats_divide_the_block_time():
    clock = FakeClock()
    out = common.interleaved_times({"a": clock.cost("a", [2.0] * 9)}, alternations=3, warmup=0, inner=3, clock=clock)
    assert out["a"] == pytest.approx([2.0, 2.0, 2.0])


def test_interleaved_ratios_with_real_sleeps():
    out = common.interleaved_ratios({"short": lambda: time.sleep(0.01), "long": lambda: time.sleep(0.03)},
                                    baseline="short", alternations=10, warmup=1)
    assert out["alternations"] == 10 and len(out["ratios"]["long"]["per_alternation"]) == 10
    assert 2.0 < out["ratios"]["long"]["median"] < 3.5  # sleep overshoot makes the ratio a little below 3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="baseline"):
        common.summarize_ratios({"a": [1.0]}, baseline="b")
    with pytest.raises(ValueError, match="alternations"):
        common.interleaved_times({"a": lambda: None}, alternations=0)
    with pytest.raises(ValueError, match="empty"):
        common.interleaved_times({})



def test_flop_ratios_count_matrix_products_by_hand():
    import torch

    a, b, w = torch.randn(8, 16), torch.randn(16, 32), torch.randn(8, 16, requires_grad=True)

    def one_mm() -> None:  # 2 * 8 * 16 * 32 flops
        a @ b

    def mm_forward_backward() -> None:  # forward + grad of w (the grad of b is not needed): 2 matmuls
        (w @ b).sum().backward()

    def elementwise() -> None:  # not counted
        (a * 2).exp()

    out = common.flop_ratios({"mm": one_mm, "fwd_bwd": mm_forward_backward, "ew": lambda: (elementwise(), one_mm())},
                             baseline="mm")
    assert out["gflop"]["mm"] == pytest.approx(2 * 8 * 16 * 32 / 1e9)
    assert out["ratios"] == {"fwd_bwd": 2.0, "ew": 1.0}
    with pytest.raises(ValueError, match="baseline"):
        common.flop_ratios({"mm": one_mm}, baseline="other")
    with pytest.raises(ValueError, match="no counted operations"):
        common.flop_ratios({"ew": elementwise}, baseline="ew")

def _alloc_100mib():
    import torch

    def fn():
        x = torch.ones(100 * MIB // 4, dtype=torch.float32)  # touch every page
        return float(x[-1])

    return fn


def _alloc_nothing():
    return lambda: sum(range(100))


def _hang():
    def fn():
        time.sleep(3600)

    return fn


def _fail():
    raise KeyError("broken setup")


@pytest.mark.slow
def test_peak_memory_of_a_known_allocation_is_stable():
    out = common.peak_memory_mib(_alloc_100mib, repeats=5)
    assert all(v >= 0 for v in out["values"])
    assert out["median"] == pytest.approx(100, abs=10)
    assert out["max"] - out["min"] < 5  # stable across fresh processes
    small = common.peak_memory_mib(_alloc_nothing, repeats=3)
    assert 0 <= small["max"] < 5
    assert statistics.median(small["values"]) == small["median"]


@pytest.mark.slow
def test_peak_memory_child_that_hangs_times_out():
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        common.peak_extra_memory_mb(_hang, timeout=8)
    assert time.monotonic() - t < 30


def test_peak_memory_child_error_is_reported():
    with pytest.raises(RuntimeError, match="broken setup"):
        common.peak_extra_memory_mb(_fail, timeout=60)


def test_run_writes_json_with_load(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    run = common.Run("demo")
    row = common.target_row("x / y", 1.0, {"median": 0.9, "min": 0.8, "max": 1.2})
    path = run.write({"value": 1}, [row])
    data = json.loads(path.read_text())
    assert data["value"] == 1 and len(data["load"]["loadavg_start"]) == 3 and data["targets"][0]["pass"] is True
    assert data["machine"]["torch"]


def test_summary_table_is_generated_from_the_json_files(tmp_path, monkeypatch):
    from benchmarks import summary

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    for name, median in (("gatekeeper_step", 1.2), ("deferral_metrics", 0.5)):
        run = common.Run(name)
        run.write({"timing": {"alternations": 10, "ratios": {}}},
                  [common.target_row(f"{name} ratio", 1.0, {"median": median, "min": median - 0.1,
                                                             "max": median + 0.1})])
    text = summary.render(summary.load_results())
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `gatekeeper_step` | gatekeeper_step ratio | ≤ 1.00 | 1.200 | 1.100–1.300 | **no** | 10")
    assert rows[1].startswith("| `deferral_metrics` | deferral_metrics ratio | ≤ 1.00 | 0.500 | 0.400–0.600 | yes")
    cpu = summary.cpu_name(summary.load_results()["gatekeeper_step"])
    assert cpu and "(R)" not in cpu and all(row.endswith(f"| {cpu} |") for row in rows)
    assert summary.cpu_name({"machine": {"cpu": "Intel(R) Xeon(R) Processor"}}) == "Intel Xeon"
    assert summary.cpu_name({"machine": {"cpu": "AMD EPYC 7B13 64-Core Processor"}}) == "AMD EPYC 7B13 64-Core"
    assert summary.main(["--check"]) == 1  # no table yet
    assert summary.main([]) == 0
    assert summary.main(["--check"]) == 0
    (tmp_path / "table.md").write_text("stale\n")
    assert summary.main(["--check"]) == 1


def _fake_recipe(calls: list):
    """A ``subprocess.run`` stand-in that "runs" a recipe by writing its run directory."""
    import json
    import subprocess
    from pathlib import Path

    def run(argv, **kwargs):
        out = common.ROOT / next(a for a in argv if a.startswith("output_dir=")).split("=", 1)[1]
        calls.append(out)
        Path(out).mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"git_commit": "abc"}))
        (out / "metrics.json").write_text(json.dumps({"run": len(calls)}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    return run


def test_run_recipe_dir_reuses_reruns_and_refuses_unfinished(tmp_path, monkeypatch):
    import json

    calls: list = []
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common.subprocess, "run", _fake_recipe(calls))
    out = tmp_path / "runs" / "seed0"
    info = common.run_recipe_dir("recipes.fake", ["seed=0"], out)
    assert len(calls) == 1 and info["command"] == "python -m recipes.fake seed=0 output_dir=runs/seed0"
    (out / "stale.txt").write_text("from the first run")
    common.run_recipe_dir("recipes.fake", ["seed=0"], out)  # finished: reused, not run again
    assert len(calls) == 1
    common.run_recipe_dir("recipes.fake", ["seed=0"], out, rerun=True)  # replaced: nothing of the old run stays
    assert len(calls) == 2 and not (out / "stale.txt").exists()
    assert json.loads((out / "metrics.json").read_text()) == {"run": 2}
    (out / "metrics.json").unlink()  # an interrupted run is never removed, with or without rerun
    for rerun in (False, True):
        with pytest.raises(SystemExit, match="exists without metrics.json"):
            common.run_recipe_dir("recipes.fake", ["seed=0"], out, rerun=rerun)
    assert (out / "run.json").exists() and len(calls) == 2


def test_write_tables_writes_each_file_and_reports_it(tmp_path, capsys):
    paths = common.write_tables(tmp_path / "new", {"table.md": "| a |\n", "other.md": "x\n"})
    assert [p.name for p in paths] == ["table.md", "other.md"]
    assert (tmp_path / "new" / "table.md").read_text() == "| a |\n" and (tmp_path / "new" / "other.md").read_text() == "x\n"
    assert capsys.readouterr().out.splitlines() == [f"wrote {p}" for p in paths]


def test_spread_keeps_the_raw_values_under_the_name_given():
    assert common.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "values": [3.0, 1.0, 2.0]}
    assert common.spread([1.0, 4.0], "per_round") == {"median": 2.5, "min": 1.0, "max": 4.0, "per_round": [1.0, 4.0]}
    assert common.spread([1.0, 4.0], raw=None) == {"median": 2.5, "min": 1.0, "max": 4.0}


def test_load_text_prefers_start_and_end():
    assert common.load_text({"load": {"loadavg_start": [0.74, 0, 0], "loadavg_end": [1.0, 0, 0]}}) == "0.7 → 1.0"
    assert common.load_text({"load": {"loadavg_end": [1.26, 0, 0]}}) == "1.3"
    assert common.load_text({}) == "n/a"
