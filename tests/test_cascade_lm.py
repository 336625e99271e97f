"""lit_cascades.cascade_lm: the generation cascade against Hugging Face greedy decoding, its scores against a
teacher-forced pass, calibration on fresh prompts, save/load, the speculative path, serving adapter, bad input,
and cascades built from smoke runs of the three LM recipes."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor

from lit_cascades.cascade import Cascade, conformal_rank
from lit_cascades.cascade_lm import GenerationCascade, GenerationOutput, run_prompts

PROMPTS = ["import os", "def f(x):\n    return x", "class A:", "x = [1, 2, 3]", "for i in range(3):",
           "print('hi')", "with open(path) as fh:", "if __name__ == '__main__':", "return None", "# a comment",
           "try:\n    pass", "y = {}"]


# --------------------------------------------------------------------------------------------------------
# fixtures: a tokenizer trained in a second and random GPT-2 / Llama models built from configs
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from lit_cascades.data.lm import stdlib_files, train_bpe_tokenizer

    texts = [p.read_text() for p in stdlib_files()[:4]]
    return train_bpe_tokenizer(texts, vocab_size=300, progress=False)


def gpt2(tok, seed: int = 0, n_layer: int = 1, n_embd: int = 16):
    from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config

    torch.manual_seed(seed)
    return build_causal_lm(gpt2_config(len(tok), n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=96,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


def llama(tok, seed: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tok):
    return gpt2(tok), llama(tok)


class ForwardCounter:
    """Counts a model's forward calls and the batch size of each (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.batches.append(int(ids.shape[0]))

    def close(self) -> None:
        self.handle.remove()


def hf_greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """The oracle: Hugging Face ``generate`` on one unpadded prompt, greedy, stopping after eos (kept)."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def out_rows(out: GenerationOutput) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(out.tokens, out.mask)]


# --------------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------------
def test_generate_runs_large_only_on_deferred_rows_and_equals_hf_greedy(tok, models):
    small, large = models
    m = 6
    cascade = GenerationCascade(small, large, tok, rule="chow_average", max_new_tokens=m, threshold=math.inf)
    probe = cascade.generate(PROMPTS)  # every row deferred: gives the scores
    tau = float(probe.scores.median())
    cascade.threshold = tau
    counter = ForwardCounter(large)
    try:
        out = cascade.generate(PROMPTS)
    finally:
        counter.close()
    deferred = out.scores < tau
    assert torch.equal(out.deferred, deferred) and 0 < int(deferred.sum()) < len(PROMPTS)
    # the large model ran once (one generate call: one forward per new token) on exactly the deferred rows
    assert counter.batches == [int(deferred.sum())] * m
    for i, prompt in enumerate(PROMPTS):
        oracle = hf_greedy(large if deferred[i] else small, tok, prompt, m)
        assert out_rows(out)[i] == oracle, i
        assert out.small_texts[i] == tok.decode(hf_greedy(small, tok, prompt, m), skip_special_tokens=True)
    assert out.texts == [tok.decode(r, skip_special_tokens=True) for r in out_rows(out)]
    assert torch.equal(out.calls, 1 + deferred.long())
    assert bool((out.seconds > 0).all()) and out.deferral_rate == pytest.approx(float(deferred.float().mean()))
    # the extremes: -inf never runs the large model, +inf defers every row
    counter = ForwardCounter(large)
    try:
        cascade.threshold = -math.inf
        never = cascade.generate(PROMPTS[:3])
    finally:
        counter.close()
    assert counter.batches == [] and not bool(never.deferred.any()) and never.texts == never.small_texts


def test_batch_size_chunks_and_token_batches_give_the_same_outputs(tok, models):
    small, large = models
    c = GenerationCascade(small, large, tok, max_new_tokens=5, threshold=-5.6)
    full = c.generate(PROMPTS)
    c.batch_size = 5
    counter = ForwardCounter(large)
    try:
        chunked = c.generate(PROMPTS)
    finally:
        counter.close()
    n_def = int(full.deferred.sum())
    assert sorted(set(counter.batches)) == sorted({min(5, n_def - i) for i in range(0, n_def, 5)})
    assert torch.equal(chunked.tokens, full.tokens) and chunked.texts == full.texts
    assert torch.allclose(chunked.scores, full.scores, atol=1e-5)
    ids, mask = c.encode(PROMPTS)
    again = c.generate({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(again.tokens, full.tokens)


def _teacher_forced_logprobs(model, tok, prompt: str, output: list[int]) -> Tensor:
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + output])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], -1)
    n = len(output)
    positions = torch.arange(ids.shape[1] - n - 1, ids.shape[1] - 1)
    return logp[positions, torch.tensor(output)]


@pytest.mark.parametrize(("rule", "alpha"), [("chow_sum", None), ("chow_average", None), ("chow_quantile", 0.25),
                                             ("chow_quantile_0", None)])
def test_scores_equal_chow_scores_of_a_teacher_forced_pass(tok, models, rule, alpha):
    """Outputs of different lengths (stop tokens: the tokens some rows emit second); each score is recomputed
    from a teacher-forced forward of the small model on prompt + its output (sum, mean, torch.quantile)."""
    small, large = models
    probe = GenerationCascade(small, large, tok, max_new_tokens=8, threshold=-math.inf).generate(PROMPTS)
    stops = sorted({int(t) for t in probe.tokens[:4, 1]} | {int(probe.tokens[4, 4])})
    c = GenerationCascade(small, large, tok, rule=rule, alpha=alpha, stop=stops, max_new_tokens=8,
                          threshold=-math.inf)
    out = c.generate(PROMPTS)
    assert len(set(out.mask.sum(-1).tolist())) > 2  # the test needs outputs of different lengths
    for i, prompt in enumerate(PROMPTS):
        lp = _teacher_forced_logprobs(small, tok, prompt, out_rows(out)[i])
        expected = {"chow_sum": lp.sum(), "chow_average": lp.mean(),
                    "chow_quantile": torch.quantile(lp, 0.25), "chow_quantile_0": lp.min()}[rule]
        assert float(out.scores[i]) == pytest.approx(float(expected), abs=2e-4), (i, rule)


def test_post_hoc_rule_scores_and_costs(tok, models):
    from lit_cascades.modules.lm_cascade import PostHocDeferral

    small, large = models
    alphas = [0.0, 0.5, 1.0]
    torch.manual_seed(3)
    rule = PostHocDeferral(in_features=3, features="quantile", alphas=alphas, hidden=8, num_layers=2).eval()
    c = GenerationCascade(small, large, tok, rule=rule, max_new_tokens=5, threshold=-math.inf)
    out = c.generate(PROMPTS)  # every row kept: the tokens are the small model's
    for i in range(len(PROMPTS)):
        lp = _teacher_forced_logprobs(small, tok, PROMPTS[i], out_rows(out)[i])
        feats = torch.quantile(lp, torch.tensor(alphas))[None]
        with torch.no_grad():
            assert float(out.scores[i]) == pytest.approx(float(rule.deferral_score(feats)[0]), abs=2e-4)
    # Embed-1+2 reads the large model's hidden states on every row: one more call per row
    width = 3 + small.config.n_embd + large.config.hidden_size
    rule2 = PostHocDeferral(in_features=width, features="embed1+2", alphas=alphas, hidden=8, num_layers=2).eval()
    c2 = GenerationCascade(small, large, tok, rule=rule2, max_new_tokens=4, threshold=-math.inf)
    counter = ForwardCounter(large)
    try:
        out2 = c2.generate(PROMPTS[:4])
    finally:
        counter.close()
    assert counter.batches == [4] and torch.equal(out2.calls, torch.full((4,), 2))


# --------------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------------
def test_calibrate_on_prompts_reports_rate_quality_and_curve(tok, models):
    from lit_cascades.functional.text import text_quality

    small, large = models
    c = GenerationCascade(small, large, tok, max_new_tokens=4, quality="token_f1")
    refs = [p.split()[0] for p in PROMPTS]
    rep = c.calibrate(PROMPTS, 0.25, method="conformal", references=refs)
    assert c.threshold == rep.threshold and c.calibration is rep and rep.n == len(PROMPTS)
    # by hand: the small-only and large-only answers (thresholds -inf / +inf) and the scores
    c.threshold = -math.inf
    s_out = c.generate(PROMPTS)
    c.threshold = math.inf
    l_out = c.generate(PROMPTS)
    sq, lq = text_quality(s_out.texts, refs, "token_f1"), text_quality(l_out.texts, refs, "token_f1")
    j = conformal_rank(len(PROMPTS), 0.25)
    assert rep.threshold == pytest.approx(float(torch.sort(s_out.scores).values[j - 1]))
    deferred = s_out.scores < rep.threshold
    assert rep.rate == pytest.approx(float(deferred.float().mean())) and rep.rate <= 0.25
    assert rep.small_quality == pytest.approx(float(sq.mean())) and rep.large_quality == pytest.approx(float(lq.mean()))
    assert rep.cascade_quality == pytest.approx(float(torch.where(deferred, lq, sq).mean()))
    assert len(rep.curve_rates) == len(PROMPTS) + 1 and rep.curve_quality[0] == pytest.approx(float(sq.mean()))
    assert rep.curve_quality[-1] == pytest.approx(float(lq.mean()))
    c.threshold = rep.threshold
    assert torch.equal(c.generate(PROMPTS).deferred, deferred)


def test_calibration_guarantees_hold_on_fresh_prompts(tok, models):
    """Monte Carlo with real scores: the 64 prompts' scores (computed once) are the population; each calibration
    draws 32 of them i.i.d. (with replacement, so calibration and served prompts are exchangeable) and its TRUE
    deferral rate is the share of the population below its threshold. Clopper-Pearson exceeds the target in at
    most ~(1 - confidence) of the calibrations, conformal's mean rate stays <= target, the plain quantile does
    neither."""
    from lit_cascades.data.lm import stdlib_files

    small, large = models
    lines = [ln for ln in stdlib_files()[10].read_text().splitlines() if ln.strip()][:64]
    c = GenerationCascade(small, large, tok, max_new_tokens=3, threshold=math.inf)
    pool = c.generate(lines).scores
    assert pool.numel() == 64 and len(set(pool.tolist())) > 50
    rng = np.random.default_rng(0)
    n, target, conf, reps = 32, 0.25, 0.8, 1000
    rates: dict[str, list[float]] = {"clopper_pearson": [], "conformal": [], "quantile": []}
    for _ in range(reps):
        cal = pool[torch.from_numpy(rng.integers(0, pool.numel(), n))]
        for method in rates:
            rep = c.calibrate(cal, target, conf if method == "clopper_pearson" else None, method=method)
            rates[method].append(float((pool < rep.threshold).float().mean()))
    cp, cf, q = (np.array(rates[k]) for k in ("clopper_pearson", "conformal", "quantile"))
    assert cp.mean() > 0.1  # it does defer: the check below is not met by never deferring
    assert (cp > target).mean() <= (1 - conf) + 3 * math.sqrt(conf * (1 - conf) / reps)
    assert cf.mean() <= target + 3 * cf.std() / math.sqrt(reps)
    assert (q > target).mean() > (1 - conf) + 0.1 and q.mean() > cf.mean()


# --------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, tok, models):
    from lit_cascades.modules.lm_cascade import PostHocDeferral

    small, large = models
    c = GenerationCascade(small, large, tok, rule="chow_quantile", alpha=0.5, max_new_tokens=5)
    c.calibrate(PROMPTS, 0.4, references=PROMPTS)
    out = c.generate(PROMPTS)
    back = Cascade.load(c.save(tmp_path / "seq"))  # Cascade.load reads generation cascades too
    assert isinstance(back, GenerationCascade) and back.rule == "chow_quantile" and back.alpha == 0.5
    assert back.threshold == c.threshold and back.calibration.to_dict() == c.calibration.to_dict()
    again = back.generate(PROMPTS)
    assert torch.equal(again.tokens, out.tokens) and again.texts == out.texts
    assert torch.equal(again.deferred, out.deferred) and torch.allclose(again.scores, out.scores)
    assert type(back.large).__name__ == "LlamaForCausalLM"
    # a post-hoc rule: its weights travel in rule.pt
    torch.manual_seed(5)
    rule = PostHocDeferral(in_features=2, features="quantile", alphas=[0.0, 1.0], hidden=4, num_layers=2).eval()
    ph = GenerationCascade(small, large, tok, rule=rule, threshold=0.0, max_new_tokens=4)
    back = GenerationCascade.load(ph.save(tmp_path / "ph"))
    assert (tmp_path / "ph" / "rule.pt").is_file()
    assert torch.allclose(back.generate(PROMPTS).scores, ph.generate(PROMPTS).scores)
    with pytest.raises(FileExistsError, match="^directory: .* is not empty; pass overwrite=True"):
        ph.save(tmp_path / "ph")
    json_meta = json.loads((tmp_path / "seq" / "cascade.json").read_text())
    assert json_meta["task"] == "generation" and json_meta["rule"] == {"kind": "chow_quantile", "alpha": 0.5}


# --------------------------------------------------------------------------------------------------------
# speculative (token-level) cascades
# --------------------------------------------------------------------------------------------------------
def test_speculative_path_counts_verifier_calls_and_round_trips(tmp_path, tok, models):
    from lit_cascades.models.speculative import speculative_generate

    small, large = models
    m = 6
    c = GenerationCascade(small, large, tok, max_new_tokens=m, speculative={"rule": "spec_decode", "gamma": 3})
    out = c.generate(PROMPTS[:5])
    # greedy exact speculative decoding = the large model's own greedy output (oracle: HF generate)
    for i, prompt in enumerate(PROMPTS[:5]):
        assert out_rows(out)[i] == hf_greedy(large, tok, prompt, m), i
    ids, mask = c.encode(PROMPTS[:5])
    direct = speculative_generate(small, large, ids, mask, m, rule="spec_decode", gamma=3,
                                  stop_counts=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    assert torch.equal(out.calls, direct.verifier_calls) and torch.equal(out.deferred, direct.deferred > 0)
    assert bool(out.deferred.all())  # exact speculative decoding: every token follows the verifier
    assert torch.allclose(out.scores, 1 - direct.deferred.float() / direct.num_tokens.float())
    with pytest.raises(RuntimeError, match="^calibrate: a speculative"):
        c.calibrate(PROMPTS, 0.2)
    lossy = GenerationCascade(small, large, tok, max_new_tokens=m,
                              speculative={"rule": "token_v3", "alpha": 0.5, "gamma": 2})
    back = GenerationCascade.load(lossy.save(tmp_path / "spec"))
    assert back.speculative == {"rule": "token_v3", "alpha": 0.5, "gamma": 2}
    assert back.generate(PROMPTS[:5]).texts == lossy.generate(PROMPTS[:5]).texts


# --------------------------------------------------------------------------------------------------------
# serving adapter
# --------------------------------------------------------------------------------------------------------
def test_serve_adapter_parses_runs_and_refuses_bad_requests(tok, models):
    from lit_cascades import serving

    small, large = models
    c = GenerationCascade(small, large, tok, max_new_tokens=4, threshold=-5.6)
    adapter = c.serve_adapter(max_prompts=3)
    assert isinstance(adapter, serving.Adapter)
    reqs = [adapter.parse({"inputs": PROMPTS[:2]}), adapter.parse({"inputs": [PROMPTS[2]]})]
    res = adapter.run(reqs)
    direct = c.generate(PROMPTS[:3])
    assert [o["text"] for r in res.responses for o in r["outputs"]] == direct.texts
    assert res.deferred == direct.deferred.tolist() and res.large_calls == int(direct.deferred.any())
    for payload, status, msg in [([1], 422, "request:"), ({"inputs": []}, 422, "inputs: empty"),
                                 ({"inputs": ["a", 3]}, 422, "inputs[1]: expected a string"),
                                 ({"inputs": ["a"] * 4}, 413, "inputs: 4 prompts"),
                                 ({"inputs": [""]}, 422, "inputs[0]: empty prompt"),
                                 ({"inputs": ["x " * 200]}, 413, "exceed the context window")]:
        with pytest.raises(serving.BadRequest, match=re.escape(msg)) as err:
            adapter.parse(payload)
        assert err.value.status == status


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------
def test_bad_input_errors_name_the_argument(tmp_path, tok, models):
    small, large = models
    c = GenerationCascade(small, large, tok, max_new_tokens=3)
    with pytest.raises(RuntimeError, match=r"^threshold: not calibrated; call calibrate\(\) first"):
        c.generate(PROMPTS)
    c.threshold = 0.0
    cases = [([], ValueError, "^prompts: empty list"), ("import os", TypeError, "^prompts: expected a list of strings"),
             (["a", 3], TypeError, "^prompts: expected strings; row 1 is int"),
             (["a", ""], ValueError, "^prompts: row 1 is empty"), (7, TypeError, "^prompts: expected a list"),
             (torch.zeros(2, 3), ValueError, "^prompts: input_ids must be an integer tensor"),
             ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
              ValueError, "^prompts: expected left-padded rows")]
    for prompts, err, msg in cases:
        with pytest.raises(err, match=msg):
            c.generate(prompts)
    with pytest.raises(ValueError, match="^max_new_tokens: expected an integer >= 1"):
        c.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="^rule: expected one of"):
        GenerationCascade(small, large, tok, rule="entropy")
    with pytest.raises(ValueError, match="^alpha: the quantile level"):
        GenerationCascade(small, large, tok, rule="chow_quantile", alpha=2.0)
    with pytest.raises(ValueError, match="^stop: expected one of"):
        GenerationCascade(small, large, tok, stop="eol")
    with pytest.raises(TypeError, match="^large: expected a Hugging Face causal LM"):
        GenerationCascade(small, torch.nn.Linear(2, 2), tok)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config

        GenerationCascade(small, build_causal_lm(gpt2_config(len(tok) + 5, n_layer=1, n_embd=8, n_head=2)), tok)
    with pytest.raises(ValueError, match="^references: expected 12 strings"):
        c.calibrate(PROMPTS, 0.2, references=["a"])
    with pytest.raises(ValueError, match="^data: 1 NaN scores"):
        c.calibrate(torch.tensor([0.1, float("nan")]), 0.2)
    # a run directory of another recipe
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "run.json").write_text(json.dumps({"recipe": "gatekeeper"}))
    with pytest.raises(ValueError, match="is a 'gatekeeper' run; GenerationCascade.from_run reads runs of"):
        GenerationCascade.from_run(run)
    with pytest.raises(TypeError, match=r"^from_run: \['rule'\] apply to LM recipe runs"):
        Cascade.from_run(run, rule="chow_sum")
    with pytest.raises(FileNotFoundError, match="^run_dir: no config.yaml"):
        GenerationCascade.from_run(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------
# from recipe runs (smoke presets through the runner)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=False)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_from_lm_cascade_run_reproduces_its_records(tmp_path, tiny_pair_dir, _cache):
    from lit_cascades.functional.sequence_scores import chow_quantile
    from lit_cascades.io import safe_torch_load
    from lit_cascades.modules.lm_cascade import PostHocDeferral
    from tests.recipes.test_lm_recipes import run_lm_recipe

    out = tmp_path / "run"
    run_lm_recipe("lm_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}",
                  "task.num_train=8", "task.num_test=8", "post_hoc.feature_sets=[quantile]")
    records = safe_torch_load(out / "generate" / "test" / "records.pt")
    batches = run_prompts(out, "test")
    c = Cascade.from_run(out, rule="chow_quantile_0.25")
    assert isinstance(c, GenerationCascade) and c.stop == "next_line" and c.max_new_tokens == 12
    assert c.source["recipe"] == "lm_cascade" and c.source["rule"] == "chow_quantile_0.25"
    c.threshold = math.inf
    got = [c.generate(b) for b in batches]
    assert [t for o in got for t in o.small_texts] == records["small_text"]
    assert [t for o in got for t in o.texts] == records["large_text"]
    expected = chow_quantile(records["small_logprobs"], records["small_mask"], 0.25)
    assert torch.allclose(torch.cat([o.scores for o in got]), expected, atol=1e-4)
    # the trained post-hoc rule, loaded from the run
    ph = GenerationCascade.from_run(out, rule="post_hoc_quantile_seed0")
    assert isinstance(ph.rule, PostHocDeferral)
    state = safe_torch_load(out / "post_hoc" / "quantile_seed0" / "model.pt")
    assert all(torch.equal(v, state[k]) for k, v in ph.rule.state_dict().items())
    rep = ph.calibrate(batches, 0.5, method="quantile")  # the batches carry the references ("target")
    assert ph.quality == "token_f1" and rep.n == 8 and rep.rate <= 0.5
    assert rep.small_quality == pytest.approx(float(records["small_token_f1"].mean()))
    assert rep.large_quality == pytest.approx(float(records["large_token_f1"].mean()))
    # calibration prompts from the val split skip the ones that trained the post-hoc rule (recipe's own loader)
    from omegaconf import OmegaConf

    from lit_cascades.lm_tasks import build_task_datamodule, next_line_loader
    from lit_cascades.models.lm_pair import load_pair

    cfg = OmegaConf.load(out / "config.yaml")
    dm = build_task_datamodule(cfg.data, load_pair(tiny_pair_dir))
    trained_on = {(d, int(n)) for b in next_line_loader(dm, cfg.task, "val", 8, dm.get_tokenizer().pad_token_id)
                  for d, n in zip(b["doc"], b["line"])}
    train_records = safe_torch_load(out / "generate" / "train" / "records.pt")
    assert len(trained_on) == len(train_records["target"]) == 8
    val = run_prompts(out, "val", num_examples=6, batch_size=4)
    cal = {(d, int(n)) for b in val for d, n in zip(b["doc"], b["line"])}
    assert len(cal) == 6 and not cal & trained_on
    assert ph.calibrate(val, 0.5).n == 6


@pytest.mark.slow
def test_from_gatekeeper_lm_run_uses_the_finetuned_small_model(tmp_path, tiny_pair_dir, _cache):
    from lit_cascades.io import safe_torch_load
    from tests.recipes.test_lm_recipes import run_lm_recipe

    out = tmp_path / "run"
    run_lm_recipe("gatekeeper_lm", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}",
                  "task.num_test=8", "finetune.baseline=false")
    c = Cascade.from_run(out)
    assert isinstance(c, GenerationCascade) and c.source["variant"] == "gatekeeper_a0.5"
    state = safe_torch_load(out / "finetune" / "gatekeeper_a0.5" / "model.pt")
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in c.small.state_dict().items())
    records = safe_torch_load(out / "generate" / "gatekeeper_a0.5" / "records.pt")
    c.threshold = -math.inf
    got = [c.generate(b) for b in run_prompts(out, "test")]
    assert [t for o in got for t in o.texts] == records["small_text"]
    pretrained = GenerationCascade.from_run(out, variant="pretrained", rule="chow_sum")
    assert pretrained.rule == "chow_sum" and pretrained.source["variant"] == "pretrained"
    assert not all(torch.equal(v, pretrained.small.state_dict()[k]) for k, v in c.small.state_dict().items())
    with pytest.raises(FileNotFoundError, match="^variant: no weights at"):
        GenerationCascade.from_run(out, variant="gatekeeper_a0.9")


@pytest.mark.slow
def test_from_speculative_cascade_run_reproduces_its_decoding(tmp_path, tiny_pair_dir, _cache):
    from lit_cascades.io import safe_torch_load
    from tests.recipes.test_lm_recipes import run_lm_recipe

    out = tmp_path / "run"
    run_lm_recipe("speculative_cascade", "preset=smoke", f"pair.path={tiny_pair_dir}", f"output_dir={out}",
                  "task.num_test=8", "rule=token_v3", "alpha=0.3", "baselines.seq_cascade_rates=[]",
                  "baselines.spec_decode=false")
    c = Cascade.from_run(out)
    assert isinstance(c, GenerationCascade) and c.is_speculative
    assert c.speculative["rule"] == "token_v3" and c.speculative["alpha"] == 0.3 and c.speculative["gamma"] == 3
    records = safe_torch_load(out / "decode" / "spec_token_v3_0.3" / "records.pt")
    got = [c.generate(b) for b in run_prompts(out, "test")]
    assert [t for o in got for t in o.texts] == records["text"]
    assert torch.equal(torch.cat([o.calls for o in got]), records["verifier_calls"])
    with pytest.raises(ValueError, match="^method: 'spec_foo_1' is not a speculative method name"):
        GenerationCascade.from_run(out, method="spec_foo_1")
