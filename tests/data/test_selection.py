"""SALT_DS selection: scores vs brute force, the on-disk cache, and the staged sampler."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_cascades.data.selection import (
    SALTDataModule,
    SequenceSelector,
    StagedBatchSampler,
    model_fingerprint,
)
from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config
from tests.functional.test_distillation import brute_force_score
from tests.lm_helpers import TINY_DATA

V = 30


def tiny(seed=0):
    torch.manual_seed(seed)
    model = build_causal_lm(gpt2_config(V, n_layer=1, n_embd=16, n_head=2, n_positions=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked predictions: the top-k filter drops some tokens
    return model.eval()


def tokens(n=7, length=9, seed=0):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


class Counting(SequenceSelector):
    calls = 0

    def score_batch(self, logits, target):
        Counting.calls += 1
        return super().score_batch(logits, target)


@pytest.mark.parametrize("k", [1, 10])
def test_scores_equal_a_brute_force_loop_over_sequences(k):
    model, ids = tiny(), tokens()
    scores = SequenceSelector(k=k, batch_size=3, chunk_size=4, progress=False).score(model, ids)
    expected = []
    for i in range(ids.shape[0]):  # one sequence at a time, the formula written out
        with torch.no_grad():
            z = model(input_ids=ids[i:i + 1]).logits[:, :-1].double()
        expected += brute_force_score(z, ids[i:i + 1, 1:], k)
    assert scores.shape == (7,)
    for got, exp in zip(scores.tolist(), expected):
        assert (math.isnan(got) and math.isnan(exp)) or got == pytest.approx(exp, rel=1e-5)


def test_cache_hit_and_miss_keyed_by_corpus_teacher_and_selector(tmp_path):
    model, ids = tiny(), tokens()
    sel = Counting(k=5, batch_size=8, progress=False)
    s1, hit1 = sel.cached_scores(model, ids, tmp_path)
    s2, hit2 = sel.cached_scores(model, ids, tmp_path)
    assert (hit1, hit2) == (False, True) and Counting.calls == 1
    torch.testing.assert_close(s1, s2, equal_nan=True)
    assert len(list(tmp_path.glob("salt_scores-*.pt"))) == 1 and not list(tmp_path.glob(".*tmp*"))
    _, hit = sel.cached_scores(tiny(seed=1), ids, tmp_path)  # another teacher
    assert not hit
    _, hit = sel.cached_scores(model, tokens(seed=5), tmp_path)  # another corpus
    assert not hit
    _, hit = Counting(k=3, batch_size=8, progress=False).cached_scores(model, ids, tmp_path)  # another selector setting
    assert not hit
    # a file at the right name but written for something else is detected and recomputed
    path = next(p for p in tmp_path.glob("salt_scores-*.pt")
                if torch.load(p)["key"] == sel.cache_key(model, ids))
    saved = torch.load(path)
    saved["key"]["teacher"] = "0" * 16
    torch.save(saved, path)
    with pytest.warns(UserWarning, match="recomputing"):
        _, hit = sel.cached_scores(model, ids, tmp_path)
    assert not hit
    _, hit = sel.cached_scores(model, ids, tmp_path)
    assert hit
    assert model_fingerprint(model) != model_fingerprint(tiny(seed=1))


def test_sampler_serves_the_selection_before_kd_steps_and_everything_after():
    selected = torch.tensor([1, 4, 6, 9])
    s = StagedBatchSampler(20, selected, kd_steps=5, batch_size=3, seed=0)
    assert len(s) == 6
    batches = [b for _ in range(3) for b in s]  # three "epochs", 18 steps
    assert all(set(b) <= {1, 4, 6, 9} for b in batches[:5])
    assert not all(set(b) <= {1, 4, 6, 9} for b in batches[5:7])
    after = [i for b in batches[5:12] for i in b]  # stage 2 restarts a permutation of the full pool
    assert sorted(after[:20]) == list(range(20))
    assert sorted(i for b in [s.global_batch_at(5 + j) for j in range(20)] for i in b)[:60] == \
        sorted(list(range(20)) * 3)
    # stage 1 covers the selection evenly: 5 steps x 3 = 15 = 3 passes of 4 + 3
    counts = torch.bincount(torch.tensor([i for b in batches[:4] for i in b]), minlength=20)
    assert counts[selected].tolist() == [3, 3, 3, 3]
    # resuming at a step gives the same batches; two processes split each global batch
    r = StagedBatchSampler(20, selected, kd_steps=5, batch_size=3, seed=0)
    r.set_step(4)
    assert next(iter(r)) == batches[4]
    r0 = StagedBatchSampler(20, selected, 5, 3, world_size=2, rank=0)
    r1 = StagedBatchSampler(20, selected, 5, 3, world_size=2, rank=1)
    for step in (0, 4, 5, 9):
        assert r0.batch_at(step) + r1.batch_at(step) == r0.global_batch_at(step)
    with pytest.raises(ValueError, match="selected"):
        StagedBatchSampler(5, torch.tensor([7]), 2, 2)


def test_datamodule_selects_and_switches_at_kd_steps(tmp_path):
    data = {**TINY_DATA, "progress": False}
    dm = SALTDataModule(kd_steps=3, selector=SequenceSelector(fraction=0.25, progress=False), score_cache_dir=str(tmp_path),
                        **data)
    dm.setup()
    vocab = len(dm.get_tokenizer())
    torch.manual_seed(0)
    teacher = build_causal_lm(gpt2_config(vocab, n_layer=1, n_embd=16, n_head=2, n_positions=128)).eval()
    selected = dm.select(teacher)
    n = len(dm.datasets["train"])
    assert selected.numel() == round(0.25 * n) and dm.selected_fraction == pytest.approx(selected.numel() / n)
    assert not dm.cache_hit
    finite = dm.scores[~dm.scores.isnan()]
    assert dm.scores[selected].min() >= finite.sort(descending=True).values[selected.numel() - 1]

    class Seen(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"])
            return (self.w * 0).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m = Seen()
    L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=dm)
    blocks = dm.datasets["train"].blocks
    chosen = {tuple(blocks[i].tolist()) for i in selected.tolist()}
    in_selection = [all(tuple(row.tolist()) in chosen for row in b) for b in m.seen]
    assert in_selection[:3] == [True, True, True] and not all(in_selection[3:])
    dm2 = SALTDataModule(kd_steps=3, selector=SequenceSelector(fraction=0.25, progress=False), score_cache_dir=str(tmp_path),
                         tokenizer=dm.get_tokenizer(), **data)
    assert torch.equal(dm2.select(teacher), selected) and dm2.cache_hit


def test_default_score_cache_lives_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "root"))
    model, ids = tiny(), tokens()
    sel = SequenceSelector(k=4, progress=False)
    _, hit = sel.cached_scores(model, ids, True)
    assert not hit
    files = list((tmp_path / "root" / "selection_scores").glob("salt_scores-*.pt"))
    assert files == [sel.cache_path(sel.cache_key(model, ids), True)]
    assert sel.cached_scores(model, ids, True)[1]
    # a changed setting (k) is another file, never the stale one
    other = SequenceSelector(k=5, progress=False)
    assert other.cache_path(other.cache_key(model, ids), True) != files[0]
    assert not other.cached_scores(model, ids, True)[1]
    assert not sel.cached_scores(model, ids, None)[1] and not sel.cached_scores(model, ids, False)[1]


RAN = []


class _Payload:
    """Unpickling this object runs code (appends to RAN): a score cache must never do that."""

    def __reduce__(self):
        return (RAN.append, ("ran",))


def test_score_cache_with_pickled_code_is_refused(tmp_path):
    model, ids = tiny(), tokens()
    sel = SequenceSelector(k=4, progress=False)
    key = sel.cache_key(model, ids)
    path = sel.cache_path(key, tmp_path)
    torch.save({"key": key, "scores": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        sel.cached_scores(model, ids, tmp_path)
    assert RAN == [] and path.exists()
