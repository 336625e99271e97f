"""LM corpus sources, the deterministic file-level split, the BPE tokenizer and the next-line task."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lit_cascades.data.lm import (
    EXCLUDED_DIRS,
    BlockDataset,
    LMCorpusDataModule,
    NextLineDataset,
    collate_prompts,
    load_corpus,
    newline_counts,
    newline_token_ids,
    next_line,
    split_documents,
    stdlib_files,
    stdlib_root,
    tokenize_stream,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

CODE = '''import os


def add(a, b):
    """Return a + b."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5
'''


def write_corpus(root, n=8):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"mod{i}.py").write_text(CODE.replace("add", f"add{i}").replace("Point", f"Point{i}"))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([CODE * 3, "héllo wörld ✓\n"], vocab_size=320)


def test_stdlib_files_exclude_tests_and_site_packages():
    files = stdlib_files()
    assert len(files) > 100
    root = stdlib_root()
    for f in files:
        assert f.suffix == ".py"
        assert not (EXCLUDED_DIRS & set(f.relative_to(root).parts[:-1]))
    names = {str(f.relative_to(root)) for f in files}
    assert "os.py" in names and "json/decoder.py" in names


def test_split_is_deterministic_disjoint_and_file_level():
    docs = [(f"doc{i}.txt", f"text {i}\n") for i in range(40)]
    a = split_documents(docs, 0.1, 0.1)
    b = split_documents(list(reversed(docs)), 0.1, 0.1)
    assert a == b  # independent of input order
    names = [{n for n, _ in a[s]} for s in ("train", "val", "test")]
    assert len(names[1]) == 4 and len(names[2]) == 4 and len(names[0]) == 32
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set().union(*names) == {n for n, _ in docs}


def test_stdlib_corpus_split_has_every_split():
    corpus = load_corpus("stdlib", max_docs=20)
    assert all(len(corpus.docs[s]) >= 1 for s in ("train", "val", "test"))
    assert corpus.fingerprint() == load_corpus("stdlib", max_docs=20).fingerprint()


def test_local_files_directory_glob_and_chunking(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    corpus = load_corpus("files", paths=[str(root)])
    assert sum(len(v) for v in corpus.docs.values()) == 8
    corpus = load_corpus("files", paths=[str(root / "mod*.py")])
    assert sum(len(v) for v in corpus.docs.values()) == 8
    single = tmp_path / "one.txt"
    single.write_text("\n".join(f"line {i}" for i in range(100)))
    chunked = load_corpus("files", paths=[str(single)], chunk_lines=10)
    assert sum(len(v) for v in chunked.docs.values()) == 10


def test_bad_corpus_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file, a directory or a matching glob"):
        load_corpus("files", paths=[str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="no text found"):
        load_corpus("files", paths=[str(tmp_path / "empty")])
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(ValueError, match="no text found"):
        load_corpus("files", paths=[str(tmp_path / "blank.txt")])
    (tmp_path / "one.txt").write_text("only one document\n")
    with pytest.raises(ValueError, match="at least 3 documents"):
        load_corpus("files", paths=[str(tmp_path / "one.txt")])
    with pytest.raises(ValueError, match="`source` must be one of"):
        load_corpus("web")
    with pytest.raises(ValueError, match="needs `paths`"):
        load_corpus("files")


def test_hf_dataset_source_from_local_json(tmp_path):
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"document {i}\nsecond line"}) for i in range(10)))
    corpus = load_corpus("hf", hf_dataset="json", hf_data_files=str(rows))
    assert sum(len(v) for v in corpus.docs.values()) == 10
    with pytest.raises(ValueError, match="not a column"):
        load_corpus("hf", hf_dataset="json", hf_data_files=str(rows), hf_text_field="body")


def test_tokenizer_newline_is_its_own_token_and_roundtrips(tokenizer):
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    assert 258 < len(tokenizer) <= 320  # a tiny corpus may not supply enough merges
    text = "def f(x):\n    return x\n\n\nprint('héllo ✓')\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    nl = newline_token_ids(tokenizer)
    assert len(nl) == 1 and tokenizer.decode(nl) == "\n"
    assert ids.count(nl[0]) == text.count("\n")
    counts = newline_counts(tokenizer, vocab_size=400)
    assert counts.shape == (400,) and counts[nl[0]] == 1 and counts[tokenizer.eos_token_id] >= 1e6
    assert counts.sum() - counts[tokenizer.eos_token_id] == 1


def test_next_line_of_a_generation():
    assert next_line("\n    return x\n") == "    return x"
    assert next_line("  # rest of the prompt line\nx = 1\ny = 2") == "x = 1"
    assert next_line("\n\n") == "" and next_line("no newline at all") == ""
    assert next_line("\n    unfinished") == "    unfinished"


def test_prefix_at_line_boundary_tokenizes_like_the_full_text(tokenizer):
    lines = CODE.split("\n")
    full = tokenizer(CODE, add_special_tokens=False)["input_ids"]
    for k in range(1, len(lines)):
        prefix = "".join(line + "\n" for line in lines[:k])
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        assert full[: len(ids)] == ids


def test_next_line_dataset_targets_and_prompts(tokenizer):
    docs = [(f"m{i}.py", CODE) for i in range(3)]
    ds = NextLineDataset(docs, tokenizer, num_examples=12, context_tokens=40, max_target_tokens=30, seed=3)
    assert len(ds) == 12
    for ex in ds:
        lines = CODE.split("\n")
        assert ex.target == lines[ex.line] and ex.target.strip()
        assert ex.input_ids.numel() <= 40
        prompt = tokenizer.decode(ex.input_ids.tolist())
        preceding = "\n".join(lines[: ex.line])  # the prompt stops before the newline closing its last line
        assert preceding.endswith(prompt)
        # the model is asked for exactly what follows in the file
        assert CODE[CODE.index(preceding) + len(preceding):].startswith("\n" + ex.target + "\n")
    again = NextLineDataset(docs, tokenizer, num_examples=12, context_tokens=40, max_target_tokens=30, seed=3)
    assert [(e.doc, e.line) for e in again] == [(e.doc, e.line) for e in ds]
    other = NextLineDataset(docs, tokenizer, num_examples=12, context_tokens=40, max_target_tokens=30, seed=4)
    assert [(e.doc, e.line) for e in other] != [(e.doc, e.line) for e in ds]


def test_next_line_target_length_filter(tokenizer):
    docs = [("m.py", CODE)]
    ds = NextLineDataset(docs, tokenizer, num_examples=100, context_tokens=64, max_target_tokens=6)
    for ex in ds:
        assert len(tokenizer("\n" + ex.target + "\n", add_special_tokens=False)["input_ids"]) <= 6
    with pytest.raises(ValueError, match="no next-line candidates"):
        NextLineDataset([("e.py", "a\n\n\n")], tokenizer, min_context_lines=3)


def test_collate_left_pads(tokenizer):
    docs = [("m.py", CODE)]
    ds = NextLineDataset(docs, tokenizer, num_examples=4, context_tokens=64)
    batch = collate_prompts(tokenizer.pad_token_id)([ds[i] for i in range(4)])
    lengths = [ds[i].input_ids.numel() for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == n
        assert torch.equal(batch["input_ids"][row, -n:], ds[row].input_ids)
        assert (batch["input_ids"][row, : max(lengths) - n] == tokenizer.pad_token_id).all()
    assert batch["target"] == [ds[i].target for i in range(4)]


def test_block_dataset_and_stream(tokenizer):
    stream = tokenize_stream([CODE, CODE], tokenizer, progress=False)
    assert (stream == tokenizer.eos_token_id).sum() == 2
    blocks = BlockDataset(stream, 16)
    assert len(blocks) == stream.numel() // 16
    assert torch.equal(blocks[1]["input_ids"], stream[16:32])
    with pytest.raises(ValueError, match="shorter than one block"):
        BlockDataset(stream[:5], 16)


def test_datamodule_trains_tokenizer_and_caches_streams(tmp_path):
    root = write_corpus(tmp_path / "corpus", n=10)
    dm = LMCorpusDataModule(source="files", paths=[str(root)], vocab_size=300, block_size=16, batch_size=4,
                            val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                            next_line={"num_examples": 5, "context_tokens": 32}, progress=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    assert len(list((tmp_path / "cache").glob("tokens-*.pt"))) == 1
    dm2 = LMCorpusDataModule(source="files", paths=[str(root)], tokenizer=dm.tokenizer, block_size=16,
                             val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "cache"), progress=False)
    streams = dm2.token_streams()
    assert torch.equal(streams["train"], dm.token_streams()["train"])
    prompts = next(iter(dm.next_line_dataloader("test", batch_size=5)))
    assert prompts["input_ids"].shape[0] == 5
    test_docs = {n for n, _ in dm.corpus.docs["test"]}
    assert set(prompts["doc"]) <= test_docs


def _files_dm(root, cache, **kw):
    args = dict(source="files", paths=[str(root)], vocab_size=300, block_size=16, val_fraction=0.2,
                test_fraction=0.2, cache_dir=cache, progress=False)
    return LMCorpusDataModule(**{**args, **kw})


def test_token_cache_is_keyed_by_what_made_it(tmp_path, tokenizer):
    """A changed corpus (even an edit that keeps a file's length), limit or tokenizer never reuses a stale file."""
    root, cache = write_corpus(tmp_path / "corpus", n=10), tmp_path / "cache"
    first = _files_dm(root, str(cache), tokenizer=tokenizer).token_streams()
    again = _files_dm(root, str(cache), tokenizer=tokenizer)
    assert torch.equal(again.token_streams()["train"], first["train"])
    assert len(list(cache.glob("tokens-*.pt"))) == 1
    # same corpus, fewer documents
    fewer = _files_dm(root, str(cache), tokenizer=tokenizer, max_docs=6).token_streams()
    assert len(list(cache.glob("tokens-*.pt"))) == 2
    assert sum(v.numel() for v in fewer.values()) < sum(v.numel() for v in first.values())
    # another tokenizer
    other_tok = train_bpe_tokenizer([CODE * 2], vocab_size=280, progress=False)
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(tokenizer)
    _files_dm(root, str(cache), tokenizer=other_tok).token_streams()
    assert len(list(cache.glob("tokens-*.pt"))) == 3
    # an edited file of the same length: new content, new key, fresh streams
    victim = next(p for p in sorted(root.glob("*.py")))
    text = victim.read_text()
    victim.write_text(text.replace("return a + b", "return b + a"))
    assert len(victim.read_text()) == len(text)
    edited = _files_dm(root, str(cache), tokenizer=tokenizer)
    fresh = _files_dm(root, None, tokenizer=tokenizer).token_streams()
    for split in fresh:
        assert torch.equal(edited.token_streams()[split], fresh[split])
    assert len(list(cache.glob("tokens-*.pt"))) == 4


def test_token_cache_default_location_is_the_cache_root(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "root"))
    root = write_corpus(tmp_path / "corpus", n=6)
    dm = _files_dm(root, True, tokenizer=tokenizer)
    dm.token_streams()
    path = dm.token_cache_path()
    assert path.parent == tmp_path / "root" / "token_streams" and path.exists()
    assert _files_dm(root, None, tokenizer=tokenizer).token_cache_path() is None
    assert _files_dm(root, False, tokenizer=tokenizer).token_cache_path() is None


LOADED = []


class _Payload:
    """Unpickling this object runs code (appends to LOADED): a cache must never do that."""

    def __reduce__(self):
        return (LOADED.append, ("ran",))


def test_token_cache_with_pickled_code_is_refused(tmp_path, tokenizer):
    root = write_corpus(tmp_path / "corpus", n=6)
    dm = _files_dm(root, str(tmp_path / "cache"), tokenizer=tokenizer)
    path = dm.token_cache_path()
    path.parent.mkdir(parents=True)
    torch.save({"key": dm.token_cache_key(), "streams": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        dm.token_streams()
    assert LOADED == [] and path.exists()


def test_truncated_token_cache_is_recomputed(tmp_path, tokenizer):
    root = write_corpus(tmp_path / "corpus", n=6)
    dm = _files_dm(root, str(tmp_path / "cache"), tokenizer=tokenizer)
    want = dm.token_streams()
    path = dm.token_cache_path()
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.warns(UserWarning, match="unreadable token cache"):
        got = _files_dm(root, str(tmp_path / "cache"), tokenizer=tokenizer).token_streams()
    assert all(torch.equal(got[k], want[k]) for k in want)
