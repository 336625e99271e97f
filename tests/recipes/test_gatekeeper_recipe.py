"""The gatekeeper recipe on the run layer: stage layout, a subclass by _target_, validation before work,
resume of a killed sweep, and DDP (2 CPU processes, ddp_spawn) against one process."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_cascades.io import safe_torch_load
from lit_cascades.runner import main, run_recipe
from recipes.gatekeeper import run

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("large", "small", "small_ce", "gatekeeper", "ce_finetune")
# swap M_L's class from the command line: the CNN's arguments removed (~), the MLP's added (+)
MLP_LARGE = ["large.model._target_=lit_cascades.models.MLP", "~large.model.width", "~large.model.depth", "~large.model.pool",
             "+large.model.hidden=[32]"]


def _results(path: Path) -> dict:
    """metrics.json without the run's identity (run id, commit, ...)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "run"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gk") / "run"
    # M_L an MLP: the DDP test compares against this run (see test_ddp_spawn_two_processes_equal_one); the NumPy
    # loss path on every machine (the default would take the C++ kernel where a build is cached)
    run_recipe("gatekeeper", run, ["preset=smoke", f"output_dir={out}", "gatekeeper.module.alpha=0.3", *MLP_LARGE,
                                   "gatekeeper.module.native_kernel=false"])
    return out


@pytest.mark.slow
def test_smoke_run_layout(smoke_run):
    out = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"run", "large", "small_ce", "gatekeeper", "ce_finetune"}
    for stage in ("small_ce", "gatekeeper", "ce_finetune"):
        m = metrics[stage]
        for key in ("test_acc", "auroc", "auc_df", "s_o", "quality_at_rate"):
            assert 0.0 <= m[key] <= 1.0, (stage, key, m[key])
        assert m["auc_random"] == pytest.approx((m["small_quality"] + m["large_quality"]) / 2)
        assert m["test_acc"] == pytest.approx(m["small_quality"])
        assert json.loads((out / stage / "metrics.json").read_text()) == m  # the stage's own record
    assert metrics["data"]["n_train"] == 300
    for stage in STAGES:
        assert (out / stage / "config.yaml").exists() and (out / stage / "metrics.json").exists()
    for stage in ("large", "small", "gatekeeper", "ce_finetune"):
        assert (out / stage / "logs" / "fit" / "metrics.csv").exists()
        assert isinstance(safe_torch_load(out / stage / "model.pt"), dict)
        assert not (out / stage / "checkpoints").exists()  # finished fits keep model.pt only
    for stage in ("small_ce", "gatekeeper", "ce_finetune"):
        test_rows = list(csv.DictReader(open(out / stage / "logs" / "test" / "metrics.csv")))
        assert "test/acc" in test_rows[0] and "test/defer/s_d" in test_rows[0]
    fit_rows = list(csv.DictReader(open(out / "gatekeeper" / "logs" / "fit" / "metrics.csv")))
    assert any(r.get("train/loss") for r in fit_rows) and any(r.get("val/defer/s_d") for r in fit_rows)
    rows = list(csv.reader(open(out / "deferral_curves.csv")))
    assert rows[0] == ["rate", "small_only", "large_only", "random", "ideal", "cross-entropy",
                       "gatekeeper (α=0.3)", "cross-entropy fine-tune"]
    assert len(rows) == metrics["data"]["n_test"] + 2
    # one offline W&B run per stage (+ the run summary), all in the run's group
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == len(STAGES) + 1
    ids = {(out / s / "wandb_id").read_text() for s in (*STAGES, "summary")}
    assert {r.name.rsplit("-", 1)[1] for r in runs} == ids
    # the printed comparison: every fine-tune's s_d and accuracy from the stages' own metrics, one seed
    text = (out / "comparison.txt").read_text()
    assert text.splitlines() == metrics["comparison"]
    for stage, method in (("gatekeeper", "gatekeeper (α=0.3)"), ("ce_finetune", "cross-entropy fine-tune")):
        line = next(ln for ln in text.splitlines() if ln.startswith(method + " "))
        assert f"{metrics[stage]['s_d']:.3f} ± 0.000" in line and f"{metrics[stage]['test_acc']:.3f}" in line
    assert "one seed: no spread" in text


def _rows(sd_by_seed: dict[str, list[float]]) -> tuple[dict, dict]:
    import statistics

    per_seed = {m: [{"seed": s, "s_d": v, "test_acc": 0.8} for s, v in enumerate(vals)] for m, vals in sd_by_seed.items()}
    summary = {m: {"s_d": (statistics.fmean(vals), statistics.stdev(vals)), "test_acc": (0.8, 0.0)}
               for m, vals in sd_by_seed.items()}
    return summary, per_seed


@pytest.mark.parametrize(("gk", "ce", "verdict"), [
    ([0.30, 0.32, 0.34], [0.10, 0.12, 0.14], "beyond the seed spread"),          # +0.2 on every seed
    ([0.10, 0.12, 0.14], [0.30, 0.32, 0.34], "contrary to the paper"),           # the same, reversed
    # the methods' own spreads overlap (stds 0.1 each), but every seed gains +0.05: paired, beyond the spread
    ([0.10, 0.20, 0.30], [0.05, 0.15, 0.25], "beyond the seed spread"),
    ([0.50, 0.50, 0.11], [0.10, 0.10, 0.12], "within the seed spread"),          # large mean gap, one seed < 0
    # means 0.25 vs 0.10 (gap 0.15 > the stds' sum 0.1) but per-seed gains +0.2 / +0.05 / +0.2: 0.15 < 2 × 0.087
    ([0.30, 0.20, 0.25], [0.10, 0.15, 0.05], "within the seed spread"),
])
def test_comparison_calls_a_difference_inside_the_spread_noise(gk, ce, verdict):
    import statistics

    from scipy import stats

    from recipes.gatekeeper import compare

    summary, per_seed = _rows({"gatekeeper α=0.2": gk, "cross-entropy fine-tune": ce})
    lines = compare(summary, per_seed, [0, 1, 2])
    (line,) = [ln for ln in lines if "vs the cross-entropy fine-tune" in ln]
    assert verdict in line
    assert f"s_d {sum(gk) / 3 - sum(ce) / 3:+.3f}" in line
    d = [a - b for a, b in zip(gk, ce, strict=True)]
    assert "per seed " + " / ".join(f"{x:+.3f}" for x in d) in line
    if statistics.stdev(d) > 0:  # the 95% interval of the mean paired difference, as scipy computes it
        lo, hi = stats.t.interval(0.95, 2, loc=statistics.fmean(d), scale=stats.sem(d))
        assert f"95% interval [{lo:+.3f}, {hi:+.3f}]" in line
    if verdict == "beyond the seed spread":
        assert "as the paper expects" in line and "within" not in line


@pytest.mark.slow
def test_a_subclass_runs_through_the_recipe(tmp_path):
    out = tmp_path / "run"
    run_recipe("gatekeeper", run, ["preset=smoke", f"output_dir={out}", "baseline.enabled=false",
                                   "logger.wandb=false", "gatekeeper.module._target_=tests.helpers.DoctorGatekeeper"])
    from tests.helpers import DoctorGatekeeper

    pred = safe_torch_load(out / "gatekeeper" / "predict_test.pt")
    from lit_cascades.data import ImageClassificationDataModule
    from lit_cascades.models import MLP

    dm = ImageClassificationDataModule(limit_train=300)
    dm.setup()
    module = DoctorGatekeeper(MLP(dm.input_shape, dm.num_classes, hidden=[6]), dm.num_classes)
    module.load_state_dict(safe_torch_load(out / "gatekeeper" / "model.pt"))
    with torch.no_grad():
        expected = module.model(dm.splits["test"].x).softmax(-1).pow(2).sum(-1)
    torch.testing.assert_close(pred["confidence"], expected)  # the subclass's confidence() was used
    assert "DoctorGatekeeper" in (out / "gatekeeper" / "config.yaml").read_text()


@pytest.mark.parametrize(("argv", "line"), [
    (["gatekeeper.module.alpha=1.5"], "error: gatekeeper.module.alpha: "),
    (["+gatekeeper.module.gamma=2"], "error: gatekeeper.module.gamma: not an argument of GatekeeperClassifier"),
    (["+gatekeeper.weight_decay=0.1"], "error: gatekeeper.weight_decay: cannot add a key"),
    (["gatekeeper.module._target_=nowhere.Gatekeeper"], "error: gatekeeper.module._target_: cannot import"),
    (["data.source=foo"], "error: data.source: "),
    (["data.val_size=-0.1"], "error: data.val_size: "),
    (["data.limit_train=0"], "error: data.limit_train: "),
    (["eval.ideal=foo"], "error: eval.ideal: "),
    (["small.checkpoint=/no/such.pt"], "error: small.checkpoint: "),
])
def test_bad_values_stop_before_any_work(tmp_path, capsys, argv, line):
    out = tmp_path / "x"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main("gatekeeper", run, ["preset=smoke", f"output_dir={out}", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    assert time.perf_counter() - start < 30
    assert not out.exists()


@pytest.mark.slow
def test_resume_a_killed_sweep_equals_an_uninterrupted_run(tmp_path):
    # one loss path in every process (the default takes the C++ kernel where a build is cached, and an earlier
    # in-process run may have set the process's path): the kernel and the NumPy path agree only to rounding
    args = ["preset=sweep_smoke", "gatekeeper.epochs=3", "baseline.enabled=false", "gatekeeper.module.native_kernel=false"]
    whole = tmp_path / "whole"
    run_recipe("gatekeeper", run, [*args, f"output_dir={whole}"])
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "recipes.gatekeeper", *args, f"output_dir={killed}"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    mid = killed / "seed1" / "gatekeeper_a0.1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not mid.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert (killed / "seed0" / "gatekeeper_a0.9" / "model.pt").exists()  # earlier stages finished
    run_recipe("gatekeeper", run, [f"resume={killed}"])
    assert _results(killed / "metrics.json") == _results(whole / "metrics.json")
    assert json.loads((killed / "run.json").read_text())["attempts"] == 2


@pytest.mark.slow
def test_ddp_spawn_two_processes_equal_one(smoke_run, tmp_path):
    """Where a compiler is available, the two processes use the C++ loss kernel (turned on by each worker's
    ``setup``) and the one-process run the NumPy path: same values and gradients, so the same metrics. (One DDP
    run costs about a minute, so the NumPy path is not run a second time under DDP: it has no DDP-specific part.)"""
    from tests.functional.gatekeeper_paths import native_kernel_or_skip

    try:
        native_kernel_or_skip()  # built before the workers start, which then load it
        native = True
    except pytest.skip.Exception:
        native = False
    out = tmp_path / "ddp"
    run_recipe("gatekeeper", run, ["preset=smoke", f"output_dir={out}", "gatekeeper.module.alpha=0.3",
                                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn",
                                   *MLP_LARGE, "logger.wandb=false", "baseline.enabled=false",
                                   f"gatekeeper.module.native_kernel={str(native).lower()}"])
    one, two = _results(smoke_run / "metrics.json"), _results(out / "metrics.json")
    # global batches: each process loads half of every batch of the same permutation and DDP averages the two
    # halves' gradients, so training matches one process up to float summation order (weights within ~3e-8
    # for these MLPs), and the predictions are gathered exactly. Conv nets are not used here: on CPU their
    # backward sums in another order at another batch size, Adam amplifies that to ~1e-4 relative weight
    # differences, enough to flip an example; BatchNorm statistics would also be per process (SyncBatchNorm
    # needs a GPU).
    assert two["data"] == one["data"] and two["params"] == one["params"] and two["large"] == one["large"]
    for stage in ("small_ce", "gatekeeper"):  # stages are seeded apart: the baseline's absence changes nothing
        for key, value in one[stage].items():
            assert two[stage][key] == pytest.approx(value, abs=1e-6), (stage, key)
