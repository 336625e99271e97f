"""The SALT LightningModule: stage switch, frozen teacher outside optimizer and checkpoint, DDP."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_cascades.data.selection import model_fingerprint
from lit_cascades.functional.distillation import naive_salt_loss
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules.salt import SALT, aligned_targets, count_non_embedding_parameters, full_logits
from tests.helpers import fit_steps_on_cpu

V = 40


def tiny(seed=0, layers=1, embd=16, vocab=V):
    torch.manual_seed(seed)
    return build_causal_lm(gpt2_config(vocab, n_layer=layers, n_embd=embd, n_head=2, n_positions=32))


def pair():
    return tiny(1, layers=2, embd=32), tiny(2, layers=1, embd=16)  # student, teacher


def batches(n=8, b=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V, (b, length), generator=g)} for _ in range(n)]


class Record(L.Callback):
    """Per optimizer step: the logged KD weight and stage, and whether the teacher ran."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls_before = pl_module.teacher_calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append((trainer.global_step - 1, float(m["train/kd_weight"]), int(m["train/stage"]),
                          pl_module.teacher_calls - self.calls_before))


def counted(module):
    module.teacher_calls = 0

    def hook(*_):
        module.teacher_calls += 1

    module.teacher.register_forward_hook(hook)
    return module


def trainer(tmp_path, steps, callbacks=(), **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                     num_sanity_val_steps=0, **{"enable_checkpointing": False, "limit_val_batches": 0, **kw})


def test_training_loss_is_the_salt_formula_before_the_switch_and_ntp_after():
    student, teacher = pair()
    module = SALT(student, teacher, kd_steps=3, kd_weight=0.4, temperature=2.0)
    batch = batches(1)[0]
    target = aligned_targets(batch)
    with torch.no_grad():
        expected_kd = naive_salt_loss(full_logits(student, batch)[:, :-1], full_logits(teacher, batch)[:, :-1],
                                      batch["input_ids"][:, 1:], 0.4, 2.0)
        expected_ntp = naive_salt_loss(full_logits(student, batch)[:, :-1], None, batch["input_ids"][:, 1:], 0.0)
    assert target.shape == (4, 10) and (target[:, -1] == -100).all()
    for step, expected in ((0, expected_kd), (2, expected_kd), (3, expected_ntp), (7, expected_ntp)):
        module.__dict__["_step"] = step
        type(module).global_step = property(lambda self: self.__dict__.get("_step", 0))
        try:
            loss = module.training_step(batch, 0)
        finally:
            del type(module).global_step
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert (module.kd_weight_now(2), module.kd_weight_now(3)) == (0.4, 0.0)
    assert (module.stage(2), module.stage(3)) == (1, 2)


def test_stage_switch_at_exactly_kd_steps_and_teacher_frozen_unsaved(tmp_path):
    student, teacher = pair()
    teacher_before = copy.deepcopy(teacher.state_dict())
    module = counted(SALT(student, teacher, kd_steps=3, kd_weight=0.5, lr=1e-2, warmup_steps=1,
                          selected_fraction=0.5))
    rec = Record()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    t = trainer(tmp_path, 6, [rec, ckpt], enable_checkpointing=True)
    t.fit(module, DataLoader(batches(), batch_size=None))
    assert rec.rows == [(0, 0.5, 1, 1), (1, 0.5, 1, 1), (2, 0.5, 1, 1), (3, 0.0, 2, 0), (4, 0.0, 2, 0),
                        (5, 0.0, 2, 0)]
    # the teacher: unchanged, no gradients, eval mode, not in the optimizer
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_params.isdisjoint({id(p) for p in teacher.parameters()})
    assert opt_params == {id(p) for p in student.parameters()}
    # the checkpoint holds the student only, plus a reference to the teacher
    path = next((tmp_path / "ck").glob("*.ckpt"))
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert set(state["state_dict"]) == {f"model.{k}" for k in student.state_dict()}
    assert state["salt"]["teacher_fingerprint"]
    assert not {"teacher", "student", "large_model"} & set(state["hyper_parameters"])
    assert not any(isinstance(v, torch.nn.Module) for v in state["hyper_parameters"].values())


@pytest.mark.parametrize(("layers", "d"), [(1, 16), (4, 64), (2, 256)])
def test_non_embedding_count_is_the_gpt2_block_formula(layers, d):
    """Per GPT-2 block: attention 4d² + 4d, MLP 8d² + 5d, two layer norms 4d; plus the final norm 2d. The token
    and position embeddings (and the LM head tied to the token embedding) are excluded."""
    model = build_causal_lm(gpt2_config(1000, n_layer=layers, n_embd=d, n_head=2, n_positions=64))
    assert count_non_embedding_parameters(model) == layers * (12 * d * d + 13 * d) + 2 * d
    total = sum(p.numel() for p in model.parameters())
    assert total - count_non_embedding_parameters(model) == 1000 * d + 64 * d


def test_set_teacher_freezes_and_refingerprints_a_teacher_trained_after_construction(tmp_path):
    student, teacher = pair()
    module = SALT(student, teacher, kd_steps=2, kd_weight=0.5)
    before = module._teacher_fingerprint
    teacher.requires_grad_(True).train()
    with torch.no_grad():
        teacher.lm_head.weight.add_(1.0)  # "trained" after the module was built
    module.set_teacher(teacher, teacher_path="teacher/model.pt")
    assert module._teacher_fingerprint == model_fingerprint(teacher) != before
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert module.hparams.teacher_path == "teacher/model.pt"
    with pytest.raises(ValueError, match="teacher"):
        module.set_teacher(tiny(3, vocab=V + 5))


def test_kd_weight_zero_control_trains_exactly_like_the_baseline(tmp_path):
    """ω = 0 with a teacher that runs: the same student weights as plain NTP (the control of the experiment)."""
    out = {}
    for name, (teacher, kd, w) in {"baseline": (None, 0, 0.5), "control": (pair()[1], 3, 0.0),
                                   "salt": (pair()[1], 3, 0.5)}.items():
        student = tiny(1, layers=2, embd=32)
        module = SALT(student, teacher, kd_steps=kd, kd_weight=w, lr=1e-2, warmup_steps=1)
        trainer(tmp_path, 5).fit(module, DataLoader(batches(), batch_size=None))
        out[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
    torch.testing.assert_close(out["control"], out["baseline"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out["salt"], out["baseline"], rtol=1e-4, atol=1e-6)


def test_switch_is_exact_after_resuming_from_a_checkpoint_saved_before_it(tmp_path):
    student, teacher = pair()
    module = counted(SALT(student, teacher, kd_steps=3, lr=1e-2, warmup_steps=1))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path, 2, [ckpt], enable_checkpointing=True).fit(module, DataLoader(batches(), batch_size=None))
    path = tmp_path / "ck" / "epoch=0-step=2.ckpt"
    assert path.exists()
    student2, teacher2 = pair()
    resumed = counted(SALT(student2, teacher2, kd_steps=3, lr=1e-2, warmup_steps=1))
    rec = Record()
    trainer(tmp_path, 6, [rec]).fit(resumed, DataLoader(batches(), batch_size=None), ckpt_path=str(path))
    assert [r[0] for r in rec.rows] == [2, 3, 4, 5]
    assert [(r[1], r[2], r[3]) for r in rec.rows] == [(0.5, 1, 1), (0.0, 2, 0), (0.0, 2, 0), (0.0, 2, 0)]


def test_linear_decay_logged_weights(tmp_path):
    student, teacher = pair()
    module = counted(SALT(student, teacher, kd_steps=4, kd_weight=0.8, schedule="linear_decay"))
    rec = Record()
    trainer(tmp_path, 5, [rec]).fit(module, DataLoader(batches(), batch_size=None))
    assert [r[1] for r in rec.rows] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_validation_logs_loss_and_perplexity(tmp_path):
    student, teacher = pair()
    module = SALT(student, teacher, kd_steps=1)
    t = trainer(tmp_path, 1, limit_val_batches=2)
    logged = t.validate(module, DataLoader(batches(2), batch_size=None), verbose=False)[0]
    total, count = 0.0, 0
    for b in batches(2):
        with torch.no_grad():
            logits = full_logits(student, b)[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["input_ids"][:, 1:].flatten(),
                                                           reduction="sum"))
        count += b["input_ids"][:, 1:].numel()
    assert logged["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_bad_input():
    student, teacher = pair()
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        SALT(student, tiny(3, vocab=V + 1), kd_steps=2)
    with pytest.raises(ValueError, match="kd_steps"):
        SALT(student, teacher, kd_steps=-1)
    with pytest.raises(ValueError, match="kd_weight"):
        SALT(student, teacher, kd_steps=2, kd_weight=1.2)
    with pytest.raises(ValueError, match="temperature"):
        SALT(student, teacher, kd_steps=2, temperature=0.0)
    with pytest.raises(ValueError, match="schedule"):
        SALT(student, teacher, kd_steps=2, schedule="cosine")
    with pytest.raises(ValueError, match="selected_fraction"):
        SALT(student, teacher, kd_steps=2, selected_fraction=0.0)
    with pytest.raises(ValueError, match="teacher"):
        SALT(student, None, kd_steps=2)
    with pytest.warns(UserWarning, match="ordinary knowledge distillation"):
        SALT(teacher, student, kd_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SALT(student, None, kd_steps=0)  # the baseline: no teacher needed


class SGDSALT(SALT):
    """Plain SGD, so that a wrong gradient scale under DDP would show (Adam would normalise it away)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.5)


class Sequences(L.LightningDataModule):
    """24 sequences; each process takes every ``world``-th one in order (rank 0: 0, 2, 4, ...), so the two
    processes' batches together are exactly the one-process batch."""

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler

        items = [{"input_ids": x} for b in batches(3, b=8) for x in b["input_ids"]]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(items, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(items, batch_size=8 // world, sampler=sampler)


def _fit_ddp(devices, tmp_path):
    student, teacher = pair()
    module = SGDSALT(student, teacher, kd_steps=2, kd_weight=0.5, temperature=2.0)
    return fit_steps_on_cpu(module, Sequences(), devices, tmp_path)


@pytest.mark.slow
def test_ddp_spawn_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    one = _fit_ddp(1, tmp_path / "one")
    two = _fit_ddp(2, tmp_path / "two")
    before = pair()[0].state_dict()
    assert any(not torch.equal(before[k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def _fsdp2_steps(rank, world):
    """Two SGD steps of the student under FSDP2 (``fully_shard``, gloo on CPU): one KD step, one NTP step."""
    from torch.distributed.fsdp import fully_shard

    from lit_cascades.functional.distillation import salt_loss

    student, teacher = pair()
    module = SALT(student, teacher, kd_steps=1, kd_weight=0.5, temperature=2.0)
    if world > 1:
        for block in student.transformer.h:
            fully_shard(block)
        fully_shard(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for step, batch in enumerate(batches(2, b=8)):
        per = 8 // world
        mine = {"input_ids": batch["input_ids"][rank * per:(rank + 1) * per]}
        teacher_logits = None
        if module.stage(step) == 1:
            with torch.inference_mode():
                teacher_logits = full_logits(teacher, mine)
        loss = salt_loss(full_logits(student, mine), teacher_logits, aligned_targets(mine),
                         module.kd_weight_now(step), 2.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in student.named_parameters()}


@pytest.mark.slow
def test_fsdp2_fully_shard_two_processes_equal_one_process():
    """Lightning's FSDPStrategy needs CUDA; torch's FSDP2 runs on CPU (gloo): the sharded student trained with
    the SALT loss and an unsharded per-process teacher matches one process on the same global batch."""
    from tests.helpers import run_distributed

    one = _fsdp2_steps(0, 1)
    two = run_distributed(_fsdp2_steps, 2)
    before = dict(pair()[0].named_parameters())
    assert all(not torch.equal(before[k], one[k]) for k in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"))
    for k in one:
        torch.testing.assert_close(two[0][k], one[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(two[1][k], one[k], rtol=1e-4, atol=1e-5)
