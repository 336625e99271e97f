import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, Dataset

from lit_cascades.callbacks import DeferralCurveLogger, deferral_batch
from lit_cascades.data import ImageClassificationDataModule
from lit_cascades.functional import deferral_metrics
from lit_cascades.models import build_classifier
from lit_cascades.modules import Classifier

N = 97


def _fixed_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, generator=g), (torch.rand(N, generator=g) < 0.6).float(), (torch.rand(N, generator=g) < 0.9).float()


class _Fixed(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return i


class _Emitter(pl.LightningModule):
    """Emits precomputed deferral data, one named score and its negation."""

    def __init__(self, named: bool):
        super().__init__()
        self.named = named
        self.scores, self.qs, self.ql = _fixed_data()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def test_step(self, idx, batch_idx):
        s = self.scores[idx]
        scores = {"conf": s, "anti": -s} if self.named else s
        return deferral_batch(scores, self.qs[idx], self.ql[idx], idx)

    def validation_step(self, idx, batch_idx):
        return self.test_step(idx, batch_idx)

    def training_step(self, idx, batch_idx):
        return self.p.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("named", [False, True])
def test_logs_scalars_writes_files_and_wandb(tmp_path, named):
    cb = DeferralCurveLogger(rate=0.3, output_dir=tmp_path, tag="t")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    media: list[tuple[str, str]] = []
    for kind in ("image", "table"):
        original = getattr(wandb_logger, f"log_{kind}")

        def record(*args, _kind=kind, _original=original, **kwargs):
            media.append((_kind, kwargs["key"]))
            return _original(*args, **kwargs)

        setattr(wandb_logger, f"log_{kind}", record)
    trainer = pl.Trainer(accelerator="cpu", logger=[CSVLogger(str(tmp_path)), wandb_logger], callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False)
    results = trainer.test(_Emitter(named), dataloaders=DataLoader(_Fixed(), batch_size=10), verbose=False)[0]
    scores, qs, ql = _fixed_data()
    want = deferral_metrics(scores, qs, ql, rate=0.3).scalars
    key = "test/defer/conf/s_d" if named else "test/defer/s_d"
    assert results[key] == pytest.approx(want["s_d"], abs=1e-6)
    assert results[key.replace("s_d", "auroc")] == pytest.approx(want["auroc"], abs=1e-6)
    if named:
        assert results["test/defer/anti/s_d"] == pytest.approx(-want["s_d"], abs=1e-6)
    assert not [k for k in results if k.startswith("defer/")]
    assert media == [("image", "test/defer/t/curve_plot"), ("table", "test/defer/t/curve_table")]
    csv_path, png_path = tmp_path / "deferral_t_test.csv", tmp_path / "deferral_t_test.png"
    assert png_path.stat().st_size > 1000
    rows = list(csv.reader(open(csv_path)))
    assert rows[0][:5] == ["rate", "small_only", "large_only", "random", "ideal"]
    assert len(rows) == N + 2
    assert float(rows[-1][5]) == pytest.approx(ql.mean().item())  # all deferred = large-only quality
    assert set(cb.reports["test"]) == ({"conf", "anti"} if named else {"score"})
    wandb_logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_validation_and_test_log_under_their_own_split(tmp_path):
    cb = DeferralCurveLogger(output_dir=tmp_path)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(_Fixed(), batch_size=10)
    module = _Emitter(False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    logged = dict(trainer.callback_metrics)
    trainer.test(module, dataloaders=loader, verbose=False)
    logged.update(trainer.callback_metrics)
    assert {"val/defer/s_d", "test/defer/s_d", "val/defer/auroc", "test/defer/auroc"} <= set(logged)
    assert not [k for k in logged if k.startswith("defer/")]
    assert (tmp_path / "deferral_val.csv").exists() and (tmp_path / "deferral_test.png").exists()


def test_callbacks_do_not_import_the_runner():
    import inspect

    import lit_cascades.callbacks.deferral as deferral
    import lit_cascades.callbacks.ranking as ranking

    for mod in (deferral, ranking):
        assert "lit_cascades.runner" not in inspect.getsource(mod), mod.__name__


def test_missing_keys_raise():
    class Bad(_Emitter):
        def test_step(self, idx, batch_idx):
            return {"deferral": {"scores": self.scores[idx]}}

    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[DeferralCurveLogger()],
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(KeyError, match="small_quality"):
        trainer.test(Bad(False), dataloaders=DataLoader(_Fixed(), batch_size=10), verbose=False)


def _digits_cascade_test(devices: int, tmp_path) -> dict:
    pl.seed_everything(0)
    dm = ImageClassificationDataModule("digits", eval_batch_size=64)
    dm.setup()
    g = torch.Generator().manual_seed(1)
    dm.attach("test", "large_quality", (torch.rand(len(dm.splits["test"]), generator=g) < 0.95).float())
    torch.manual_seed(0)
    module = Classifier(build_classifier("mlp", dm.input_shape, dm.num_classes, hidden=[8]), dm.num_classes)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, callbacks=[DeferralCurveLogger(output_dir=tmp_path)],
                         enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(module, datamodule=dm, verbose=False)[0]


@pytest.mark.slow
def test_lightning_ddp_spawn_equals_single_process(tmp_path):
    """359 test digits: the DistributedSampler pads one duplicate; ids make the metric drop it."""
    single = _digits_cascade_test(1, tmp_path / "one")
    double = _digits_cascade_test(2, tmp_path / "two")
    assert single["test/defer/s_d"] == pytest.approx(double["test/defer/s_d"], abs=1e-6)
    for metric in ("auroc", "auc_df", "s_o", "quality_at_rate", "small_quality"):
        key = f"test/defer/{metric}"
        assert single[key] == pytest.approx(double[key], abs=1e-6), key
    one = list(csv.reader(open(tmp_path / "one" / "deferral_test.csv")))
    two = list(csv.reader(open(tmp_path / "two" / "deferral_test.csv")))
    assert len(one) == len(two) == 359 + 2
