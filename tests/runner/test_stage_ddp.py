"""Stages under ddp_spawn (2 CPU processes): weights come back, predictions are gathered across ranks in
example order with the sampler's padding dropped, and callbacks get their rank-0 results back."""

import os

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from lit_cascades.runner import Run


class _Rows(Dataset):
    def __init__(self, n):
        self.x = torch.arange(n, dtype=torch.float32).unsqueeze(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "index": i}


class _Affine(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def training_step(self, batch, i):
        return (self.lin(batch["x"]) - 2 * batch["x"]).pow(2).mean()

    def test_step(self, batch, i):
        self.log("test/n", float(batch["x"].shape[0]), reduce_fx="sum", sync_dist=True)

    def predict_step(self, batch, i):
        return {"y": self.lin(batch["x"]).squeeze(1), "rank": torch.full_like(batch["index"], self.global_rank),
                "index": batch["index"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _SeenRows(pl.Callback):
    """Counts the test rows its process saw; exports them so the main process can read rank 0's count."""

    def __init__(self):
        self.rows = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.rows += int(batch["x"].shape[0])

    def export_results(self):
        return {"rows": self.rows}

    def import_results(self, state):
        self.rows = state["rows"]


class _Threads(pl.Callback):
    """Records the torch thread count of the process that fits (rank 0's comes back to the main process)."""

    def __init__(self):
        self.threads = None

    def on_train_start(self, trainer, pl_module):
        self.threads = torch.get_num_threads()

    def export_results(self):
        return {"threads": self.threads}

    def import_results(self, state):
        self.threads = state["threads"]


def _stage(tmp_path, devices):
    cfg = OmegaConf.create({"seed": 0, "logger": {"wandb": False}, "trainer": {
        "accelerator": "cpu", "devices": devices, "strategy": "ddp_spawn" if devices > 1 else "auto",
        "max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}})
    return Run("toy", cfg, tmp_path / f"d{devices}").stage("toy")


@pytest.mark.slow
def test_fit_predict_and_callback_results_across_two_processes(tmp_path, monkeypatch):
    # what the runner's `threads` key exports. Lightning alone gives each worker cpu_count // 2 threads, and torch
    # caps the count at the cores: ask for a count that differs from Lightning's and fits the machine
    want = 2 if (os.cpu_count() or 1) // 2 == 1 else 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(want))
    data = _Rows(7)  # odd: the processes hold 4 and 3 rows (Lightning's predict sampler does not pad)
    for devices in (1, 2):
        st = _stage(tmp_path, devices)
        torch.manual_seed(0)
        module = _Affine()
        init = module.lin.weight.detach().clone()
        threads = _Threads()
        st.fit(module, callbacks=[threads], train_dataloaders=DataLoader(data, batch_size=2))
        assert not torch.equal(module.lin.weight, init)  # under ddp_spawn: rank 0's weights came back
        if devices == 2:
            assert threads.threads == want  # the spawned worker took OMP_NUM_THREADS
        seen = _SeenRows()
        st.test(module, callbacks=[seen], dataloaders=DataLoader(data, batch_size=2))
        # rank 0's count reached the main process: all 7 rows, or 4 of the 8 the test sampler pads to
        assert seen.rows == (7 if devices == 1 else 4)
        pred = st.predict(module, DataLoader(data, batch_size=2))
        assert torch.equal(pred["index"], torch.arange(7))  # every example once, in dataset order
        with torch.no_grad():
            torch.testing.assert_close(pred["y"], module.lin(data.x).squeeze(1))  # each row's own output
        assert set(pred["rank"].tolist()) == ({0} if devices == 1 else {0, 1})


def test_release_process_group_ends_a_spawned_workers_group_only(tmp_path):
    """Every stage trainer carries ReleaseProcessGroup: in a spawned worker (a pid other than the one that built
    the trainer) its teardown destroys the group; in the process that built the trainer it does nothing."""
    import torch.distributed as dist

    from lit_cascades.runner import ReleaseProcessGroup, release_process_group

    assert any(isinstance(cb, ReleaseProcessGroup) for cb in _stage(tmp_path, 1).trainer("fit").callbacks)
    assert release_process_group() is False  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ReleaseProcessGroup(main_pid=os.getpid()).teardown(None, None, "fit")
        assert dist.is_initialized()
        ReleaseProcessGroup(main_pid=-1).teardown(None, None, "fit")  # as in a spawned worker
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
