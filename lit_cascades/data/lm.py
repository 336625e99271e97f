"""Language-model corpora, a small byte-level BPE tokenizer, and the next-line completion task.

Sources (``source=``):

* ``"stdlib"`` (embedded default): the ``*.py`` files of the running Python's standard library — ~12 MB of
  real code and docstrings that every Python install has. Directories named ``test``, ``tests``,
  ``idle_test``, ``site-packages`` and ``__pycache__`` are excluded.
* ``"files"``: local text files, directories (walked for ``patterns``) or glob patterns.
* ``"hf"``: a Hugging Face ``datasets`` dataset (hub id, a ``save_to_disk`` directory, or a builder such as
  ``"json"`` with ``hf_data_files``), one document per row of ``hf_text_field``. Needs ``pip install datasets``.

Documents are split into train/val/test at the **document (file) level**, deterministically: documents are
ordered by the MD5 of their name and the first ``val_fraction`` go to val, the next ``test_fraction`` to test,
the rest to train (at least one each). A single long file can first be cut into ``chunk_lines``-line pieces.

The tokenizer (:func:`train_bpe_tokenizer`) is byte-level BPE trained on the training split only. Its
pre-tokenizer ends a piece after every ``"\\n"``, so a newline is always its own token and a prompt that ends
at a line boundary tokenizes exactly as it does inside the training text — which makes next-line completion
well posed.

:class:`NextLineDataset` is the generative evaluation task shared by the LM recipes: given the preceding lines
of a held-out file (left-truncated to ``context_tokens`` tokens), greedily generate the next line; quality is
exact match or token F1 (:mod:`lit_cascades.functional.text`).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_cascades import io
from lit_cascades._progress import progress_bar
from lit_cascades.data.sampling import SplitLoaders

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXCLUDED_DIRS: frozenset[str] = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SOURCES: tuple[str, ...] = ("stdlib", "files", "hf")


@dataclass
class Corpus:
    """Documents per split: ``docs[split]`` is a list of ``(name, text)``."""

    docs: dict[str, list[tuple[str, str]]]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def texts(self, split: str) -> list[str]:
        return [text for _, text in self.docs[split]]

    def fingerprint(self) -> str:
        """A short hash of every split's document names and sizes (cache keys)."""
        h = hashlib.md5()
        for split in SPLITS:
            for name, text in self.docs[split]:
                h.update(f"{split}\0{name}\0{len(text)}\n".encode())
        return h.hexdigest()[:16]

    def content_hash(self) -> str:
        """A hash of every split's document names **and texts** (an edited file changes it)."""
        h = hashlib.sha256()
        for split in SPLITS:
            for name, text in self.docs[split]:
                h.update(f"{split}\0{name}\0{len(text)}\0".encode())
                h.update(text.encode("utf-8", errors="surrogatepass"))
        return h.hexdigest()[:24]


def stdlib_root() -> Path:
    """The directory holding Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, patterns: Sequence[str], exclude: frozenset[str]) -> list[Path]:
    found: set[Path] = set()
    for pattern in patterns:
        for p in root.rglob(pattern):
            if p.is_file() and not (exclude & set(p.relative_to(root).parts[:-1])):
                found.add(p)
    return sorted(found)


def stdlib_files() -> list[Path]:
    """``*.py`` files of the standard library, minus test suites and installed packages, sorted."""
    return _walk(stdlib_root(), ("*.py",), EXCLUDED_DIRS)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _file_docs(paths: Sequence[str | os.PathLike], patterns: Sequence[str]) -> list[tuple[str, str]]:
    files: list[Path] = []
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            files.extend(_walk(p, patterns, frozenset({"__pycache__"})))
        elif p.is_file():
            files.append(p)
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"corpus path {str(entry)!r} is not a file, a directory or a matching glob")
            files.extend(matches)
    docs = [(str(f), _read(f)) for f in dict.fromkeys(files)]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(
            f"no text found under `paths`={[str(p) for p in paths]} (patterns {list(patterns)}); expected "
            "non-empty text files"
        )
    return docs


def _hf_docs(name: str, config: str | None, split: str, text_field: str,
             data_files: Any = None) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("source='hf' needs the `datasets` package: pip install datasets") from err
    local = Path(name).expanduser()
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    if text_field not in ds.column_names:
        raise ValueError(f"`hf_text_field`={text_field!r} is not a column of {name!r}; columns: {ds.column_names}")
    docs = [(f"{name}[{i}]", t) for i, t in enumerate(ds[text_field]) if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError(f"dataset {name!r} (split {split!r}) has no non-empty `{text_field}` rows")
    return docs


def _chunk(docs: list[tuple[str, str]], chunk_lines: int) -> list[tuple[str, str]]:
    out = []
    for name, text in docs:
        lines = text.split("\n")
        for start in range(0, len(lines), chunk_lines):
            piece = "\n".join(lines[start:start + chunk_lines])
            if piece.strip():
                out.append((f"{name}:{start + 1}", piece))
    return out


def split_documents(
    docs: Sequence[tuple[str, str]], val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[tuple[str, str]]]:
    """Deterministic document-level split by the MD5 order of the names (at least one document per split).

    Returns ``{"train": [...], "val": [...], "test": [...]}``, each sorted by name.
    """
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"`{key}` must be in (0, 1); got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"`val_fraction + test_fraction` must be < 1; got {val_fraction + test_fraction}")
    if len(docs) < 3:
        raise ValueError(
            f"a train/val/test split needs at least 3 documents; got {len(docs)} (use `chunk_lines` to cut a "
            "single long file into pieces)"
        )
    ranked = sorted(docs, key=lambda d: hashlib.md5(d[0].encode()).hexdigest())
    n = len(ranked)
    n_val = max(1, math.floor(val_fraction * n))
    n_test = max(1, math.floor(test_fraction * n))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} documents leave no training document with these fractions")
    parts = {"val": ranked[:n_val], "test": ranked[n_val:n_val + n_test], "train": ranked[n_val + n_test:]}
    return {k: sorted(parts[k]) for k in SPLITS}


def load_corpus(
    source: str = "stdlib",
    paths: Sequence[str | os.PathLike] | None = None,
    patterns: Sequence[str] = ("*.txt", "*.md", "*.py", "*.rst"),
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    hf_text_field: str = "text",
    hf_data_files: Any = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    chunk_lines: int | None = None,
    max_docs: int | None = None,
) -> Corpus:
    """Load and split a corpus (see the module docstring for the sources).

    Args:
        source: ``"stdlib"``, ``"files"`` or ``"hf"``.
        paths: files, directories or globs (``source="files"``).
        patterns: file-name patterns used when walking directories.
        hf_dataset, hf_config, hf_split, hf_text_field, hf_data_files: the ``datasets`` source.
        val_fraction, test_fraction: document fractions of the held-out splits.
        chunk_lines: cut each document into pieces of this many lines before splitting.
        max_docs: keep only this many documents (the first by MD5 order of names; for quick runs).
    """
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {list(SOURCES)}; got {source!r}")
    if source == "stdlib":
        root = stdlib_root()
        files = {str(p.relative_to(root)): p for p in stdlib_files()}
        names = sorted(files)
        if max_docs is not None and chunk_lines is None:  # read only the files that will be kept
            names = sorted(names, key=lambda n: hashlib.md5(n.encode()).hexdigest())[: 2 * max_docs]
        docs = [(n, _read(files[n])) for n in names]
        docs = [(n, t) for n, t in docs if t.strip()]
    elif source == "files":
        if not paths:
            raise ValueError("source='files' needs `paths` (files, directories or glob patterns)")
        docs = _file_docs(list(paths), patterns)
    else:
        if not hf_dataset:
            raise ValueError("source='hf' needs `hf_dataset` (a hub id, a save_to_disk directory or 'json'/'text')")
        docs = _hf_docs(hf_dataset, hf_config, hf_split, hf_text_field, hf_data_files)
    if chunk_lines is not None:
        if chunk_lines < 1:
            raise ValueError(f"`chunk_lines` must be >= 1; got {chunk_lines}")
        docs = _chunk(docs, chunk_lines)
    if max_docs is not None:
        if max_docs < 3:
            raise ValueError(f"`max_docs` must be >= 3 (one document per split); got {max_docs}")
        docs = sorted(docs, key=lambda d: hashlib.md5(d[0].encode()).hexdigest())[:max_docs]
    split = split_documents(docs, val_fraction, test_fraction)
    return Corpus(split, source, {"num_docs": {k: len(v) for k, v in split.items()}})


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                        progress: bool = True):
    """Train a byte-level BPE tokenizer with the ``tokenizers`` library.

    The pre-tokenizer first splits after each ``"\\n"`` (so the newline is a token of its own and line
    boundaries are token boundaries), then applies GPT-2's byte-level regex. Special tokens:
    ``<|endoftext|>`` (id 0; eos/bos, separates documents) and ``<|pad|>`` (id 1).

    Args:
        texts: training documents.
        vocab_size: total vocabulary size including the 256 byte tokens and the 2 special tokens.
        min_frequency: minimum pair count for a merge.
        progress: show the ``tokenizers`` training progress (stderr).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (save it with ``save_pretrained``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"`vocab_size` must be >= 260 (256 bytes + special tokens); got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
    )
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=1_000_000, clean_up_tokenization_spaces=False,
    )


def ensure_pad_token(tokenizer) -> Any:
    """Give a tokenizer without a pad token its eos token as pad (GPT-2 convention); returns it."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token` first")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def newline_counts(tokenizer, vocab_size: int | None = None, eos_stops: bool = True) -> Tensor:
    """``[V]`` float: how many ``"\\n"`` each token decodes to (the stop counts of next-line completion).

    With ``eos_stops`` the eos token counts as a full stop (an output never continues past it). ``vocab_size``
    pads the vector to a model's (possibly larger) output size.
    """
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    counts = torch.zeros(max(size, vocab_size or 0))
    counts[:size] = torch.tensor([float(t.count("\n")) for t in texts])
    if not bool((counts > 0).any()):
        raise ValueError("the tokenizer has no token that decodes to a newline; next-line completion needs one")
    if eos_stops and tokenizer.eos_token_id is not None:
        counts[tokenizer.eos_token_id] = 1e6
    return counts


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of every token whose decoded text contains ``"\\n"``."""
    return [i for i, c in enumerate(newline_counts(tokenizer, eos_stops=False).tolist()) if c > 0]


def next_line(generated: str) -> str:
    """The completed line in a next-line generation: the text between its first and second newline.

    Prompts end before the newline that closes their last line, so a generation reads
    ``[rest of that line]\\n<the next line>\\n...``; no newline at all means no next line (``""``).
    """
    parts = generated.split("\n")
    return parts[1] if len(parts) > 1 else ""


def tokenize_stream(texts: Sequence[str], tokenizer, batch: int = 256, progress: bool = True,
                    desc: str = "tokenizing") -> Tensor:
    """Concatenate documents into one ``[N]`` int64 token stream, each followed by the eos token.

    ``progress`` shows a bar over the documents (stderr); ``desc`` labels it.
    """
    eos = tokenizer.eos_token_id
    pieces: list[Tensor] = []
    with progress_bar(desc=desc, total=len(texts), unit="doc", progress=progress) as bar:
        for start in range(0, len(texts), batch):
            enc = tokenizer(list(texts[start:start + batch]), add_special_tokens=False)["input_ids"]
            for ids in enc:
                pieces.append(torch.tensor([*ids, eos] if eos is not None else ids, dtype=torch.long))
            bar.update(len(enc))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what makes a tokenizer encode text the way it does (cache keys).

    Fast tokenizers: their full serialisation (model, merges, normaliser, pre-tokenizer, added tokens);
    others: their class, vocabulary, merges (``bpe_ranks``) and special tokens.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr(sorted(getattr(tokenizer, "bpe_ranks", {}).items())).encode())
    h.update(repr(sorted((k, str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items())).encode())
    return h.hexdigest()[:24]


class BlockDataset(Dataset):
    """Non-overlapping ``block_size`` windows of a token stream; items are ``{"input_ids": [block_size]}``."""

    def __init__(self, stream: Tensor, block_size: int) -> None:
        if block_size < 2:
            raise ValueError(f"`block_size` must be >= 2; got {block_size}")
        n = stream.numel() // block_size
        if n == 0:
            raise ValueError(
                f"the token stream ({stream.numel()} tokens) is shorter than one block of {block_size} tokens"
            )
        self.blocks = stream[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[i]}


@dataclass
class NextLineExample:
    """One next-line completion prompt: ``input_ids`` (the tokenized preceding lines) and the true line."""

    input_ids: Tensor
    target: str
    doc: str
    line: int


class NextLineDataset(Dataset):
    """Next-line completion on held-out documents (the generative evaluation task of the LM recipes).

    Candidate targets are non-blank lines with at least ``min_context_lines`` lines before them whose
    tokenization as ``"\\n" + line + "\\n"`` (what the model must generate) fits in ``max_target_tokens``;
    ``num_examples`` of them are drawn with ``seed`` (without replacement, documents in name order). The
    prompt is the preceding lines joined by newlines **without** the final newline (tokenizers that merge a
    newline with the next line's indentation then see the text as it was tokenized in training), tokenized
    and left-truncated to ``context_tokens`` tokens. Generation stops at the second newline and the
    completed line is :func:`next_line` of the output.

    Items are :class:`NextLineExample`; batch them with :func:`collate_prompts`.
    """

    def __init__(
        self,
        docs: Sequence[tuple[str, str]],
        tokenizer,
        num_examples: int = 1000,
        context_tokens: int = 128,
        max_target_tokens: int = 32,
        min_context_lines: int = 3,
        seed: int = 0,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"`num_examples` must be >= 1; got {num_examples}")
        if context_tokens < 1 or max_target_tokens < 1:
            raise ValueError(
                f"`context_tokens` and `max_target_tokens` must be >= 1; got {context_tokens}, {max_target_tokens}"
            )
        candidates = [
            (d, i)
            for d, (_, text) in enumerate(docs)
            for i, line in enumerate(text.split("\n"))
            if i >= min_context_lines and line.strip()
        ]
        if not candidates:
            raise ValueError(
                f"no next-line candidates in {len(docs)} documents (need non-blank lines after "
                f"{min_context_lines} context lines)"
            )
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(candidates), generator=g).tolist()
        split_lines = {}
        self.examples: list[NextLineExample] = []
        # draw in chunks until enough candidates pass the target-length filter
        for start in range(0, len(order), max(4 * num_examples, 256)):
            chunk = [candidates[j] for j in order[start:start + max(4 * num_examples, 256)]]
            targets, prompts = [], []
            for d, i in chunk:
                if d not in split_lines:
                    split_lines[d] = docs[d][1].split("\n")
                lines = split_lines[d]
                # walk back until the text surely holds more than `context_tokens` tokens (a byte-level
                # token is rarely longer than 6 characters), at most `context_tokens` lines
                first, chars = i, 0
                while first > 0 and i - first < context_tokens and chars < 6 * context_tokens:
                    first -= 1
                    chars += len(lines[first]) + 1
                prompts.append("\n".join(lines[first:i]))
                targets.append(lines[i])
            target_ids = tokenizer(["\n" + t + "\n" for t in targets], add_special_tokens=False)["input_ids"]
            prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            for (d, i), t, tid, pid in zip(chunk, targets, target_ids, prompt_ids):
                if len(tid) <= max_target_tokens and len(pid) > 0:
                    ids = torch.tensor(pid[-context_tokens:], dtype=torch.long)
                    self.examples.append(NextLineExample(ids, t, docs[d][0], i))
                    if len(self.examples) == num_examples:
                        break
            if len(self.examples) == num_examples:
                break
        if not self.examples:
            raise ValueError(f"no next-line target fits in max_target_tokens={max_target_tokens}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> NextLineExample:
        return self.examples[i]


def collate_prompts(pad_token_id: int):
    """A collate function that left-pads :class:`NextLineExample` prompts for batched generation.

    The batch is ``{"input_ids": [B, L], "attention_mask": [B, L], "target": list[str], "index": [B]}``
    where ``index`` holds the dataset positions (``doc``/``line`` are kept as lists too).
    """

    def collate(items: Sequence[NextLineExample]) -> dict[str, Any]:
        length = max(int(x.input_ids.numel()) for x in items)
        ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, x in enumerate(items):
            n = x.input_ids.numel()
            ids[row, length - n:] = x.input_ids
            mask[row, length - n:] = 1
        return {
            "input_ids": ids, "attention_mask": mask, "target": [x.target for x in items],
            "doc": [x.doc for x in items], "line": torch.tensor([x.line for x in items]),
        }

    return collate


class LMCorpusDataModule(SplitLoaders, L.LightningDataModule):
    """Token blocks of a corpus for causal-LM training, plus next-line prompts for evaluation.

    ``setup()`` loads and splits the corpus (see :func:`load_corpus`), trains a BPE tokenizer on the training
    split unless one is given (``self.tokenizer``), and tokenizes each split into a stream of
    ``block_size``-token blocks (documents separated by the eos token). Batches are
    ``{"input_ids": [B, block_size]}``; models compute their own shifted next-token loss.

    Args:
        source, paths, patterns, hf_*, val_fraction, test_fraction, chunk_lines, max_docs: see
            :func:`load_corpus`.
        tokenizer: a tokenizer object, or a hub id / directory to load one; ``None`` trains a BPE tokenizer.
        vocab_size: size of the trained tokenizer.
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        num_workers: DataLoader workers.
        next_line: keyword arguments of :class:`NextLineDataset` used by :meth:`next_line_dataset`.
        cache_dir: cache the token streams (tokenizing the stdlib takes ~15 s): a directory, ``True`` for the
            default ``<cache root>/token_streams`` (:func:`lit_cascades.io.cache_dir`; the root is
            ``$LIT_CASCADES_CACHE``), or ``None``/``False`` for no cache. A file is named by the hash of
            everything that determines its content (:meth:`token_cache_key`: the documents' names and texts per
            split and the tokenizer), so a changed corpus, limit or tokenizer never reuses a stale file; it is
            written atomically and read back with ``weights_only=True``.
        progress: show progress bars while training the tokenizer and tokenizing (stderr; rank 0 only).
    """

    def __init__(
        self,
        source: str = "stdlib",
        paths: Sequence[str] | None = None,
        patterns: Sequence[str] = ("*.txt", "*.md", "*.py", "*.rst"),
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_text_field: str = "text",
        hf_data_files: Any = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        chunk_lines: int | None = None,
        max_docs: int | None = None,
        tokenizer: Any = None,
        vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        next_line: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.corpus: Corpus | None = None
        self.datasets: dict[str, BlockDataset] = {}

    def load(self) -> Corpus:
        """Load and split the corpus once (idempotent); returns it."""
        if self.corpus is None:
            h = self.hparams
            self.corpus = load_corpus(
                h.source, h.paths, h.patterns, h.hf_dataset, h.hf_config, h.hf_split, h.hf_text_field,
                h.hf_data_files, h.val_fraction, h.test_fraction, h.chunk_lines, h.max_docs,
            )
        return self.corpus

    def get_tokenizer(self):
        """The tokenizer: given, loaded from a path/id, or trained on the training split."""
        if self.tokenizer is None:
            self.tokenizer = train_bpe_tokenizer(self.load().texts("train"), self.hparams.vocab_size,
                                                 progress=self._progress())
        elif isinstance(self.tokenizer, str | os.PathLike):
            from lit_cascades.models.hf import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        return ensure_pad_token(self.tokenizer)

    def _progress(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return bool(self.hparams.get("progress", True)) and (trainer is None or trainer.is_global_zero)

    def token_cache_key(self) -> dict[str, Any]:
        """What the token streams depend on: the corpus content (documents per split, names and texts; so the
        source, paths, patterns, ``max_docs``, ``chunk_lines`` and fractions) and the tokenizer."""
        corpus, tok = self.load(), self.get_tokenizer()
        return {"kind": "token_streams", "version": 1, "corpus": corpus.content_hash(),
                "num_docs": {k: len(v) for k, v in corpus.docs.items()},
                "tokenizer": tokenizer_fingerprint(tok), "eos_token_id": tok.eos_token_id}

    def token_cache_path(self) -> Path | None:
        """The cache file of :meth:`token_streams` (``None`` without ``cache_dir``)."""
        where = self.hparams.cache_dir
        if where is None or where is False:
            return None
        base = io.cache_dir("token_streams") if where is True else Path(where).expanduser()
        return base / f"tokens-{io.config_hash(self.token_cache_key())}.pt"

    def token_streams(self) -> dict[str, Tensor]:
        """``{split: [N] token stream}`` of the corpus, from the cache when ``cache_dir`` holds it.

        Raises:
            ValueError: the cache file holds pickled objects beyond tensors (refused, never unpickled).
        """
        corpus, tok = self.load(), self.get_tokenizer()
        cache = self.token_cache_path()
        if cache is not None and cache.exists():
            key = self.token_cache_key()
            try:
                saved = io.safe_torch_load(cache)
            except ValueError:
                raise
            except Exception as err:  # a truncated or foreign file: recompute and replace it
                warnings.warn(f"unreadable token cache {cache} ({err}); re-tokenizing", UserWarning, stacklevel=2)
            else:
                if isinstance(saved, dict) and saved.get("key") == key:
                    return saved["streams"]
                warnings.warn(f"token cache {cache} was written for another corpus/tokenizer; re-tokenizing",
                              UserWarning, stacklevel=2)
        streams = {split: tokenize_stream(corpus.texts(split), tok, progress=self._progress(),
                                          desc=f"tokenizing {split}") for split in SPLITS}
        if cache is not None:
            io.atomic_save({"key": self.token_cache_key(), "streams": streams}, cache)
        return streams

    def setup(self, stage: str | None = None) -> None:
        if any(split not in self.datasets for split in SPLITS):
            streams = self.token_streams()
            for split in SPLITS:
                self.datasets[split] = BlockDataset(streams[split], self.hparams.block_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, drop_last=shuffle)

    def next_line_dataset(self, split: str = "test", **overrides: Any) -> NextLineDataset:
        """Next-line prompts from the held-out documents of ``split`` (``"val"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {list(SPLITS)}; got {split!r}")
        kwargs = {**(self.hparams.next_line or {}), **overrides}
        return NextLineDataset(self.load().docs[split], self.get_tokenizer(), **kwargs)

    def next_line_dataloader(self, split: str = "test", batch_size: int | None = None,
                             **overrides: Any) -> DataLoader:
        """A DataLoader of left-padded next-line prompts (see :func:`collate_prompts`), in a fixed order."""
        tok = self.get_tokenizer()
        return DataLoader(self.next_line_dataset(split, **overrides),
                          batch_size=batch_size or self.hparams.batch_size, shuffle=False,
                          collate_fn=collate_prompts(tok.pad_token_id))
