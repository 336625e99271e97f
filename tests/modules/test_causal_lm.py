"""Next-token training and token-level Gatekeeper fine-tuning of a causal LM."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_cascades.functional.gatekeeper import gatekeeper_loss
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from lit_cascades.modules.causal_lm import CausalLM, GatekeeperLM, shifted_logits_and_labels

V = 50


def tiny(seed=0, layers=1, positions=32):
    torch.manual_seed(seed)
    return build_causal_lm(gpt2_config(V, n_layer=layers, n_embd=16, n_head=2, n_positions=positions))


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    ids[mask == 0] = 1
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt whose tokens carry no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hand_token_gatekeeper(logits, labels, alpha):
    """The Gatekeeper formula written token by token over the non-ignored positions (1/N normalisation)."""
    terms_c, terms_i = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            p = torch.softmax(logits[b, t].double(), -1)
            if int(p.argmax()) == y:
                terms_c.append(-torch.log(p[y]))
                terms_i.append(torch.tensor(0.0, dtype=torch.float64))
            else:
                terms_c.append(torch.tensor(0.0, dtype=torch.float64))
                terms_i.append((p * (torch.log(p) + math.log(V))).sum())
    n = len(terms_c)
    return alpha * sum(terms_c) / n + (1 - alpha) * sum(terms_i) / n


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_token_level_gatekeeper_equals_classification_loss_token_by_token(alpha):
    model = tiny()
    with torch.no_grad():  # sharper predictions, so both the CE and the KL terms are far from 0
        model.lm_head.weight.mul_(30.0)
    module = GatekeeperLM(model, alpha=alpha)
    batch = padded_batch()
    with torch.no_grad():  # make every other target the model's own prediction: both branches occur
        pred = shifted_logits_and_labels(model, batch)[0].argmax(-1)
    batch["labels"][:, 1::2] = torch.where(batch["labels"][:, 1::2] == -100, -100, pred[:, ::2])
    logits, labels = shifted_logits_and_labels(module.model, batch)
    assert 0 < int((logits.argmax(-1) == labels).sum()) < int((labels != -100).sum())
    loss, extra = module.compute_loss(logits, labels)
    # oracle 1: the classification loss on the flattened non-ignored positions
    keep = labels.reshape(-1) != -100
    flat = gatekeeper_loss(logits.reshape(-1, V)[keep], labels.reshape(-1)[keep], alpha=alpha)
    torch.testing.assert_close(loss, flat.loss)
    torch.testing.assert_close(extra["error_rate"], flat.error_rate)
    # oracle 2: the formula by hand
    assert loss.item() == pytest.approx(float(hand_token_gatekeeper(logits.detach(), labels, alpha)), rel=1e-4, abs=1e-6)
    # padded and prompt positions are excluded
    expected_n = int(((batch["attention_mask"][:, 1:] == 1) & (batch["labels"][:, 1:] != -100)).sum())
    assert int(keep.sum()) == expected_n


def test_shifted_labels_ignore_padding_and_prompt():
    batch = padded_batch()
    logits, labels = shifted_logits_and_labels(tiny(), batch)
    assert logits.shape == (3, 8, V) and labels.shape == (3, 8)
    assert (labels[1, :2] == -100).all() and labels[1, 2] != -100  # first real token is a target at t=2
    assert (labels[0, :3] == -100).all()


def test_left_padding_does_not_change_logits_of_real_tokens():
    model = tiny().eval()
    ids = torch.randint(2, V, (1, 6))
    padded = {"input_ids": torch.cat([torch.ones(1, 3, dtype=torch.long), ids], 1),
              "attention_mask": torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)}
    a, _ = shifted_logits_and_labels(model, {"input_ids": ids})
    b, _ = shifted_logits_and_labels(model, padded)
    torch.testing.assert_close(a, b[:, 3:], atol=1e-5, rtol=1e-5)


def test_plain_loss_is_cross_entropy():
    module = CausalLM(tiny())
    logits, labels = shifted_logits_and_labels(module.model, padded_batch())
    loss, _ = module.compute_loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100))


def test_sequence_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="exceeds the model's context window of 32 tokens"):
        shifted_logits_and_labels(tiny(positions=32), {"input_ids": torch.zeros(1, 40, dtype=torch.long)})


def test_large_model_is_frozen_outside_state_and_gives_token_deferral_view(tmp_path):
    small, large = tiny(0), tiny(1, layers=2)
    large_before = {k: v.clone() for k, v in large.state_dict().items()}
    module = GatekeeperLM(small, alpha=0.3, large_model=large, lr=1e-2, warmup_steps=1)
    assert not any(k.startswith("large") for k in module.state_dict())
    batches = [{"input_ids": torch.randint(0, V, (4, 12))} for _ in range(4)]
    class Keep(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.outputs = outputs

    keep = Keep()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        default_root_dir=tmp_path, callbacks=[keep])
    before = {k: v.clone() for k, v in small.state_dict().items()}
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert any(not torch.equal(before[k], v) for k, v in small.state_dict().items())
    assert all(torch.equal(large_before[k], v) for k, v in large.state_dict().items())
    assert {"train/loss", "train/loss_correct", "train/loss_incorrect", "train/error_rate", "val/loss"} <= set(
        trainer.callback_metrics)
    out = keep.outputs["deferral"]
    n = 4 * 11
    assert out["scores"]["max_prob"].shape == (n,)
    assert ((out["scores"]["max_prob"] > 0) & (out["scores"]["max_prob"] <= 1)).all()
    logits, labels = shifted_logits_and_labels(large, batches[0])
    torch.testing.assert_close(out["large_quality"], (logits.argmax(-1) == labels).float().reshape(-1))


def test_a_loaded_eval_mode_model_is_trained_in_train_mode(tmp_path):
    """``from_pretrained`` returns eval mode and Lightning keeps submodule modes: the module must switch the model
    to train mode, or fine-tuning silently runs without dropout."""
    model = tiny(0).eval()
    large = tiny(1).eval()
    module = CausalLM(model, large_model=large, lr=1e-2, warmup_steps=1)
    modes = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.training, any(m.training for m in large.modules())))

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[Record()])
    batches = [{"input_ids": torch.randint(0, V, (2, 8))} for _ in range(2)]
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert modes == [(True, False), (True, False)]  # the trained model in train mode, the frozen one in eval
    assert all(m.training for m in module.model.modules())
