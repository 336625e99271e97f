"""Retrieval data: code-search extraction from stdlib-like files the test writes, the MS MARCO loaders on tiny
TSV files, the training triples and the DataModule."""

from __future__ import annotations

import textwrap

import pytest
import torch

from lit_cascades.data.retrieval import (
    RetrievalDataModule,
    RetrievalSplit,
    TripleDataset,
    build_code_search_splits,
    collate_retrieval,
    extract_code_search_pairs,
    first_sentence,
    read_negatives,
    read_qrels,
)

MODULE = textwrap.dedent('''
    """Module docstring."""
    import functools


    @functools.lru_cache
    def parse_header(line, sep=":"):
        """Split a header line into its name and value.

        More text that is not part of the query.
        """
        name, _, value = line.partition(sep)
        return name.strip(), value.strip()


    def short(x):
        """Return x."""
        return x


    def only_doc():
        """A function whose body is only this docstring."""


    def one_statement(x):
        """A function with a single statement body."""
        return x + 1


    def inline(x): "An inline docstring is not usable here at all."; return x


    class Reader:
        """A class."""

        def read_block(self, size):
            """Read one block of at most size bytes. Then more sentences follow.
            """
            data = self.stream.read(size)
            # a comment line
            return data or b""

        async def fetch_all(self, urls):
            """Fetch every url concurrently and collect the bodies."""
            out = []
            for u in urls:
                out.append(await self.get(u))
            return out


    def dup_a(x):
        """Compute the duplicate thing for x."""
        y = x * 2
        return y


    def dup_b(x):
        """compute the DUPLICATE thing for x."""
        z = x * 3
        return z
''')


def test_first_sentence():
    assert first_sentence("Split a line.  Then more.\n\nOther paragraph.") == "Split a line."
    assert first_sentence("Wrapped first\nsentence here. Second one.") == "Wrapped first sentence here."
    assert first_sentence("No full stop at all") == "No full stop at all"
    assert first_sentence("Version 3.11 changed this. Next.") == "Version 3.11 changed this."


def test_extraction_queries_documents_and_filters():
    pairs = extract_code_search_pairs([("pkg/mod.py", MODULE)], min_query_words=3, min_code_lines=2)
    by_name = {p["name"]: p for p in pairs}
    # kept: multi-line bodies with a >= 3-word first sentence, methods (qualified) and async functions
    assert set(by_name) == {"parse_header", "Reader.read_block", "Reader.fetch_all"}
    p = by_name["parse_header"]
    assert p["query"] == "Split a header line into its name and value."
    line = MODULE.splitlines().index('def parse_header(line, sep=":"):') + 1
    assert p["id"] == f"pkg/mod.py::parse_header:{line}"
    code = p["code"]
    assert code.startswith("@functools.lru_cache\ndef parse_header(line, sep=\":\"):\n")
    assert "Split a header" not in code and "More text" not in code and '"""' not in code
    assert code.rstrip().endswith("return name.strip(), value.strip()")
    rb = by_name["Reader.read_block"]
    assert rb["query"] == "Read one block of at most size bytes."
    assert rb["code"].startswith("def read_block(self, size):\n    data = ")  # dedented, docstring gone
    assert "Then more sentences" not in rb["code"]
    # duplicate queries (case-insensitive) are dropped entirely; one-statement bodies are filtered at 2 lines
    assert "dup_a" not in by_name and "dup_b" not in by_name
    loose = {p["name"] for p in extract_code_search_pairs([("m.py", MODULE)], min_query_words=2, min_code_lines=1)}
    assert {"one_statement", "short"} <= loose and "only_doc" not in loose and "inline" not in loose


def test_extraction_skips_unparsable_files_and_duplicate_code():
    body = 'def f(a):\n    """Add one to the value a."""\n    b = a + 1\n    return b\n'
    twin = body.replace("Add one to the value a.", "Increment the given value.")
    pairs = extract_code_search_pairs([("a.py", body), ("b.py", "def broken(:\n"), ("c.py", twin)])
    assert [p["file"] for p in pairs] == ["a.py"]  # c.py's document is identical once the docstring is removed


def _files(n_files=12, per_file=4):
    files = []
    for f in range(n_files):
        funcs = [f'def fn_{f}_{i}(x):\n    """Compute value number {i} of file {f} quickly."""\n    y = x + {i}\n'
                 f'    return y * {f}\n' for i in range(per_file)]
        files.append((f"lib/file_{f}.py", "\n\n".join(funcs)))
    return files


def test_code_search_splits_are_by_file_deterministic_with_same_file_negatives():
    splits = build_code_search_splits(_files(), val_fraction=0.2, test_fraction=0.2, num_negatives=2)
    again = build_code_search_splits(_files(), val_fraction=0.2, test_fraction=0.2, num_negatives=2)
    assert {k: s.query_ids for k, s in splits.items()} == {k: s.query_ids for k, s in again.items()}
    files = {k: {d.split("::")[0] for d in s.doc_ids} for k, s in splits.items()}
    assert not (files["train"] & files["val"]) and not (files["train"] & files["test"]) and not (files["val"] & files["test"])
    assert sum(len(s.query_ids) for s in splits.values()) == 48
    train = splits["train"]
    for q in train.query_ids:
        (pos,) = train.positives(q)
        assert train.qrels[q] == {pos: 1.0} and q == "q:" + pos
        negs = train.negatives[q]
        assert len(negs) == 2 and pos not in negs
        assert all(n.split("::")[0] == pos.split("::")[0] for n in negs)  # same file
    assert splits["test"].qrels_tensor().num_queries == len(splits["test"].query_ids)


def test_triple_dataset_negatives_and_collate():
    split = RetrievalSplit(["q1", "q2", "q3"], ["find a", "find b", "find c"], ["a", "b", "c", "d"],
                           ["doc a", "doc b", "doc c", "doc d"], {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {}},
                           {"q1": ["b"], "q2": ["c", "a"]})
    ds = TripleDataset(split, num_negatives=2, seed=3)
    assert len(ds) == 3  # one item per relevant pair; q3 has none
    for i in range(len(ds)):
        item = ds[i]
        qid = ds.items[i][0]
        negs = [split.doc_ids[j] for j in item["negative_ids"]]
        assert len(set(negs)) == 2 and not set(negs) & set(split.positives(qid))
        assert item == ds[i]  # fixed per item (a teacher's scores of it can be cached)
    assert "b" in [split.doc_ids[j] for j in ds[0]["negative_ids"]]  # the hard negative is used
    batch = collate_retrieval([ds[0], ds[1]])
    assert batch["query"] == ["find a", "find b"] and batch["positive"] == ["doc a", "doc b"]
    assert batch["negative_ids"].shape == (2, 2) and batch["positive_id"].tolist() == [0, 1]
    assert batch["index"].dtype == torch.long and len(batch["negatives"]) == 2
    assert split.queries_without_relevant() == ["q3"]


def test_split_bad_input():
    with pytest.raises(ValueError, match="duplicate document ids"):
        RetrievalSplit(["q"], ["x y"], ["a", "a"], ["t", "u"], {})
    with pytest.raises(ValueError, match="empty document texts"):
        RetrievalSplit(["q"], ["x y"], ["a", "b"], ["t", "  "], {})
    with pytest.raises(ValueError, match="empty query"):
        RetrievalSplit(["q"], [""], ["a"], ["t"], {})
    with pytest.raises(ValueError, match="not in the corpus"):
        RetrievalSplit(["q"], ["x"], ["a"], ["t"], {"q": {"zz": 1}})


def write_tiny_msmarco(root, negatives=True):
    """Tiny MS MARCO-format files: 8 passages (2 never judged), 3 train queries, 3 dev queries (one without qrels)."""
    root.mkdir(parents=True, exist_ok=True)
    passages = {"10": "the cat sat on the mat", "11": "dogs bark at night", "12": "python is a programming language",
                "13": "the eiffel tower is in paris", "14": "water boils at one hundred degrees", "15": "bees make honey",
                "16": "an unjudged passage", "17": "another unjudged passage"}
    (root / "collection.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in passages.items()))
    (root / "queries.train.tsv").write_text("1\twhere is the cat\n2\twhat do dogs do\n3\twho makes honey\n")
    (root / "qrels.train.tsv").write_text("1\t0\t10\t1\n2\t0\t11\t1\n3\t0\t15\t1\n")
    (root / "queries.dev.small.tsv").write_text("7\twhat is python\n8\twhere is the eiffel tower\n9\tunjudged query\n")
    (root / "qrels.dev.small.tsv").write_text("7 0 12 1\n8 0 13 1\n")
    if negatives:
        (root / "negatives.tsv").write_text("1\t11,12\n2\t10\n")
        (root / "triples.tsv").write_text("1\t10\t13\n1\t10\t14\n3\t15\t99\n")
    return passages


def test_msmarco_readers(tmp_path):
    write_tiny_msmarco(tmp_path)
    assert read_qrels(tmp_path / "qrels.dev.small.tsv") == {"7": {"12": 1.0}, "8": {"13": 1.0}}
    (tmp_path / "two_col.tsv").write_text("7\t12\n7\t13\n")
    assert read_qrels(tmp_path / "two_col.tsv") == {"7": {"12": 1.0, "13": 1.0}}
    assert read_negatives(tmp_path / "negatives.tsv") == {"1": ["11", "12"], "2": ["10"]}
    assert read_negatives(tmp_path / "triples.tsv") == {"1": ["13", "14"], "3": ["99"]}


def test_msmarco_datamodule(tmp_path, capsys):
    write_tiny_msmarco(tmp_path)
    dm = RetrievalDataModule(source="msmarco", root=str(tmp_path), negatives="triples.tsv", max_corpus=7,
                             num_negatives=1, batch_size=2, eval_batch_size=2)
    dm.setup()
    assert "1 of 3 queries have no relevant document" in capsys.readouterr().out  # reported, kept
    train, dev = dm.splits["train"], dm.splits["val"]
    # max_corpus keeps every judged / negative passage, then the first others up to 7 passages
    assert train.doc_ids == dev.doc_ids == ["10", "11", "12", "13", "14", "15", "16"]
    assert train.negatives["1"] == ["13", "14"] and train.negatives.get("3", []) == []  # 99 is not in the collection
    assert dev.query_ids == ["7", "8", "9"] and dev.queries_without_relevant() == ["9"]
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["query"]) == 2 and batch["negative_ids"].shape == (2, 1)
    docs, qrels = dm.eval_corpus("test")
    assert docs == dev.docs and qrels.num_queries == 3
    ev = next(iter(dm.test_dataloader()))
    assert ev["query"] == ["what is python", "where is the eiffel tower"] and ev["query_index"].tolist() == [0, 1]


def test_msmarco_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="^root: source='msmarco' needs root"):
        RetrievalDataModule(source="msmarco")
    with pytest.raises(FileNotFoundError, match="^root: the MS MARCO root .* is not a directory"):
        RetrievalDataModule(source="msmarco", root=str(tmp_path / "nowhere")).setup()
    write_tiny_msmarco(tmp_path)
    (tmp_path / "qrels.train.tsv").unlink()
    dm = RetrievalDataModule(source="msmarco", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^train_qrels: no such file: .*qrels\.train\.tsv.*msmarco"):
        dm.setup()
    write_tiny_msmarco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^negatives: no such file: .*hard\.tsv"):
        RetrievalDataModule(source="msmarco", root=str(tmp_path), negatives="hard.tsv").setup()
    (tmp_path / "collection.tsv").write_text("1\ta\n1\tb\n")
    with pytest.raises(ValueError, match="duplicate id '1'"):
        RetrievalDataModule(source="msmarco", root=str(tmp_path)).setup()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"source": "bm25"}, r"^source: expected 'stdlib' or 'msmarco'"),
    ({"val_fraction": 0.0}, r"^val_fraction: expected a fraction in \(0, 1\)"),
    ({"test_fraction": 1.2}, r"^test_fraction: expected a fraction in \(0, 1\)"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"^val_fraction: val_fraction \+ test_fraction must be < 1"),
    ({"batch_size": 1}, r"^batch_size: expected >= 2"),
    ({"eval_batch_size": 0}, r"^eval_batch_size: expected >= 1"),
    ({"num_negatives": -1}, r"^num_negatives: expected >= 0"),
    ({"max_corpus": 0}, r"^max_corpus: expected None \(no limit\) or >= 1"),
    ({"max_val_queries": 0}, r"^max_val_queries: "),
])
def test_datamodule_rejects_bad_values_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetrievalDataModule(**kwargs)
