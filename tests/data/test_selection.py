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


def flat(batches):
    return [i for b in batches for i in b]


def test_common_stream_is_identical_for_every_kd_steps_and_continues_across_the_switch():
    """Baseline (kd 0), SALT and the control (kd 5 or 18): the same batch at every step, over 3 'epochs'."""
    streams = {}
    for kd in (0, 5, 18):
        s = StagedBatchSampler(20, None, kd_steps=kd, batch_size=3, seed=0)
        assert len(s) == 6
        streams[kd] = [b for _ in range(3) for b in s]  # iterating again continues the stream
    assert streams[0] == streams[5] == streams[18]
    # brute-force oracle of the stream: every aligned run of 20 positions is a permutation of the 20 items
    positions = flat(streams[0])
    assert len(positions) == 54
    for start in (0, 20):
        assert sorted(positions[start:start + 20]) == list(range(20))
    # a stage-2 step is the baseline's step of the same number, not a restart at the stream's beginning
    s5 = StagedBatchSampler(20, None, kd_steps=5, batch_size=3, seed=0)
    assert [s5.global_batch_at(5 + k) for k in range(4)] == streams[0][5:9] != streams[0][0:4]
    # another seed, another stream
    assert [b for b in StagedBatchSampler(20, None, 5, 3, seed=1)] != streams[0][:6]


def test_selection_forms_the_stage_1_batches_and_stage_2_is_the_common_stream():
    selected = torch.tensor([1, 4, 6, 9, 13, 17])
    common = StagedBatchSampler(20, None, kd_steps=0, batch_size=3, seed=0)
    s = StagedBatchSampler(20, selected, kd_steps=5, batch_size=3, seed=0)
    batches = [b for _ in range(3) for b in s]
    reference = [b for _ in range(3) for b in common]
    # stage 1: only selected items, in the order the common stream visits them (the stream with the rest removed)
    stage1 = flat(batches[:5])
    keep = set(selected.tolist())
    visits = [i for e in range(3) for i in torch.randperm(20, generator=torch.Generator().manual_seed(e)).tolist()
              if i in keep]  # the common stream's permutations of seed 0 (generator seed = epoch)
    assert flat(reference)[:20] == torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    assert stage1 == visits[:15]
    # 15 positions over 6 selected items: every item 2 or 3 times
    assert sorted(torch.bincount(torch.tensor(stage1), minlength=20)[selected].tolist()) == [2, 2, 2, 3, 3, 3]
    # stage 2: step 5 + k is the baseline's step 5 + k
    assert batches[5:] == reference[5:]
    # resuming at a step gives the same batches; two processes split each global batch
    r = StagedBatchSampler(20, selected, kd_steps=5, batch_size=3, seed=0)
    r.set_step(4)
    assert next(iter(r)) == batches[4]
    r0 = StagedBatchSampler(20, selected, 5, 3, world_size=2, rank=0)
    r1 = StagedBatchSampler(20, selected, 5, 3, world_size=2, rank=1)
    for step in (0, 4, 5, 9):
        assert r0.batch_at(step) + r1.batch_at(step) == r0.global_batch_at(step)
    # gradient accumulation: the stage follows optimizer steps (2 micro-batches each)
    a = StagedBatchSampler(20, selected, kd_steps=2, batch_size=3, seed=0, accumulate_grad_batches=2)
    assert [a.stage(b) for b in range(6)] == [1, 1, 1, 1, 2, 2]
    assert a.global_batch_at(4) == common.global_batch_at(4)
    with pytest.raises(ValueError, match="selected"):
        StagedBatchSampler(5, torch.tensor([7]), 2, 2)
    with pytest.raises(ValueError, match="kd_steps"):
        StagedBatchSampler(5, None, -1, 2)


class Seen(L.LightningModule):
    """Records the input ids of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.w.sum() ** 2 + self.w.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Indexed(torch.utils.data.Dataset):
    """The training blocks with their index in every item."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "index": i}


def served(dm, steps):
    """The training-item indices Lightning actually trained on, step by step."""
    dm.setup()
    dm.datasets["train"] = Indexed(dm.datasets["train"])
    m = Seen()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=dm)
    return m.seen


def test_methods_train_on_one_stream_through_lightning(tmp_path):
    """What a Trainer really serves: baseline == SALT/control at every step; SALT_DS equal from step kd on."""
    data = {**TINY_DATA, "progress": False, "batch_size": 128}
    kd = 3
    base = SALTDataModule(kd_steps=0, **data)
    base.setup()
    tok = base.get_tokenizer()
    n = len(base.datasets["train"])
    steps = n // 128 + 4  # past one pass of the sampler: the dataloader is iterated again
    salt = SALTDataModule(kd_steps=kd, tokenizer=tok, **data)
    ds = SALTDataModule(kd_steps=kd, tokenizer=tok, selector=SequenceSelector(fraction=0.5, progress=False),
                        score_cache_dir=str(tmp_path), **data)
    torch.manual_seed(0)
    teacher = build_causal_lm(gpt2_config(len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=128)).eval()
    selected = ds.select(teacher)
    got = {name: served(dm, steps) for name, dm in (("baseline", base), ("salt", salt), ("salt_ds", ds))}
    assert got["baseline"] == got["salt"] == base.batch_stream(steps) == salt.batch_stream(steps)
    assert got["salt_ds"] == ds.batch_stream(steps)
    assert got["salt_ds"][kd:] == got["baseline"][kd:] and got["salt_ds"][:kd] != got["baseline"][:kd]
    # window pool: the first ceil(kd·G/f) = 768 stream positions are scored; the selected half (384 = kd·G)
    # forms stage 1, each once, in stream order
    window = flat(got["baseline"])[:768]
    assert sorted(ds.pool.tolist()) == sorted(window) and selected.numel() == 384
    assert flat(got["salt_ds"][:kd]) == [i for i in window if i in set(selected.tolist())]
    assert ds.selected_fraction == pytest.approx(0.5)


def test_datamodule_selects_the_top_fraction_and_caches_the_scores(tmp_path):
    data = {**TINY_DATA, "progress": False}
    dm = SALTDataModule(kd_steps=3, selector=SequenceSelector(fraction=0.25, progress=False), score_cache_dir=str(tmp_path),
                        select_pool="all", **data)
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
    dm2 = SALTDataModule(kd_steps=3, selector=SequenceSelector(fraction=0.25, progress=False), score_cache_dir=str(tmp_path),
                         select_pool="all", tokenizer=dm.get_tokenizer(), **data)
    assert torch.equal(dm2.select(teacher), selected) and dm2.cache_hit
    with pytest.raises(ValueError, match="select_pool"):
        SALTDataModule(select_pool="everything", **data)


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
