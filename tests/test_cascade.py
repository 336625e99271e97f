"""lit_cascades.cascade: predict, the three calibration guarantees (Monte Carlo against exact values), save/load,
and a cascade built from a gatekeeper recipe run."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom
from torch import Tensor, nn

from lit_cascades.cascade import (
    CalibrationReport,
    Cascade,
    clopper_pearson_rank,
    conformal_rank,
    quantile_rank,
)
from lit_cascades.functional import confidence_from_logits
from lit_cascades.models import MLP

IN_SHAPE, NUM_CLASSES = (1, 4, 4), 5
SPEC_SMALL = {"_target_": "lit_cascades.models.MLP", "in_shape": list(IN_SHAPE), "num_classes": NUM_CLASSES,
              "hidden": [4]}
SPEC_LARGE = {"_target_": "lit_cascades.models.MLP", "in_shape": list(IN_SHAPE), "num_classes": NUM_CLASSES,
              "hidden": [16, 16]}


def _pair(seed: int = 0, **kwargs) -> Cascade:
    torch.manual_seed(seed)
    small = MLP(IN_SHAPE, NUM_CLASSES, hidden=[4])
    large = MLP(IN_SHAPE, NUM_CLASSES, hidden=[16, 16])
    return Cascade(small, large, small_spec=SPEC_SMALL, large_spec=SPEC_LARGE, **kwargs)


class CountingMLP(MLP):
    """Records the batch sizes it was called with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        return super().forward(x)


def top_minus_mean(logits: Tensor) -> Tensor:
    """A custom (module-level, so savable) deferral score."""
    return logits.max(-1).values - logits.mean(-1)


# --------------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------------
def test_predict_runs_large_only_on_deferred_rows_and_reports_cost():
    torch.manual_seed(0)
    small, large = CountingMLP(IN_SHAPE, NUM_CLASSES, hidden=[4]), CountingMLP(IN_SHAPE, NUM_CLASSES, hidden=[8])
    x = torch.randn(50, *IN_SHAPE)
    with torch.no_grad():
        s_logits, l_logits = small(x), large(x)
    small.calls.clear(), large.calls.clear()
    scores = confidence_from_logits(s_logits, "margin")
    tau = float(scores.median())
    out = Cascade(small, large, score="margin", threshold=tau, batch_size=16).predict(x)
    want_deferred = scores < tau
    assert torch.equal(out.deferred, want_deferred)
    assert torch.allclose(out.scores, scores)
    want = torch.where(want_deferred, l_logits.argmax(-1), s_logits.argmax(-1))
    assert torch.equal(out.predictions, want)
    n_def = int(want_deferred.sum())
    assert small.calls == [16, 16, 16, 2]                   # all rows, in batches
    assert sum(large.calls) == n_def and max(large.calls) <= 16  # deferred rows only
    assert torch.equal(out.calls, 1 + want_deferred.long())
    assert out.deferral_rate == pytest.approx(n_def / 50)
    assert (out.seconds > 0).all()
    assert (out.seconds[want_deferred].min() > out.seconds[~want_deferred].max())  # deferred rows also pay M_L
    # the per-row times add up to the measured calls
    assert float(out.seconds.sum()) > 0


def test_predict_thresholds_at_the_extremes_and_custom_score():
    c = _pair(score=top_minus_mean, threshold=-math.inf)
    x = torch.randn(7, *IN_SHAPE)
    out = c.predict(x)
    assert not out.deferred.any() and torch.equal(out.predictions, c.small(x).argmax(-1))
    c.threshold = math.inf
    out = c.predict(x)
    assert out.deferred.all() and torch.equal(out.predictions, c.large(x).argmax(-1))
    with torch.no_grad():
        assert torch.allclose(out.scores, top_minus_mean(c.small(x)))


def test_nan_scores_are_deferred():
    c = _pair(score=lambda z: torch.full(z.shape[:1], float("nan")), threshold=0.0)
    assert c.predict(torch.randn(3, *IN_SHAPE)).deferred.all()


def test_input_errors_name_the_argument():
    c = _pair()
    with pytest.raises(RuntimeError, match=r"^threshold: not calibrated; call calibrate\(\) first"):
        c.predict(torch.randn(2, *IN_SHAPE))
    c.threshold = 0.5
    with pytest.raises(TypeError, match=r"^x: expected a tensor of shape \[B, \.\.\.\]; got list"):
        c.predict([[1.0]])
    with pytest.raises(ValueError, match=r"^x: expected a tensor of shape \[B, \.\.\.\]; got shape \(\)"):
        c.predict(torch.tensor(1.0))
    assert c.predict(torch.randn(0, *IN_SHAPE)).predictions.shape == (0,)
    with pytest.raises(ValueError, match="^score: expected one of"):
        _pair(score="banana")
    with pytest.raises(ValueError, match="^score: the callable must return a tensor of shape"):
        _pair(score=lambda z: z, threshold=0.0).predict(torch.randn(2, *IN_SHAPE))
    with pytest.raises(TypeError, match="^small: expected a torch.nn.Module"):
        Cascade("m", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^target_rate: expected a deferral rate in"):
        c.calibrate(torch.rand(10), 1.5)
    with pytest.raises(ValueError, match="^method: expected one of"):
        c.calibrate(torch.rand(10), 0.2, method="cp")
    with pytest.raises(ValueError, match="^confidence: method='clopper_pearson' needs a level"):
        c.calibrate(torch.rand(10), 0.2, method="clopper_pearson")
    with pytest.raises(ValueError, match="^confidence: only method='clopper_pearson'"):
        c.calibrate(torch.rand(10), 0.2, confidence=0.9, method="conformal")
    with pytest.raises(ValueError, match="^large_correct: small_correct and large_correct go together"):
        c.calibrate(torch.rand(10), 0.2, small_correct=torch.ones(10))
    with pytest.raises(ValueError, match=r"^small_correct: expected a tensor of shape \[N\] = \[10\]"):
        c.calibrate(torch.rand(10), 0.2, small_correct=torch.ones(9), large_correct=torch.ones(10))
    with pytest.raises(ValueError, match="^scores_or_data: 1 NaN scores"):
        c.calibrate(torch.tensor([0.1, float("nan")]), 0.2)


# --------------------------------------------------------------------------------------------------------
# calibration: the order statistics and their guarantees
# --------------------------------------------------------------------------------------------------------
def test_ranks_by_hand():
    # n = 24, target 0.1: quantile keeps ⌊2.4⌋ = 2 below -> 3rd smallest; conformal ⌊2.5⌋ = 2nd smallest
    assert quantile_rank(24, 0.1) == 3
    assert conformal_rank(24, 0.1) == 2
    assert conformal_rank(19, 0.1) == 2 and conformal_rank(18, 0.1) == 1 and conformal_rank(8, 0.1) == 0
    assert conformal_rank(10, 1.0) == 11 and quantile_rank(10, 1.0) == 11
    # Clopper–Pearson: the largest j with P(Bin(n, target) <= j-1) <= 1 - confidence, bound = Beta.ppf
    for n, t, conf in [(200, 0.2, 0.9), (50, 0.1, 0.95), (1000, 0.05, 0.99)]:
        j, bound = clopper_pearson_rank(n, t, conf)
        assert binom.cdf(j - 1, n, t) <= 1 - conf + 1e-12 < binom.cdf(j, n, t)
        assert bound == pytest.approx(beta.ppf(conf, j, n - j + 1)) and bound <= t
    assert clopper_pearson_rank(10, 0.2, 0.95) == (0, 0.0)  # (0.8)^10 = 0.107 > 0.05: cannot defer anything


def test_calibrate_on_scores_thresholds_and_realised_rates():
    scores = torch.arange(1, 25).float()[torch.randperm(24)] / 25  # 1/25 .. 24/25, shuffled
    c = _pair()
    rep = c.calibrate(scores, 0.1)
    assert rep.threshold == pytest.approx(3 / 25) and rep.rate == pytest.approx(2 / 24) and rep.bound is None
    assert c.threshold == rep.threshold and c.calibration is rep
    rep = c.calibrate(scores, 0.1, method="conformal")
    assert rep.threshold == pytest.approx(2 / 25) and rep.rate == pytest.approx(1 / 24)
    assert rep.bound == pytest.approx(2 / 25) and rep.cost == pytest.approx(1 + 1 / 24)
    with pytest.warns(UserWarning, match="too few to defer anything"):
        rep = c.calibrate(scores, 0.1, confidence=0.95, method="clopper_pearson")
    assert rep.threshold == -math.inf and rep.rate == 0.0
    # ties: the realised rate never exceeds the target
    tied = torch.tensor([0.5] * 10 + [0.9] * 10)
    assert c.calibrate(tied, 0.3).rate == 0.0 and c.threshold == 0.5


def _calibrate_many(method: str, n: int, target: float, confidence: float | None, reps: int, seed: int,
                    discrete: bool = False) -> np.ndarray:
    """The TRUE deferral rate P(S < τ) of ``reps`` independent calibrations on ``n`` scores S ~ Beta(5, 2)
    (a max-prob-like confidence; rounded to 0.05 when ``discrete``, to have ties), computed exactly."""
    rng = np.random.default_rng(seed)
    draws = rng.beta(5.0, 2.0, size=(reps, n))
    if discrete:
        draws = np.round(draws * 20) / 20
    c = _pair()
    taus = np.array([c.calibrate(torch.from_numpy(draws[r]), target, confidence, method=method).threshold
                     for r in range(reps)])
    if discrete:  # P(round(20 S)/20 < τ) = P(S < g + 0.025), g the largest grid point below τ
        grid = np.arange(21) / 20
        below = np.searchsorted(grid, taus - 1e-9) - 1   # index of the largest grid point < τ (-1: none)
        return np.where(below >= 0, beta.cdf(grid[np.maximum(below, 0)] + 0.025, 5.0, 2.0), 0.0)
    return beta.cdf(taus, 5.0, 2.0)  # ±inf -> 0 / 1


def test_clopper_pearson_guarantee_holds_and_quantile_does_not():
    n, target, conf, reps = 200, 0.2, 0.9, 2000
    delta = 1 - conf
    cp = _calibrate_many("clopper_pearson", n, target, conf, reps, seed=1)
    exceed = float((cp > target).mean())
    # exact exceedance probability of the chosen order statistic: P(U_(j) > t) = P(Bin(n, t) <= j - 1)
    j, _ = clopper_pearson_rank(n, target, conf)
    exact = float(binom.cdf(j - 1, n, target))
    se = math.sqrt(exact * (1 - exact) / reps)
    assert exact <= delta
    assert exceed <= delta + 3 * math.sqrt(delta * (1 - delta) / reps)
    assert abs(exceed - exact) < 4 * se + 1e-3            # two-sided: an off-by-one rank would fail here
    # plain quantile: the realised calibration rate is <= target, yet the true rate exceeds it about half the time
    q = _calibrate_many("quantile", n, target, None, reps, seed=1)
    q_exceed = float((q > target).mean())
    assert q_exceed > 0.4 and q_exceed > delta + 0.2
    assert q.mean() > target                               # E = (⌊tn⌋+1)/(n+1) = 41/201 > 0.2


def test_clopper_pearson_guarantee_holds_with_ties():
    n, target, conf, reps = 200, 0.2, 0.9, 1000
    rates = _calibrate_many("clopper_pearson", n, target, conf, reps, seed=2, discrete=True)
    assert float((rates > target).mean()) <= (1 - conf) + 3 * math.sqrt(0.09 / reps)


@pytest.mark.parametrize(("n", "target"), [(200, 0.2), (24, 0.1)])
def test_conformal_expected_rate_is_at_most_target(n, target):
    reps = 4000
    rates = _calibrate_many("conformal", n, target, None, reps, seed=3)
    j = conformal_rank(n, target)
    exact = j / (n + 1)                 # E[U_(j)]: 40/201 = 0.1990 and 2/25 = 0.08
    se = rates.std() / math.sqrt(reps)
    assert rates.mean() <= target + 3 * se
    assert abs(rates.mean() - exact) < 4 * se
    # the next rank (the ⌈(n+1)·target⌉-th score here) would give E = 41/201 = 0.204 and 3/25 = 0.12: detectable
    assert (j + 1) / (n + 1) > target + 4 * se
    q = _calibrate_many("quantile", n, target, None, reps, seed=3)
    assert q.mean() > target + 3 * q.std() / math.sqrt(reps)


def test_calibrate_on_data_reports_quality_cost_and_curve():
    c = _pair()
    torch.manual_seed(1)
    x, y = torch.randn(120, *IN_SHAPE), torch.randint(0, NUM_CLASSES, (120,))
    rep = c.calibrate((x, y), 0.25, method="conformal")
    with torch.no_grad():
        s_logits, l_logits = c.small(x), c.large(x)
    scores = confidence_from_logits(s_logits, "max_prob")
    sc, lc = (s_logits.argmax(-1) == y).float(), (l_logits.argmax(-1) == y).float()
    deferred = scores < rep.threshold
    assert rep.n == 120 and rep.rate == pytest.approx(float(deferred.float().mean())) and rep.rate <= 0.25
    assert rep.small_quality == pytest.approx(float(sc.mean()))
    assert rep.large_quality == pytest.approx(float(lc.mean()))
    assert rep.cascade_quality == pytest.approx(float(torch.where(deferred, lc, sc).mean()))
    assert rep.cost == pytest.approx(1 + rep.rate)
    assert len(rep.curve_rates) == len(rep.curve_quality) == 121
    assert rep.curve_quality[0] == pytest.approx(rep.small_quality) and rep.curve_quality[-1] == pytest.approx(
        rep.large_quality)
    assert {"auc_df", "s_d", "auroc"} <= set(rep.deferral)
    # the same from scores + correctness, from x + labels, and from an iterable of dict batches
    same = [c.calibrate(scores, 0.25, method="conformal", small_correct=sc, large_correct=lc),
            c.calibrate(x, 0.25, method="conformal", labels=y),
            c.calibrate([{"x": x[:50], "y": y[:50]}, {"x": x[50:], "y": y[50:]}], 0.25, method="conformal")]
    for other in same:
        assert other.threshold == rep.threshold and other.cascade_quality == pytest.approx(rep.cascade_quality)
    # unlabelled inputs: scores only, no quality
    unl = c.calibrate(x, 0.25, method="conformal")
    assert unl.threshold == rep.threshold and unl.cascade_quality is None
    assert CalibrationReport.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep


# --------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    c = _pair(score=top_minus_mean)
    x = torch.randn(64, *IN_SHAPE)
    c.calibrate((x, torch.randint(0, NUM_CLASSES, (64,))), 0.3, 0.9, method="clopper_pearson")
    out = c.save(tmp_path / "cascade")
    assert sorted(p.name for p in out.iterdir()) == ["cascade.json", "large.pt", "small.pt"]
    meta = json.loads((out / "cascade.json").read_text())
    assert meta["score"] == {"callable": "tests.test_cascade.top_minus_mean"}
    assert meta["models"]["small"] == SPEC_SMALL and meta["calibration"]["method"] == "clopper_pearson"
    back = Cascade.load(out)
    assert back.threshold == c.threshold and back.calibration == c.calibration
    x_new = torch.randn(40, *IN_SHAPE)
    a, b = c.predict(x_new), back.predict(x_new)
    assert torch.equal(a.predictions, b.predictions) and torch.equal(a.deferred, b.deferred)
    assert torch.equal(a.scores, b.scores)
    # an infinite threshold survives JSON
    c.threshold = -math.inf
    c.save(tmp_path / "inf")
    assert Cascade.load(tmp_path / "inf").threshold == -math.inf


def test_save_refuses_non_empty_dir_and_leaves_nothing_on_failure(tmp_path):
    c = _pair(threshold=0.5)
    target = tmp_path / "c"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="^directory: .* is not empty; pass overwrite=True"):
        c.save(target)
    c.save(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "cascade.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]   # no temporary directories left
    # unsavable: a lambda score, a model without a spec -> nothing written
    with pytest.raises(ValueError, match="^score: a callable score must be a module-level function"):
        _pair(score=lambda z: z.max(-1).values, threshold=0.5).save(tmp_path / "d")
    with pytest.raises(ValueError, match="^small_spec: unknown"):
        Cascade(MLP(IN_SHAPE, NUM_CLASSES), MLP(IN_SHAPE, NUM_CLASSES), threshold=0.5).save(tmp_path / "d")
    # a failure mid-write: the old content stays, no temporary directory remains

    class Boom(nn.Module):
        def state_dict(self, *a, **k):
            raise OSError("disk full")

    bad = _pair(threshold=0.1)
    bad.large = Boom()
    with pytest.raises(OSError, match="disk full"):
        bad.save(target, overwrite=True)
    assert Cascade.load(target).threshold == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# --------------------------------------------------------------------------------------------------------
# from a gatekeeper recipe run
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_from_a_run_over_several_seeds_uses_the_first_seed(tmp_path):
    from lit_cascades.runner import run_recipe
    from recipes.gatekeeper import run

    out = tmp_path / "run"
    run_recipe("gatekeeper", run, ["preset=smoke", f"output_dir={out}", "logger.wandb=false",
                                   "baseline.enabled=false", "sweep.seeds=[3,1]"])
    assert not (out / "gatekeeper").exists() and (out / "seed1" / "gatekeeper" / "model.pt").is_file()
    with pytest.warns(UserWarning, match="over 2 seeds; using seed1"):
        cascade = Cascade.from_run(out)
    assert cascade.source["small_stage"] == "seed1/gatekeeper" and cascade.source["large_stage"] == "seed1/large"
    explicit = {s: Cascade.from_run(out, f"seed{s}/gatekeeper", f"seed{s}/large") for s in (1, 3)}
    x = torch.randn(32, *_input_shape(out))
    for mine, theirs in zip(cascade.small.state_dict().values(), explicit[1].small.state_dict().values(),
                            strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(cascade.small(x), explicit[3].small(x))  # another seed, other weights
    with pytest.raises(FileNotFoundError, match=r"small_stage: no weights at .*Stages with weights in this run: "
                                                r"\['seed1/gatekeeper'"):
        Cascade.from_run(out, "gatekeeper_a0.3")


def _input_shape(run_dir):
    """The input shape of a gatekeeper run's data (from its config)."""
    from omegaconf import OmegaConf

    from lit_cascades.runner import build

    dm = build(OmegaConf.load(run_dir / "config.yaml").data, "data", seed=0)
    dm.setup()
    return tuple(dm.input_shape)


@pytest.mark.slow
def test_from_gatekeeper_run(tmp_path):
    from lit_cascades.runner import build, run_recipe
    from recipes.gatekeeper import run

    out = tmp_path / "run"
    run_recipe("gatekeeper", run, ["preset=smoke", f"output_dir={out}", "logger.wandb=false",
                                   "baseline.enabled=false", "gatekeeper.module.confidence=margin"])
    cascade = Cascade.from_run(out)
    assert cascade.score == "margin" and cascade.source["small_stage"] == "gatekeeper"
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "config.yaml")
    dm = build(cfg.data, "data", seed=cfg.seed)
    dm.setup()
    val = dm.splits["val"]
    rep = cascade.calibrate(dm.predict_dataloader("val"), 0.2, method="conformal")
    assert rep.n == len(val) and rep.rate <= 0.2 and rep.cascade_quality is not None

    test = dm.splits["test"]
    pred = cascade.predict(test.x)
    # by hand: the two trained nets, rebuilt from the run's files
    from lit_cascades.io import safe_torch_load

    nets = {}
    for name, stage in (("small", "gatekeeper"), ("large", "large")):
        net = build(cfg[name].model, f"{name}.model", in_shape=dm.input_shape, num_classes=dm.num_classes)
        state = safe_torch_load(out / stage / "model.pt")
        net.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        nets[name] = net.eval()
    with torch.no_grad():
        s_logits, l_logits = nets["small"](test.x), nets["large"](test.x)
    deferred = confidence_from_logits(s_logits, "margin") < rep.threshold
    assert torch.equal(pred.deferred, deferred)
    assert torch.equal(pred.predictions[deferred], l_logits.argmax(-1)[deferred])
    assert torch.equal(pred.predictions[~deferred], s_logits.argmax(-1)[~deferred])
    assert pred.deferral_rate == pytest.approx(float(deferred.float().mean()))
    acc = float((pred.predictions == test.y).float().mean())
    by_hand = float(torch.where(deferred, l_logits.argmax(-1) == test.y, s_logits.argmax(-1) == test.y).float().mean())
    assert acc == pytest.approx(by_hand)
    # the gatekeeper stage's own predictions agree with the rebuilt small model
    saved = safe_torch_load(out / "gatekeeper" / "predict_test.pt")
    assert torch.allclose(saved["confidence"], confidence_from_logits(s_logits, "margin")[saved["index"]], atol=1e-6)
    # save / load keeps the run's provenance and the predictions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = Cascade.load(cascade.save(tmp_path / "deploy"))
    assert back.source["run_dir"] == str(out.resolve())
    assert torch.equal(back.predict(test.x).predictions, pred.predictions)


@pytest.mark.slow
def test_package_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, lit_cascades; assert 'torch' not in sys.modules; "
            "from lit_cascades import Cascade; assert Cascade.__module__ == 'lit_cascades.cascade'; "
            "assert 'lightning' not in sys.modules and 'omegaconf' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
