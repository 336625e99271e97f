"""Global batch sizes: W processes with Lightning's distributed wrapper see the same global batches as one."""

import pytest
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from lit_cascades.data.sampling import EpochSeededSampler, process_batch_size
from lit_cascades.runner.run import EpochSeed


class _World:
    def __init__(self, world_size):
        self.world_size = world_size


def test_process_batch_size():
    assert process_batch_size(64) == 64 and process_batch_size(64, _World(1)) == 64
    assert process_batch_size(64, _World(2)) == 32 and process_batch_size(63, None) == 63
    with pytest.raises(ValueError, match="^batch_size: 63 is the global batch.*divisible by the 2 processes"):
        process_batch_size(63, _World(2))


@pytest.mark.parametrize("n", [300, 301])
def test_two_processes_see_the_single_process_batches(n):
    batch, world = 64, 2
    for epoch in range(3):
        single = EpochSeededSampler(n, seed=5)
        single.set_epoch(epoch)
        order = list(single)
        steps = [set(order[i:i + batch]) for i in range(0, n, batch)]
        per_rank = []
        for rank in range(world):
            inner = EpochSeededSampler(n, seed=5)
            wrapper = DistributedSamplerWrapper(inner, num_replicas=world, rank=rank, shuffle=False)
            inner.set_epoch(epoch)  # what the runner's EpochSeed does; Lightning only sets the wrapper's epoch
            wrapper.set_epoch(epoch)
            idx = list(wrapper)
            b = process_batch_size(batch, _World(world))
            per_rank.append([set(idx[i:i + b]) for i in range(0, len(idx), b)])
        for k, expected in enumerate(steps):
            got = per_rank[0][k] | per_rank[1][k]
            # an odd n pads the last step with one repeated row (Lightning's DistributedSampler); nothing else
            assert expected <= got and len(got - expected) <= (n % world), (epoch, k)


def test_epoch_seed_passes_the_epoch_through_lightnings_wrapper():
    from torch.utils.data import DataLoader

    inner = EpochSeededSampler(10, seed=1)
    # Lightning builds the training wrapper with shuffle=True: the runner turns that off (the inner sampler
    # already shuffles; the wrapper must only shard), or two processes would see other global batches
    loader = DataLoader(list(range(10)), batch_size=2, sampler=DistributedSamplerWrapper(
        inner, num_replicas=2, rank=0, shuffle=True))

    class _T:
        current_epoch = 4
        train_dataloader = loader

    EpochSeed(0).on_train_epoch_start(_T(), None)  # type: ignore[arg-type]
    assert inner.epoch == 4 and loader.sampler.shuffle is False
    inner.set_epoch(4)
    assert list(loader.sampler) == list(inner)[0::2]


def test_split_loaders_route_every_split_and_count_as_overridden_for_lightning():
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from lit_cascades.data.image import ImageClassificationDataModule
    from lit_cascades.data.lm import LMCorpusDataModule
    from lit_cascades.data.multilabel import MultiLabelDataModule
    from lit_cascades.data.sampling import SplitLoaders
    from lit_cascades.data.text_sketch import TextSketchImageDataModule

    class Routed(SplitLoaders, pl.LightningDataModule):
        def _loader(self, split, shuffle):
            return split, shuffle

    dm = Routed()
    assert [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader(),
            dm.predict_dataloader("val")] == [("train", True), ("val", False), ("test", False), ("test", False),
                                              ("val", False)]
    for name in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
        assert is_overridden(name, dm), name  # Lightning finds the loaders
    for cls in (ImageClassificationDataModule, TextSketchImageDataModule, LMCorpusDataModule, MultiLabelDataModule):
        assert issubclass(cls, SplitLoaders), cls
