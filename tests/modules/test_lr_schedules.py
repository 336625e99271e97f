"""Each module's ``configure_optimizers`` schedule against the formula it documents, step by step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lit_cascades.models import build_classifier
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules import Classifier
from lit_cascades.modules.causal_lm import CausalLM
from lit_cascades.modules.taskformer import TaskFormer
from lit_cascades.modules.ustad import USTAD, USTADStudent


def lr_sequence(module, total: int) -> list[float]:
    """The learning rate of the first parameter group at each of ``total`` optimizer steps (plus one after)."""
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)
    conf = module.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def linear(step: int, total: int, warm: int) -> float:
    if step < warm:
        return step / warm
    return max(0.0, (total - step) / (total - warm))


def cosine(step: int, total: int, warm: int, floor: float = 0.0) -> float:
    if step < warm:
        return step / warm
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def tiny_ustad(**kw) -> USTAD:
    return USTAD(encoder="tiny-bert", encoder_kwargs={"hidden": 16, "layers": 1, "heads": 2}, rerank_depth=0,
                 recall_ks=(1,), **kw)


@pytest.mark.parametrize(("total", "warmup"), [(12, 3), (6, 10)])  # the second clamps warm-up to total // 2
def test_ustad_linear_warmup_then_linear_decay(total, warmup):
    lr = 2e-4
    got = lr_sequence(tiny_ustad(lr=lr, warmup_steps=warmup), total)
    warm = min(warmup, total // 2)
    assert got == pytest.approx([lr * linear(s, total, warm) for s in range(total)], rel=1e-9, abs=1e-15)
    assert got[0] == 0.0 and max(got) == pytest.approx(lr)


def test_ustad_student_shares_the_schedule():
    torch.manual_seed(0)
    student = USTADStudent(tiny_ustad(), student="asymmetric", student_layers=1, lr=1e-3, warmup_steps=2)
    assert lr_sequence(student, 10) == pytest.approx([1e-3 * linear(s, 10, 2) for s in range(10)], abs=1e-15)


@pytest.mark.parametrize(("total", "warmup"), [(16, 4), (6, 50)])
def test_taskformer_linear_warmup_then_cosine_to_zero(total, warmup):
    module = TaskFormer(image_size=16, embed_dim=8, image_encoder_kwargs={"width": 4, "depth": 1},
                        text_encoder_kwargs={"hidden": 16, "layers": 1, "heads": 2}, lr=1e-3, warmup_steps=warmup)
    warm = min(warmup, total // 2)
    got = lr_sequence(module, total)
    assert got == pytest.approx([1e-3 * cosine(s, total, warm) for s in range(total)], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("total", "warmup", "floor"), [(20, 5, 0.1), (4, 50, 0.0)])
def test_causal_lm_warmup_then_cosine_to_the_floor(total, warmup, floor):
    model = build_causal_lm(gpt2_config(32, n_layer=1, n_embd=8, n_head=2, n_positions=16))
    got = lr_sequence(CausalLM(model, lr=3e-3, warmup_steps=warmup, min_lr_ratio=floor), total)
    warm = min(warmup, total)  # CausalLM clamps the warm-up to the whole run
    assert got == pytest.approx([3e-3 * cosine(s, total, warm, floor) for s in range(total)], rel=1e-9, abs=1e-15)


def test_classifier_cosine_annealing_without_warmup_matches_torch():
    def net():
        torch.manual_seed(0)
        return build_classifier("mlp", (1, 4, 4), 3, hidden=[4])

    total = 9
    got = lr_sequence(Classifier(net(), 3, lr=1e-2), total)
    assert got == pytest.approx([1e-2 * cosine(s, total, 0) for s in range(total)], rel=1e-9, abs=1e-15)
    opt = torch.optim.SGD(net().parameters(), lr=1e-2)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    module = Classifier(net(), 3, scheduler="none")
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)
    assert isinstance(module.configure_optimizers(), torch.optim.Optimizer)
