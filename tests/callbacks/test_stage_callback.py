"""The shared base of the metric-logging callbacks: hook routing and the step-output check."""

from types import SimpleNamespace

import pytest

from lit_cascades.callbacks import DeferralCurveLogger, RankingAUCLogger
from lit_cascades.callbacks._stage import StageMetricsCallback


class _Recorder(StageMetricsCallback):
    key = "thing"

    def __init__(self):
        self.calls = []

    def _update(self, pl_module, outputs, stage):
        self.calls.append(("update", stage, self._batch(outputs, ("a", "b"))))

    def _finish(self, trainer, pl_module, stage):
        self.calls.append(("finish", stage))


def test_hooks_route_to_update_and_finish_and_skip_the_sanity_check():
    cb = _Recorder()
    sanity, real = SimpleNamespace(sanity_checking=True), SimpleNamespace(sanity_checking=False)
    out = {"thing": {"a": 1, "b": 2}}
    cb.on_validation_batch_end(sanity, None, out, None, 0)
    cb.on_validation_epoch_end(sanity, None)
    assert cb.calls == []
    cb.on_validation_batch_end(real, None, out, None, 0)
    cb.on_validation_epoch_end(real, None)
    cb.on_test_batch_end(sanity, None, {"other": 1}, None, 0)  # test batches count even while "sanity" is set
    cb.on_test_epoch_end(real, None)
    assert cb.calls == [("update", "val", {"a": 1, "b": 2}), ("finish", "val"), ("update", "test", None),
                        ("finish", "test")]


def test_missing_keys_are_named():
    cb = _Recorder()
    with pytest.raises(KeyError, match=r"must hold a and b; missing \['b'\]"):
        cb._batch({"thing": {"a": 1}}, ("a", "b"))
    with pytest.raises(KeyError, match=r"must hold a; missing \['a'\]"):
        cb._batch({"thing": {}}, ("a",))
    assert cb._batch(None, ("a",)) is None and cb._batch({"x": 1}, ("a",)) is None


def test_both_loggers_share_the_base():
    assert issubclass(DeferralCurveLogger, StageMetricsCallback) and issubclass(RankingAUCLogger, StageMetricsCallback)
    with pytest.raises(KeyError, match=r"scores and labels; missing \['labels'\]"):
        RankingAUCLogger()._update(None, {"ranking": {"scores": 0}}, "test")
