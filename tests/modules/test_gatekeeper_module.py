import pytest
import torch
from omegaconf import OmegaConf

from lit_cascades.data import ImageClassificationDataModule
from lit_cascades.functional import gatekeeper_loss
from lit_cascades.models import build_classifier
from lit_cascades.modules import Classifier, GatekeeperClassifier
from lit_cascades.runner import Run


def _net():
    torch.manual_seed(0)
    return build_classifier("mlp", (1, 8, 8), 10, hidden=[8])


def test_training_objective_is_the_gatekeeper_loss():
    module = GatekeeperClassifier(_net(), 10, alpha=0.2, normalize="subset")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss, extras = module.compute_loss(module(x), y)
    want = gatekeeper_loss(module(x), y, alpha=0.2, normalize="subset")
    torch.testing.assert_close(loss, want.loss)
    torch.testing.assert_close(extras["error_rate"], want.error_rate)


def test_confidence_hook_and_bad_args():
    module = Classifier(_net(), 10, confidence="margin")
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(logits, -1)[0]
    assert module.confidence(logits).item() == pytest.approx((p[0] - p[1]).item())
    with pytest.raises(ValueError, match="alpha"):
        GatekeeperClassifier(_net(), 10, alpha=-0.1)
    with pytest.raises(ValueError, match="confidence"):
        Classifier(_net(), 10, confidence="softmax")


def _run(tmp_path, name, epochs, callbacks=()):
    cfg = OmegaConf.create({
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 5},
        "logger": {"wandb": False},
    })
    r = Run(name="test", cfg=cfg, dir=tmp_path / name)
    dm = ImageClassificationDataModule("digits", batch_size=32, seed=0)
    module = GatekeeperClassifier(_net(), 10, alpha=0.3, lr=3e-3)
    st = r.stage("gatekeeper", seed=7)
    st.fit(module, dm, callbacks=callbacks)
    trainer = st.trainer("eval", logger=False)
    return module, trainer.validate(module, datamodule=dm, verbose=False)[0]


class _Interrupt(Exception):
    pass


class _StopAfter:
    """A callback that interrupts training at the end of a given epoch (after its checkpoint is saved)."""

    def __new__(cls, epoch):
        import lightning.pytorch as pl

        class Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == epoch:
                    raise _Interrupt

        return Stop()


@pytest.mark.slow
def test_a_stage_continues_its_fit_from_the_last_checkpoint_exactly(tmp_path):
    full_module, full = _run(tmp_path, "full", epochs=4)
    with pytest.raises(_Interrupt):
        _run(tmp_path, "resumed", epochs=4, callbacks=[_StopAfter(1)])
    last = tmp_path / "resumed" / "gatekeeper" / "checkpoints" / "last.ckpt"
    assert last.exists() and not (tmp_path / "resumed" / "gatekeeper" / "model.pt").exists()
    assert torch.load(last, weights_only=True)["epoch"] < 3  # a mid-training checkpoint, safe to load
    resumed_module, resumed = _run(tmp_path, "resumed", epochs=4)
    assert resumed["val/acc"] == pytest.approx(full["val/acc"], abs=1e-6)
    assert resumed["val/loss"] == pytest.approx(full["val/loss"], rel=1e-5)
    for a, b in zip(full_module.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a finished fit is reloaded, not retrained
    assert (tmp_path / "resumed" / "gatekeeper" / "model.pt").exists()
    _reloaded, again = _run(tmp_path, "resumed", epochs=4, callbacks=[_StopAfter(0)])  # would raise if it trained
    assert again["val/loss"] == pytest.approx(resumed["val/loss"], rel=1e-6)
