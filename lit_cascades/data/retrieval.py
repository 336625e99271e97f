"""Text retrieval data: an embedded code-search task from Python's standard library, and MS MARCO files.

Used by USTAD (Kim et al., ICML 2024): training triples (query, positive
document, hard negatives) and, per evaluation split, the queries, the corpus searched and the qrels.

Sources:

* ``"stdlib"`` (embedded, offline, the default): a CodeSearchNet-style task built with :mod:`ast` from the
  ``*.py`` files of the running Python's standard library (:func:`~lit_cascades.data.lm.stdlib_files`).
  For every function or method that has a docstring, the **query** is the docstring's first sentence and
  the **document** is the function's source (decorators and signature included) with the docstring removed
  (:func:`extract_code_search_pairs`). Filtered out: one-line definitions, functions whose remaining body
  has fewer than ``min_code_lines`` non-blank lines (e.g. only ``pass``), queries with fewer than
  ``min_query_words`` words, queries that are not unique (case-insensitive: "Return the name." would have
  many right answers) and duplicate documents (first kept). The split is deterministic and **by file**
  (:func:`~lit_cascades.data.lm.split_documents`: MD5 order of the relative path), so no module contributes
  to two splits. Each query has exactly one relevant document (gain 1).

  Hard negatives (choice; the paper trains on MS MARCO's BM25 negatives, which need an index we do not
  ship): the other functions **of the same file** — same vocabulary, same imports, often the same class —
  a cheap, lexically close set. Files with fewer than ``num_negatives + 1`` functions are topped up with
  random training documents.

* ``"msmarco"``: MS MARCO passage ranking files in their published TSV formats (see
  :func:`load_msmarco_split`): ``collection.tsv`` (``pid<TAB>passage``), ``queries.<split>.tsv``
  (``qid<TAB>query``), ``qrels.<split>.tsv`` (TREC ``qid 0 pid rel`` or two columns ``qid pid``), and
  optionally a hard-negative file (``qid<TAB>pid[,pid...]`` lines, or ``qid<TAB>pos_pid<TAB>neg_pid`` triples
  such as ``qidpidtriples.train.full.2.tsv``). Download them from https://microsoft.github.io/msmarco/.

Training items (collated batches): ``query`` list[str] ``[B]``, ``positive`` list[str] ``[B]``,
``positive_id`` ``[B]`` (corpus row of the positive in the training corpus), ``negatives``
list[list[str]] ``[B][H]``, ``negative_ids`` ``[B, H]``, ``index`` ``[B]`` (training-pair row).
Evaluation batches: ``query`` list[str] ``[B]``, ``query_index`` ``[B]`` (rows of the split's queries in its
:class:`~lit_cascades.functional.retrieval.Qrels`). The corpus of an evaluation split is served by
:meth:`RetrievalDataModule.eval_corpus` (the module encodes it once per evaluation).
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lit_cascades._progress import progress_bar
from lit_cascades.data.lm import split_documents, stdlib_files, stdlib_root
from lit_cascades.data.sampling import EpochSeededSampler, process_batch_size
from lit_cascades.functional.retrieval import Qrels

SPLITS = ("train", "val", "test")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


# ------------------------------------------------------------------------------------------------- splits
@dataclass
class RetrievalSplit:
    """Queries, the corpus they are searched in, relevance judgements and optional hard negatives.

    Attributes:
        query_ids / queries: ``Q`` unique ids and their texts.
        doc_ids / docs: ``N`` unique ids and their texts (the corpus).
        qrels: ``{query_id: {doc_id: gain}}``; gains > 0 are relevant.
        negatives: ``{query_id: [doc_id, ...]}`` hard negatives (may be empty).
    """

    query_ids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]
    qrels: dict[str, dict[str, float]]
    negatives: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, ids, texts in (("query", self.query_ids, self.queries), ("document", self.doc_ids, self.docs)):
            if len(ids) != len(texts):
                raise ValueError(f"{len(ids)} {what} ids but {len(texts)} {what} texts; expected one text per id")
            if len(set(ids)) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1) if len(ids) < 10_000 else "?"
                raise ValueError(f"duplicate {what} ids (e.g. {dup!r}); expected unique ids")
            empty = [i for i, t in zip(ids, texts) if not t.strip()]
            if empty:
                raise ValueError(f"{len(empty)} empty {what} texts (e.g. id {empty[0]!r}); expected non-empty text")
        self._doc_row = {d: i for i, d in enumerate(self.doc_ids)}
        missing = {d for judged in self.qrels.values() for d in judged if d not in self._doc_row}
        if missing:
            raise ValueError(f"{len(missing)} judged documents are not in the corpus (e.g. {sorted(missing)[:3]})")

    def doc_row(self, doc_id: str) -> int:
        return self._doc_row[doc_id]

    def positives(self, query_id: str) -> list[str]:
        """Relevant documents (gain > 0) of ``query_id``, in qrels order."""
        return [d for d, g in self.qrels.get(query_id, {}).items() if g > 0]

    def queries_without_relevant(self) -> list[str]:
        """Query ids with no relevant document in the qrels (reported by the metrics, never dropped)."""
        return [q for q in self.query_ids if not self.positives(q)]

    def qrels_tensor(self) -> Qrels:
        """The qrels over query rows / corpus rows (:class:`~lit_cascades.functional.retrieval.Qrels`)."""
        return Qrels.from_dict(self.qrels, self.query_ids, self.doc_ids)

    def subset_queries(self, n: int | None) -> RetrievalSplit:
        """The first ``n`` queries (all when ``None``), same corpus."""
        if n is None or n >= len(self.query_ids):
            return self
        keep = self.query_ids[:n]
        return RetrievalSplit(keep, self.queries[:n], self.doc_ids, self.docs,
                              {q: self.qrels[q] for q in keep if q in self.qrels},
                              {q: self.negatives[q] for q in keep if q in self.negatives})


# ------------------------------------------------------------------------------------- code search (stdlib)
def first_sentence(docstring: str) -> str:
    """First sentence of the first paragraph of a (cleaned) docstring, whitespace collapsed."""
    para = docstring.strip().split("\n\n", 1)[0]
    para = " ".join(para.split())
    return _SENTENCE_END.split(para, maxsplit=1)[0].strip()


def _function_document(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, int] | None:
    """Source of ``node`` without its docstring and the number of non-blank body lines left (``None`` when the
    docstring shares a line with the signature or code)."""
    doc = node.body[0]
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    if doc.lineno == node.lineno or doc.end_lineno is None or node.end_lineno is None:
        return None
    head = lines[start - 1 : doc.lineno - 1]
    body = lines[doc.end_lineno : node.end_lineno]
    if any(line.strip() for line in lines[doc.lineno - 1 : doc.end_lineno] if line.strip().endswith(";")):
        return None
    n_body = sum(1 for line in body if line.strip() and not line.strip().startswith("#"))
    return textwrap.dedent("\n".join(head + body)).strip("\n"), n_body


def _file_pairs(name: str, source: str, min_query_words: int, max_query_words: int,
                min_code_lines: int) -> list[dict[str, str]]:
    """The (unfiltered for duplicates) pairs of one file, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out: list[dict[str, str]] = []
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        children = list(ast.iter_child_nodes(node))
        for child in reversed(children):
            if isinstance(child, ast.ClassDef):
                stack.append((child, f"{prefix}{child.name}."))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                stack.append((child, f"{prefix}{child.name}."))
        for child in children:
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(child)
            if not doc:
                continue
            query = first_sentence(doc)
            if not (min_query_words <= len(query.split()) <= max_query_words) or query.startswith(">>>"):
                continue
            got = _function_document(lines, child)
            if got is None or got[1] < min_code_lines:
                continue
            out.append({"id": f"{name}::{prefix}{child.name}:{child.lineno}", "file": name,
                        "name": f"{prefix}{child.name}", "query": query, "code": got[0]})
    out.sort(key=lambda p: int(p["id"].rsplit(":", 1)[1]))
    return out


def extract_code_search_pairs(
    files: Sequence[tuple[str, str]],
    min_query_words: int = 3,
    max_query_words: int = 64,
    min_code_lines: int = 2,
    progress: bool = True,
    desc: str = "extracting code-search pairs",
) -> list[dict[str, str]]:
    """Docstring → code pairs of every function and method in ``files`` (see the module docstring).

    Args:
        files: ``(name, source)`` pairs (files that fail to parse are skipped).
        min_query_words / max_query_words: bounds on the words of the first sentence.
        min_code_lines: minimum non-blank, non-comment body lines left after removing the docstring.
        progress: show a bar over the files (stderr); ``desc`` labels it.

    Returns:
        ``[{"id", "file", "name", "query", "code"}]`` in file order then source order; ``id`` is
        ``"<file>::<qualified name>:<line>"``. Non-unique queries (case-insensitive) are all removed;
        duplicate documents keep their first occurrence.
    """
    raw: list[dict[str, str]] = []
    for name, source in progress_bar(files, desc=desc, total=len(files), unit="file", progress=progress):
        raw.extend(_file_pairs(name, source, min_query_words, max_query_words, min_code_lines))
    counts: dict[str, int] = {}
    for p in raw:
        counts[p["query"].lower()] = counts.get(p["query"].lower(), 0) + 1
    seen_code: set[str] = set()
    out = []
    for p in raw:
        if counts[p["query"].lower()] > 1 or p["code"] in seen_code:
            continue
        seen_code.add(p["code"])
        out.append(p)
    return out


def _same_file_negatives(pairs: Sequence[dict[str, str]], num: int, seed: int) -> dict[str, list[str]]:
    """Up to ``num`` other documents of the same file per query, chosen by a per-query seeded shuffle."""
    by_file: dict[str, list[str]] = {}
    for p in pairs:
        by_file.setdefault(p["file"], []).append(p["id"])
    out = {}
    for p in pairs:
        others = [d for d in by_file[p["file"]] if d != p["id"]]
        random.Random(f"{seed}:{p['id']}").shuffle(others)
        out["q:" + p["id"]] = others[:num]
    return out


def _pairs_to_split(pairs: Sequence[dict[str, str]], negatives: dict[str, list[str]] | None = None) -> RetrievalSplit:
    return RetrievalSplit(query_ids=["q:" + p["id"] for p in pairs], queries=[p["query"] for p in pairs],
                          doc_ids=[p["id"] for p in pairs], docs=[p["code"] for p in pairs],
                          qrels={"q:" + p["id"]: {p["id"]: 1.0} for p in pairs}, negatives=negatives or {})


def build_code_search_splits(
    files: Sequence[tuple[str, str]],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    num_negatives: int = 8,
    seed: int = 0,
    progress: bool = True,
    **extract_kwargs: Any,
) -> dict[str, RetrievalSplit]:
    """Train/val/test :class:`RetrievalSplit` of the code-search task over ``files`` (split by file name).

    Each split's corpus holds the documents of that split only; ``num_negatives`` same-file negatives are
    stored per training query. ``progress`` shows a bar per split while parsing.
    """
    by_split = split_documents(list(files), val_fraction, test_fraction)
    out = {}
    for split in SPLITS:
        pairs = extract_code_search_pairs(by_split[split], progress=progress, desc=f"code-search pairs ({split})",
                                          **extract_kwargs)
        if not pairs:
            raise ValueError(f"the {split} split has no docstring/code pair; give more files")
        negs = _same_file_negatives(pairs, num_negatives, seed) if split == "train" else None
        out[split] = _pairs_to_split(pairs, negs)
    # a document kept in two splits' corpora would be fine, but the same query text in train and test is a leak
    train_q = {q.lower() for q in out["train"].queries}
    for split in ("val", "test"):
        s = out[split]
        keep = [i for i, q in enumerate(s.queries) if q.lower() not in train_q]
        out[split] = RetrievalSplit([s.query_ids[i] for i in keep], [s.queries[i] for i in keep], s.doc_ids, s.docs,
                                    {s.query_ids[i]: s.qrels[s.query_ids[i]] for i in keep})
    return out


def stdlib_code_search_files() -> list[tuple[str, str]]:
    """``(relative path, source)`` of the standard library files used by the embedded task."""
    root = stdlib_root()
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in stdlib_files()]


# ----------------------------------------------------------------------------------------------- MS MARCO
MSMARCO_HELP = ("MS MARCO passage files are published at https://microsoft.github.io/msmarco/ "
                "(collection.tsv, queries.{train,dev}.tsv, qrels.{train,dev.small}.tsv)")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: expected the file {path}. {MSMARCO_HELP}")
    return path


def read_tsv_texts(path: str | Path, what: str = "TSV file", progress: bool = True) -> dict[str, str]:
    """``id<TAB>text`` lines → ``{id: text}`` (MS MARCO collection / queries). Duplicate ids raise.

    ``progress`` shows a bar over the lines (stderr; the 8.8M-passage collection takes about a minute).
    """
    out: dict[str, str] = {}
    with open(_require(Path(path), what), encoding="utf-8") as f:
        lines = progress_bar(f, desc=f"reading {Path(path).name}", unit="line", unit_scale=True, progress=progress)
        for n, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected 'id<TAB>text'; got {line[:80]!r}")
            key, text = line.split("\t", 1)
            if key in out:
                raise ValueError(f"{path}:{n}: duplicate id {key!r}; expected unique ids in a {what}")
            out[key] = text
    return out


def read_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    """TREC ``qid iter pid rel`` (tabs or spaces) or two-column ``qid pid`` (gain 1) lines → qrels dict."""
    out: dict[str, dict[str, float]] = {}
    with open(_require(Path(path), "qrels file"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 4:
                q, _, d, g = parts
            elif len(parts) == 2:
                (q, d), g = parts, "1"
            else:
                raise ValueError(f"{path}:{n}: expected 'qid 0 pid rel' or 'qid pid'; got {line.strip()[:80]!r}")
            out.setdefault(q, {})[d] = float(g)
    return out


def read_negatives(path: str | Path, progress: bool = True) -> dict[str, list[str]]:
    """Hard negatives: ``qid<TAB>pid[,pid...]`` lines (repeatable) or ``qid<TAB>pos<TAB>neg`` triples.

    ``progress`` shows a bar over the lines (stderr; the triples file has hundreds of millions).
    """
    out: dict[str, list[str]] = {}
    with open(_require(Path(path), "hard-negative file"), encoding="utf-8") as f:
        lines = progress_bar(f, desc=f"reading {Path(path).name}", unit="line", unit_scale=True, progress=progress)
        for n, line in enumerate(lines, 1):
            parts = line.rstrip("\n").split("\t")
            if parts == [""]:
                continue
            if len(parts) == 2:
                negs = [p for p in parts[1].split(",") if p]
            elif len(parts) == 3:
                negs = [parts[2]]
            else:
                raise ValueError(f"{path}:{n}: expected 'qid<TAB>pid,pid,...' or 'qid<TAB>pos<TAB>neg'")
            lst = out.setdefault(parts[0], [])
            lst.extend(d for d in negs if d not in lst)
    return out


def load_msmarco_split(
    collection: dict[str, str],
    queries_file: str | Path,
    qrels_file: str | Path,
    negatives_file: str | Path | None = None,
    max_queries: int | None = None,
    progress: bool = True,
) -> RetrievalSplit:
    """One MS MARCO split over ``collection``: the judged queries of ``queries_file`` (file order; queries
    without judgements are kept and reported as relevant-less), the first ``max_queries`` of them."""
    queries = read_tsv_texts(queries_file, "queries file", progress=progress)
    qrels = read_qrels(qrels_file)
    qids = list(queries)[:max_queries] if max_queries else list(queries)
    negatives = read_negatives(negatives_file, progress=progress) if negatives_file else {}
    return RetrievalSplit(qids, [queries[q] for q in qids], list(collection), list(collection.values()),
                          {q: qrels[q] for q in qids if q in qrels},
                          {q: [d for d in negatives[q] if d in collection] for q in qids if q in negatives})


def _limit_corpus(collection: dict[str, str], keep: set[str], max_docs: int | None) -> dict[str, str]:
    """Every judged document in ``keep`` plus the first other documents up to ``max_docs`` in total."""
    if max_docs is None or len(collection) <= max_docs:
        return collection
    out = {d: collection[d] for d in collection if d in keep}
    for d, t in collection.items():
        if len(out) >= max_docs:
            break
        out.setdefault(d, t)
    return out


# ----------------------------------------------------------------------------------------------- datasets
class TripleDataset(Dataset):
    """(query, positive, ``H`` negatives) items of a training split: one item per relevant (query, doc) pair.

    Negatives come from the split's hard negatives of the query (a sample seeded by ``(seed, item)``, so an
    item's candidate list is the same every epoch and a teacher's scores of it can be cached), topped up with
    random corpus documents; a query's positives are never used as its negatives.
    """

    def __init__(self, split: RetrievalSplit, num_negatives: int = 1, seed: int = 0) -> None:
        if num_negatives < 0:
            raise ValueError(f"`num_negatives` must be >= 0; got {num_negatives}")
        self.split, self.num_negatives, self.seed = split, num_negatives, seed
        self.items = [(q, i, d) for i, q in enumerate(split.query_ids) for d in split.positives(q)]
        if not self.items:
            raise ValueError("the training split has no (query, relevant document) pair")
        if num_negatives and len(split.doc_ids) < num_negatives + 1:
            raise ValueError(f"a corpus of {len(split.doc_ids)} documents cannot give {num_negatives} negatives")

    def __len__(self) -> int:
        return len(self.items)

    def negative_ids(self, i: int) -> list[str]:
        qid, _, _ = self.items[i]
        positives = set(self.split.positives(qid))
        rng = random.Random(f"{self.seed}:{i}")
        pool = [d for d in self.split.negatives.get(qid, []) if d not in positives]
        chosen = rng.sample(pool, min(self.num_negatives, len(pool)))
        while len(chosen) < self.num_negatives:
            d = self.split.doc_ids[rng.randrange(len(self.split.doc_ids))]
            if d not in positives and d not in chosen:
                chosen.append(d)
        return chosen

    def __getitem__(self, i: int) -> dict[str, Any]:
        _, qrow, did = self.items[i]
        negs = self.negative_ids(i)
        s = self.split
        return {"query": s.queries[qrow], "positive": s.docs[s.doc_row(did)], "positive_id": s.doc_row(did),
                "negatives": [s.docs[s.doc_row(d)] for d in negs], "negative_ids": [s.doc_row(d) for d in negs],
                "index": i}


class QueryDataset(Dataset):
    """The queries of an evaluation split with their rows (``query_index``)."""

    def __init__(self, split: RetrievalSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.query_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"query": self.split.queries[i], "query_index": i}


def collate_retrieval(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Lists of strings stay lists; ints become ``LongTensor``s (``negative_ids`` → ``[B, H]``)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.tensor(vals, dtype=torch.long) if isinstance(vals[0], int | list) and key.endswith(
            ("_id", "_ids", "index")) else vals
    if "negative_ids" in out:
        out["negative_ids"] = out["negative_ids"].reshape(len(items), -1)
    return out


# ----------------------------------------------------------------------------------------------- DataModule
class RetrievalDataModule(pl.LightningDataModule):
    """Training triples and evaluation queries/corpus/qrels of a text-retrieval task.

    Args:
        source: ``"stdlib"`` (embedded code search) or ``"msmarco"`` (local files under ``root``).
        root: MS MARCO directory (``source="msmarco"``).
        collection / train_queries / train_qrels / eval_queries / eval_qrels / negatives: MS MARCO file names
            under ``root`` (``negatives`` optional). The dev queries serve as val (the first ``max_val_queries``)
            and test (the first ``max_test_queries``).
        max_corpus: MS MARCO: keep every judged passage of the used queries plus other passages up to this
            many (the full collection is 8.8M passages); ``None``: all.
        val_fraction / test_fraction: stdlib: fractions of files held out.
        min_query_words / min_code_lines: stdlib extraction filters (:func:`extract_code_search_pairs`).
        max_train_queries / max_val_queries / max_test_queries: keep only the first queries of each split.
        num_negatives: hard negatives per training item (``H``); stdlib negatives: other functions of the file.
        batch_size / eval_batch_size / num_workers / seed: loaders (the training order depends on
            ``(seed, epoch)`` only).
        progress: progress bars while parsing the stdlib or reading the MS MARCO files (stderr; rank 0 only).
    """

    def __init__(
        self,
        source: str = "stdlib",
        root: str | None = None,
        collection: str = "collection.tsv",
        train_queries: str = "queries.train.tsv",
        train_qrels: str = "qrels.train.tsv",
        eval_queries: str = "queries.dev.small.tsv",
        eval_qrels: str = "qrels.dev.small.tsv",
        negatives: str | None = None,
        max_corpus: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        min_query_words: int = 3,
        min_code_lines: int = 2,
        max_train_queries: int | None = None,
        max_val_queries: int | None = None,
        max_test_queries: int | None = None,
        num_negatives: int = 1,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if source not in ("stdlib", "msmarco"):
            raise ValueError(f"source: expected 'stdlib' or 'msmarco'; got {source!r}")
        if source == "msmarco" and not root:
            raise ValueError(f"root: source='msmarco' needs root, the directory of the MS MARCO files. {MSMARCO_HELP}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise ValueError(f"{name}: expected a fraction in (0, 1); got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction: val_fraction + test_fraction must be < 1; got {val_fraction} + "
                             f"{test_fraction}")
        if batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (in-batch negatives); got {batch_size}")
        for name, value, low in (("eval_batch_size", eval_batch_size, 1), ("num_negatives", num_negatives, 0),
                                 ("num_workers", num_workers, 0), ("min_query_words", min_query_words, 1),
                                 ("min_code_lines", min_code_lines, 0)):
            if value < low:
                raise ValueError(f"{name}: expected >= {low}; got {value}")
        for name, value in (("max_corpus", max_corpus), ("max_train_queries", max_train_queries),
                            ("max_val_queries", max_val_queries), ("max_test_queries", max_test_queries)):
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected None (no limit) or >= 1; got {value}")
        self.source, self.root = source, root
        self.files = {"collection": collection, "train_queries": train_queries, "train_qrels": train_qrels,
                      "eval_queries": eval_queries, "eval_qrels": eval_qrels, "negatives": negatives}
        self.max_corpus = max_corpus
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.extract_kwargs = {"min_query_words": min_query_words, "min_code_lines": min_code_lines}
        self.limits = {"train": max_train_queries, "val": max_val_queries, "test": max_test_queries}
        self.num_negatives, self.batch_size, self.eval_batch_size = num_negatives, batch_size, eval_batch_size
        self.num_workers, self.seed, self.progress = num_workers, seed, progress
        self.splits: dict[str, RetrievalSplit] = {}
        self.description = ""

    # -- loading -------------------------------------------------------------------------------------------
    def _progress(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return self.progress and (trainer is None or trainer.is_global_zero)

    def load(self) -> dict[str, RetrievalSplit]:
        show = self._progress()
        if self.source == "stdlib":
            return build_code_search_splits(stdlib_code_search_files(), self.val_fraction, self.test_fraction,
                                            num_negatives=max(8, self.num_negatives), seed=0, progress=show,
                                            **self.extract_kwargs)
        root, f = Path(self.root).expanduser(), self.files
        if not root.is_dir():
            raise FileNotFoundError(f"root: the MS MARCO root {root} is not a directory. {MSMARCO_HELP}")
        for arg, name in f.items():  # each file is named by an argument: say which one is missing
            if name and not (root / name).is_file():
                raise FileNotFoundError(f"{arg}: no such file: {root / name} (set {arg}=<file name under root>). "
                                        f"{MSMARCO_HELP}")
        collection = read_tsv_texts(root / f["collection"], "collection file", progress=show)
        train = load_msmarco_split(collection, root / f["train_queries"], root / f["train_qrels"],
                                   root / f["negatives"] if f["negatives"] else None, self.limits["train"],
                                   progress=show)
        n_eval = max(self.limits["val"] or 0, self.limits["test"] or 0) or None
        dev = load_msmarco_split(collection, root / f["eval_queries"], root / f["eval_qrels"], None, n_eval,
                                 progress=show)
        keep = {d for s in (train, dev) for j in s.qrels.values() for d in j}
        keep |= {d for negs in train.negatives.values() for d in negs}
        limited = _limit_corpus(collection, keep, self.max_corpus)
        if len(limited) != len(collection):
            train, dev = (RetrievalSplit(s.query_ids, s.queries, list(limited), list(limited.values()), s.qrels,
                                         s.negatives) for s in (train, dev))
        return {"train": train, "val": dev, "test": dev}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self.load()
        self.splits = {k: s.subset_queries(self.limits[k]) for k, s in splits.items()}
        n = {k: (len(s.query_ids), len(s.doc_ids)) for k, s in self.splits.items()}
        what = ("Python stdlib code search (query: docstring's first sentence; document: the function without it)"
                if self.source == "stdlib" else f"MS MARCO passages from {self.root}")
        self.description = f"{what}; queries/corpus: " + ", ".join(f"{k} {q}/{d}" for k, (q, d) in n.items())
        for k, s in self.splits.items():
            empty = s.queries_without_relevant()
            if empty:
                print(f"[retrieval data] {k}: {len(empty)} of {len(s.query_ids)} queries have no relevant "
                      f"document in the qrels (e.g. {empty[:3]}); reported as `queries_without_relevant`")

    # -- loaders -------------------------------------------------------------------------------------------
    def train_dataset(self) -> TripleDataset:
        self.setup()
        return TripleDataset(self.splits["train"], self.num_negatives, self.seed)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        return DataLoader(ds, batch_size=process_batch_size(self.batch_size, self.trainer),
                          sampler=EpochSeededSampler(len(ds), self.seed),
                          collate_fn=collate_retrieval, num_workers=self.num_workers,
                          drop_last=len(ds) > self.batch_size)

    def query_dataloader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(QueryDataset(self.splits[split]), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=collate_retrieval, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.query_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.query_dataloader("test")

    def eval_corpus(self, split: str) -> tuple[list[str], Qrels]:
        """``(document texts [N], qrels over query rows × corpus rows)`` of an evaluation split."""
        self.setup()
        s = self.splits[split]
        return s.docs, s.qrels_tensor()

    def fingerprint(self) -> str:
        """A short hash of the splits (cache keys for teacher embeddings)."""
        self.setup()
        h = hashlib.md5()
        for k in SPLITS:
            h.update("\0".join(self.splits[k].doc_ids).encode())
        return h.hexdigest()[:16]

