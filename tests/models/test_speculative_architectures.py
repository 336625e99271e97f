"""Speculative decoding with tiny random pairs of several Hugging Face architectures, against HF ``generate``.

Each pair is a verifier and a drafter made of its first layer (same embeddings and head), so the two agree on
some tokens and not on others. Oracles: the verifier's own greedy ``generate`` on the same left-padded batch
(HF's sliding-window cache for Mistral/Qwen2), HF assisted generation, and a teacher-forced forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lit_cascades.models.lm_pair import truncated_copy
from lit_cascades.models.speculative import hf_constant_drafting, speculative_generate

VOCAB, EOS, PAD = 96, 5, 0


def _config(arch: str, vocab: int = VOCAB, **overrides):
    import transformers as t

    common = dict(vocab_size=vocab, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1, tie_word_embeddings=False)
    if arch == "gpt2":
        return t.GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, **common, **overrides)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "llama":
        return t.LlamaConfig(**llama_like, **overrides)
    if arch == "mistral":  # a window far smaller than prompt + generated tokens
        return t.MistralConfig(**llama_like, sliding_window=5, **overrides)
    if arch == "qwen2":
        return t.Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                             **overrides)
    raise ValueError(arch)


def make_pair(arch: str, seed: int = 0, vocab: int = VOCAB, drafter_vocab: int | None = None):
    """``(drafter, verifier)``: random verifier with spread-out logits; drafter = its first layer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch, vocab)
    config.initializer_range = 0.2
    verifier = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        verifier.get_output_embeddings().weight.normal_(0, 1.0)
    drafter = truncated_copy(verifier, 1).eval()
    if drafter_vocab is not None:
        drafter.resize_token_embeddings(drafter_vocab, mean_resizing=False)
        with torch.no_grad():
            drafter.get_output_embeddings().weight[vocab:].normal_(0, 1.0)
    for model in (drafter, verifier):
        model.generation_config.pad_token_id = PAD
        model.generation_config.eos_token_id = EOS
    return drafter, verifier


def left_padded(lengths, seed: int = 0, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(6, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def hf_greedy(verifier, ids, mask, max_new, eos: int = EOS, **kwargs):
    """HF ``generate`` on the batch, as ``[B, M]`` tokens padded with PAD and a mask up to the first EOS."""
    out = verifier.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=PAD,
                            eos_token_id=eos, **kwargs)[:, ids.shape[1]:]
    out = torch.nn.functional.pad(out, (0, max_new - out.shape[1]), value=PAD)
    is_eos = (out == eos).long()
    valid = (is_eos.cumsum(-1) - is_eos) == 0
    return out.masked_fill(~valid, PAD), valid


ARCHS = ["gpt2", "llama", "mistral", "qwen2"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_pair(request):
    return request.param, make_pair(request.param)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_verifier_generate_batched(arch_pair, gamma):
    """A left-padded batch of 5 prompts of mixed lengths: the tokens of HF greedy ``generate`` exactly, with a real
    mix of accepted and rejected drafts (so rows are realigned), and a cache that holds no holes."""
    arch, (drafter, verifier) = arch_pair
    ids, mask = left_padded([9, 3, 6, 1, 7], seed=gamma)
    ref, ref_mask = hf_greedy(verifier, ids, mask, 20)
    out = speculative_generate(drafter, verifier, ids, mask, 20, gamma=gamma, pad_token_id=PAD)
    assert out.tokens.tolist() == ref.tolist(), arch
    assert out.mask.tolist() == ref_mask.tolist()
    assert 0 < float(out.acceptance_rate.mean()) < 1
    longest = int((mask.sum(-1) + out.num_tokens).max())  # real tokens of the longest row
    assert 0 < out.cache_columns < longest  # compact: no column is a hole (the last token is never cached)


def cache_free_rounds(drafter, verifier, prompt: list[int], max_new: int, gamma: int, schedule: str,
                      stop: int | None = None) -> tuple[list[int], int, list[int], list[int]]:
    """Greedy speculative decoding at batch 1 without any cache (every forward recomputes the sequence), with HF's
    draft cap (``remaining − 1``) and schedule, ending after token ``stop`` if given: ``(tokens, verifier forwards,
    reached, accepted)``, the last two per draft position ``k`` (index ``k − 1``, length ``max_new``): rounds whose
    ``k``-th draft was verified after ``k − 1`` accepted ones and was emitted or rejected before the end, and those
    that accepted it."""
    out: list[int] = []
    calls = 0
    reached, accepted = [0] * max_new, [0] * max_new
    while len(out) < max_new and (stop is None or stop not in out):
        g = min(gamma, max_new - len(out) - 1)
        drafts: list[int] = []
        with torch.no_grad():
            for _ in range(g):
                drafts.append(int(drafter(torch.tensor([prompt + out + drafts])).logits[0, -1].argmax()))
            best = verifier(torch.tensor([prompt + out + drafts])).logits[0, -(g + 1):].argmax(-1).tolist()
        calls += 1
        n = 0
        while n < g and drafts[n] == best[n]:
            n += 1
        block = [*drafts[:n], best[n]][:max_new - len(out)]
        if stop is not None and stop in block:
            block = block[:block.index(stop) + 1]
        for k in range(1, min(n + 1, len(block)) + 1):  # draft k reached; accepted if k <= n
            if k <= g:
                reached[k - 1] += 1
                accepted[k - 1] += k <= n
        out += block
        if schedule == "heuristic":
            gamma = gamma + 2 if n == g else max(1, gamma - 1)
    return out[:max_new], calls, reached, accepted


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_one_equals_hf_assisted_generation(arch):
    """Batch 1, constant γ and HF's adaptive schedule: the tokens of HF ``generate(assistant_model=drafter)``, and
    the verifier forwards of cache-free speculative decoding (and of HF, except on the sliding-window Qwen2 pair,
    where HF's assisted generation makes one forward fewer than the cache-free reference on this prompt)."""
    drafter, verifier = make_pair(arch, seed=1)
    ids, mask = left_padded([7], seed=3)
    calls = []
    handle = verifier.register_forward_hook(lambda *args: calls.append(1))
    try:
        for gamma, schedule in ((2, "constant"), (4, "constant"), (2, "heuristic")):
            calls.clear()
            try:
                with hf_constant_drafting(drafter, gamma, schedule):
                    hf = verifier.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False,
                                           max_new_tokens=18, eos_token_id=[], pad_token_id=PAD)[0, ids.shape[1]:]
            except ValueError as err:  # transformers < 5 cannot crop a sliding-window cache in assisted generation
                if "crop" not in str(err):
                    raise
                hf = None
            hf_calls = len(calls)
            out = speculative_generate(drafter, verifier, ids, mask, 18, gamma=gamma, gamma_schedule=schedule,
                                       stop_counts=[], pad_token_id=PAD)
            ref, ref_calls, *_ = cache_free_rounds(drafter, verifier, ids[0].tolist(), 18, gamma, schedule)
            assert out.tokens[0].tolist() == ref, (arch, gamma, schedule)
            if hf is None:  # the cache-free reference is the oracle; HF's own run could not go on
                assert int(out.verifier_calls[0]) == ref_calls, (arch, gamma, schedule)
                continue
            assert hf.tolist() == ref, (arch, gamma, schedule)
            assert int(out.verifier_calls[0]) == ref_calls, (arch, gamma, schedule)
            if arch != "qwen2":
                assert hf_calls == ref_calls, (arch, gamma, schedule)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
@pytest.mark.parametrize("gamma", [2, 4])
def test_per_position_draft_counts_equal_cache_free_rounds(arch, gamma):
    """``draft_reached`` / ``draft_accepted`` of each prompt (a frequent stop token, budget cut) equal the counts of cache-free
    greedy rounds on it, and sum to ``accepted``. At batch 1: in a batch, a row near its budget still drafts as
    long as another row has room (γ is capped by the largest remaining budget), so its last token can come from an
    accepted draft where a lone row's last round drafts nothing; the batch's counts still sum to ``accepted``."""
    drafter, verifier = make_pair(arch, seed=2)
    ids, mask = left_padded([8, 3, 6, 1], seed=gamma)
    # stop at the verifier's most frequent greedy token; with a drafter that is the verifier itself every draft is
    # accepted, so stops fall inside accepted drafts and cut the drafts after them
    free = speculative_generate(drafter, verifier, ids, mask, 16, gamma=gamma, stop_counts=[], pad_token_id=PAD)
    stop = int(free.tokens.flatten().mode().values)
    for d, row in [(drafter, r) for r in range(4)] + [(copy.deepcopy(verifier), r) for r in range(4)]:
        prompt = ids[row][mask[row].bool()][None]
        out = speculative_generate(d, verifier, prompt, torch.ones_like(prompt), 16, gamma=gamma,
                                   stop_counts=[stop], pad_token_id=PAD)
        tokens, _, reached, accepted = cache_free_rounds(d, verifier, prompt[0].tolist(), 16, gamma, "constant",
                                                         stop=stop)
        assert out.tokens[0][out.mask[0]].tolist() == tokens
        assert out.draft_reached[0].tolist() == reached, (arch, gamma, row)
        assert out.draft_accepted[0].tolist() == accepted, (arch, gamma, row)
        assert int(out.draft_accepted.sum()) == int(out.accepted[0])
    batch = speculative_generate(drafter, verifier, ids, mask, 16, gamma=gamma, pad_token_id=PAD)
    assert batch.draft_reached.shape == (4, 16)
    assert batch.draft_accepted.sum(-1).tolist() == batch.accepted.tolist()
    assert int(batch.draft_reached[:, 1].sum()) > 0 and int(batch.draft_accepted.sum()) < int(batch.draft_reached.sum())
    pooled = batch.draft_acceptance
    never = batch.draft_reached.sum(0) == 0  # positions past γ, or that no round reached
    assert never[gamma:].all() and torch.equal(torch.isnan(pooled), never)
    torch.testing.assert_close(pooled[~never], batch.draft_accepted.sum(0)[~never] / batch.draft_reached.sum(0)[~never])


def test_heuristic_schedule_changes_gamma():
    drafter, verifier = make_pair("llama", seed=1)
    ids, mask = left_padded([7, 4], seed=3)
    out = speculative_generate(drafter, verifier, ids, mask, 24, gamma=3, gamma_schedule="heuristic", stop_counts=[])
    assert out.gammas[0] == 3 and len(set(out.gammas)) > 1
    for prev, nxt in zip(out.gammas, out.gammas[1:]):  # +2, -1, or capped by the remaining budget (- 1)
        assert nxt in (prev + 2, max(1, prev - 1)) or nxt < prev


def test_padded_output_sizes():
    """Output layers padded to different sizes over a 90-token tokenizer (the Qwen2.5 0.5B/7B shape), either way
    round: greedy equals the verifier's HF ``generate`` restricted to the tokenizer's tokens (``suppress_tokens`` =
    the padding rows); without ``vocab_size`` the size difference is an error."""
    padding = list(range(90, 104))
    small_drafter, small_verifier = make_pair("qwen2", seed=2, drafter_vocab=92)
    ids, mask = left_padded([6, 2, 8, 4], seed=5, vocab=90)
    ref, _ = hf_greedy(small_verifier, ids, mask, 16, suppress_tokens=padding)
    out = speculative_generate(small_drafter, small_verifier, ids, mask, 16, gamma=3, vocab_size=90)
    assert out.tokens.tolist() == ref.tolist() and float(out.acceptance_rate.mean()) > 0
    drafter, verifier = make_pair("qwen2", seed=2, drafter_vocab=104)
    ids, mask = left_padded([6, 2, 8, 4], seed=5)
    with pytest.raises(ValueError, match="104 rows.*96"):
        speculative_generate(drafter, verifier, ids, mask, 8)
    with pytest.raises(ValueError, match="cover the tokenizer"):
        speculative_generate(drafter, verifier, ids, mask, 8, vocab_size=100)
    ref, ref_mask = hf_greedy(verifier, ids, mask, 16, suppress_tokens=padding)
    assert ref.tolist() != hf_greedy(verifier, ids, mask, 16)[0].tolist()  # the random padding rows do matter here
    out = speculative_generate(drafter, verifier, ids, mask, 16, gamma=3, vocab_size=90)
    assert out.tokens.tolist() == ref.tolist() and out.mask.tolist() == ref_mask.tolist()
    assert float(out.acceptance_rate.mean()) > 0


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_logprobs_equal_teacher_forcing(arch):
    """Per-token log-probs of the emitted tokens under both models equal one teacher-forced forward pass."""
    drafter, verifier = make_pair(arch, seed=4)
    ids, mask = left_padded([5, 8, 3, 6], seed=6)
    for bonus in ("verifier", "target"):
        out = speculative_generate(drafter, verifier, ids, mask, 14, rule="token_v3", alpha=0.4, gamma=3,
                                   bonus=bonus, output_logprobs=True)
        full = torch.cat([ids, out.tokens], 1)
        full_mask = torch.cat([mask, out.mask.long()], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        for model, got in ((verifier, out.logprobs), (drafter, out.drafter_logprobs)):
            with torch.no_grad():
                logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.float()
            lp = torch.log_softmax(logits[:, ids.shape[1] - 1:-1], -1).gather(-1, out.tokens[..., None]).squeeze(-1)
            lp = lp.masked_fill(~out.mask, 0.0)
            torch.testing.assert_close(got, lp, atol=2e-4, rtol=0)


def test_repetition_penalty_and_generation_config_follow_hf():
    """The verifier's ``generation_config`` (repetition penalty, no-repeat n-grams) applies as in HF: greedy
    equals HF ``generate`` with the same config, and differs from decoding without it."""
    drafter, verifier = make_pair("llama", seed=5)
    ids, mask = left_padded([6, 3, 9, 5], seed=7)
    plain, _ = hf_greedy(verifier, ids, mask, 20)
    verifier.generation_config.repetition_penalty = 1.8
    try:
        ref, ref_mask = hf_greedy(verifier, ids, mask, 20)
        assert ref.tolist() != plain.tolist()  # the penalty matters on this pair
        for gamma in (2, 4):
            out = speculative_generate(drafter, verifier, ids, mask, 20, gamma=gamma)
            assert out.tokens.tolist() == ref.tolist() and out.mask.tolist() == ref_mask.tolist()
    finally:
        verifier.generation_config.repetition_penalty = None
    ref, _ = hf_greedy(verifier, ids, mask, 20, no_repeat_ngram_size=2)
    out = speculative_generate(drafter, verifier, ids, mask, 20, gamma=3,
                               generation_kwargs={"no_repeat_ngram_size": 2})
    assert out.tokens.tolist() == ref.tolist()


def test_default_stop_is_eos():
    """Without ``stop_counts`` a row stops at the verifier's EOS id (as HF ``generate`` does); ``[]`` = no stop."""
    drafter, verifier = make_pair("gpt2", seed=6)
    ids, mask = left_padded([4, 7, 2, 5, 4, 6], seed=8)
    none = speculative_generate(drafter, verifier, ids, mask, 30, gamma=3, stop_counts=[])
    assert not bool(none.stopped.any()) and bool((none.num_tokens == 30).all())
    eos = int(none.tokens[0, 6])  # a token the pair does emit mid-output: make it the EOS id
    verifier.generation_config.eos_token_id = eos
    try:
        out = speculative_generate(drafter, verifier, ids, mask, 30, gamma=3)
    finally:
        verifier.generation_config.eos_token_id = EOS
    ref, ref_mask = hf_greedy(verifier, ids, mask, 30, eos=eos)
    assert out.tokens.tolist() == ref.tolist() and out.mask.tolist() == ref_mask.tolist()
    assert bool(out.stopped[0]) and int(out.num_tokens[0]) <= 7
    assert all(int(t[m][-1]) == eos for t, m, s in zip(out.tokens, out.mask, out.stopped) if s)


class PlainDrafter(torch.nn.Module):
    """A drafter outside transformers: an embedding and a linear head (the minimal protocol)."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.head(self.emb(input_ids))


def test_plain_module_drafter():
    _, verifier = make_pair("llama", seed=7)
    ids, mask = left_padded([6, 2, 4], seed=9)
    ref, _ = hf_greedy(verifier, ids, mask, 12)
    out = speculative_generate(PlainDrafter(), verifier, ids, mask, 12, gamma=3)
    assert out.tokens.tolist() == ref.tolist()

    class NoProtocol(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="minimal protocol"):
        speculative_generate(NoProtocol(), verifier, ids, mask, 4)
    with pytest.raises(TypeError, match="verifier must be a Hugging Face"):
        speculative_generate(verifier, PlainDrafter(), ids, mask, 4)


def test_unsupported_cache_type_is_rejected_before_decoding():
    import transformers as t

    _, verifier = make_pair("llama", seed=8)
    config = t.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1)
    mamba = t.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = left_padded([3, 3])
    calls = []
    handle = verifier.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="cache layers of type"):
            speculative_generate(mamba, verifier, ids, mask, 4)
    finally:
        handle.remove()
    assert not calls
