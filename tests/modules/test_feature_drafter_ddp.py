"""FeatureDrafterLM under Lightning DDP (``ddp_spawn``, 2 CPU processes): the same steps as one process on the
same global batch (each process runs its own frozen copy of the verifier; only the drafter is synchronised)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_cascades.modules.feature_drafter import FeatureDrafterLM
from tests.helpers import fit_steps_on_cpu
from tests.models.test_speculative_architectures import VOCAB, make_pair


class SGDFeatureDrafterLM(FeatureDrafterLM):
    """Plain SGD, so that a wrong gradient scale under DDP would show (Adam would normalise it away)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.5)


class Sequences(L.LightningDataModule):
    """24 sequences; rank r takes every world-th one, so the processes' batches together are the one-process batch."""

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler

        g = torch.Generator().manual_seed(0)
        items = [{"input_ids": x} for x in torch.randint(6, VOCAB, (24, 10), generator=g)]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(items, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(items, batch_size=8 // world, sampler=sampler)


def _fit(devices: int, tmp_path) -> dict[str, torch.Tensor]:
    _, verifier = make_pair("llama")
    torch.manual_seed(1)
    module = SGDFeatureDrafterLM(teacher=verifier, noise=0.0)  # no noise: the two runs draw no random numbers
    return fit_steps_on_cpu(module, Sequences(), devices, tmp_path)


@pytest.mark.slow
def test_ddp_spawn_two_processes_equal_one_process(tmp_path):
    one = _fit(1, tmp_path / "one")
    two = _fit(2, tmp_path / "two")
    _, verifier = make_pair("llama")
    torch.manual_seed(1)
    before = FeatureDrafterLM(teacher=verifier).model.state_dict()
    assert any(not torch.equal(before[k], one[k]) for k in one)  # it trained
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
