"""The modules' AdamW (``modules._optim.adamw``): torch's fused implementation at full precision where torch has it,
the same update as the default implementation, and never under mixed precision, where Lightning refuses gradient
clipping with a fused optimizer."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lit_cascades.data import ImageClassificationDataModule
from lit_cascades.models import build_classifier
from lit_cascades.modules import Classifier
from lit_cascades.modules._optim import adamw, fused_adamw_on_cpu
from lit_cascades.modules.taskformer import TaskFormer
from lit_cascades.modules.ustad import USTAD

FUSED_CPU = fused_adamw_on_cpu()


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("mlp", (1, 8, 8), 10, hidden=[8])


def _attached(module, precision: str | None):
    module._trainer = None if precision is None else SimpleNamespace(precision=precision, estimated_stepping_batches=10)
    return module


@pytest.mark.parametrize(("precision", "fused"), [(None, FUSED_CPU), ("32-true", FUSED_CPU), ("64-true", FUSED_CPU),
                                                  ("bf16-mixed", False), ("16-mixed", False), ("bf16-true", False)])
def test_fused_only_at_full_precision_where_torch_has_it(precision, fused):
    module = _attached(Classifier(_net(), 10), precision)
    assert bool(adamw(module, module.parameters(), lr=1e-3).param_groups[0]["fused"]) is fused  # None: not fused
    assert adamw(module, module.parameters(), lr=1e-3, fused=False).param_groups[0]["fused"] is False


def test_every_module_builds_its_optimizer_with_it():
    modules = [Classifier(_net(), 10),
               TaskFormer(num_classes=3, caption_vocab=["a", "b"]),
               USTAD(encoder="tiny-bert", encoder_kwargs={"hidden": 32, "layers": 1, "heads": 2})]
    for module in modules:
        conf = _attached(module, "32-true").configure_optimizers()
        opt = conf["optimizer"] if isinstance(conf, dict) else conf
        assert all(bool(g["fused"]) is FUSED_CPU for g in opt.param_groups), type(module).__name__
        conf = _attached(module, "bf16-mixed").configure_optimizers()
        opt = conf["optimizer"] if isinstance(conf, dict) else conf
        assert all(not g["fused"] for g in opt.param_groups), type(module).__name__


@pytest.mark.skipif(not FUSED_CPU, reason="this torch has no fused AdamW on CPU")
def test_fused_update_equals_the_default_implementation():
    """The oracle is torch's default (per-tensor) AdamW: two parameter groups, weight decay on one, 20 steps."""
    nets = [_net(), _net()]
    opts = [torch.optim.AdamW([{"params": [p for p in n.parameters() if p.ndim > 1], "weight_decay": 0.1},
                               {"params": [p for p in n.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                              lr=1e-2, fused=fused) for n, fused in zip(nets, (None, True), strict=True)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(_net().parameters(), nets[1].parameters(), strict=True))


def test_mixed_precision_with_gradient_clipping_trains():
    """Lightning raises for gradient clipping with a fused optimizer under mixed precision; the modules' optimizer
    is not fused there, so such a run trains."""
    dm = ImageClassificationDataModule("digits", batch_size=64, seed=0)
    module = Classifier(_net(), 10)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=0.5, max_steps=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert not trainer.optimizers[0].param_groups[0]["fused"]
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_a_torch_without_the_fused_kernel_gets_the_default_implementation(monkeypatch):
    """torch < 2.4 has no fused AdamW for CPU tensors (it raises RuntimeError): the default implementation is
    built over the same parameters (a generator is not consumed by the failed attempt)."""

    class NoFusedAdamW(torch.optim.AdamW):
        def __init__(self, params, *args, fused=None, **kwargs):
            super().__init__(params, *args, **kwargs)  # as torch: the parameters are read, then the check fails
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   "devices: ['cuda']")

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    module = Classifier(_net(), 10)
    opt = adamw(module, module.parameters(), lr=1e-3)
    assert not opt.param_groups[0]["fused"]
    assert len(opt.param_groups[0]["params"]) == len(list(module.parameters())) > 0
