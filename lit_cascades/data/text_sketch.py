"""Shared pieces of text + sketch → image retrieval data (TASK-former, Sangkloy et al., ECCV 2022).

Every split yields dicts

=========  ======================  ==================================================================
key        shape / type            meaning
=========  ======================  ==================================================================
image      ``[3, H, W]`` float     the gallery image, RGB in ``[0, 1]``
sketch     ``[1, H, W]`` float     a sketch of it, ink in ``{0, 1}`` (1 = stroke), no colour
caption    ``str``                 a caption of it
labels     ``[C]`` float           multi-hot object classes present in the image (``C`` may be 0)
index      ``[]`` long             the image's row in the split: the gallery id, the query's target
=========  ======================  ==================================================================

One item is one (query, image) pair; evaluation splits hold one query per image, so the split's images are the
retrieval gallery and ``index`` is each query's single relevant image.

:class:`WordVocab` is the caption decoder's word-level vocabulary (built from the training captions).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_cascades.data.sampling import EpochSeededSampler, SplitLoaders, process_batch_size

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


class WordVocab:
    """Word-level caption vocabulary: lower-cased words (punctuation dropped) plus 4 special tokens.

    ids: ``0 <pad>``, ``1 <bos>``, ``2 <eos>``, ``3 <unk>``, then the words.

    Args:
        words: the (non-special) words, in id order.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        dup = [w for w, n in Counter(words).items() if n > 1]
        if dup:
            raise ValueError(f"`words` hold duplicates (e.g. {dup[:3]}); expected unique words")
        bad = [w for w in words if w in self.SPECIALS]
        if bad:
            raise ValueError(f"`words` must not contain the special tokens {self.SPECIALS}; got {bad}")
        self.words = words
        self.itos = [*self.SPECIALS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Lower-cased words of ``text`` (hyphenated words stay whole: ``"t-shirt"``)."""
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordVocab:
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first (ties by word)."""
        counts = Counter(w for c in captions for w in cls.tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[:max_size] if max_size else words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, texts: Sequence[str], max_length: int) -> Tensor:
        """``[B, L]`` ids ``<bos> w_1 .. w_n <eos> <pad>..`` with ``L = min(max_length, longest)``; captions
        longer than ``max_length`` are cut (their ``<eos>`` is dropped)."""
        if max_length < 2:
            raise ValueError(f"`max_length` must be >= 2 (<bos> and <eos>); got {max_length}")
        get, unk = self.stoi.get, self.UNK
        rows = [[self.BOS, *(get(w, unk) for w in self.tokenize(t)), self.EOS][:max_length] for t in texts]
        width = max((len(r) for r in rows), default=2)
        # one tensor from padded lists (a per-row tensor copy cost ~15 us a caption, a training step's worth)
        return torch.tensor([r + [self.PAD] * (width - len(r)) for r in rows], dtype=torch.long).view(-1, width)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Words of ``ids`` up to the first ``<eos>`` (``<bos>``/``<pad>`` skipped)."""
        words = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                words.append(self.itos[i] if 0 <= i < len(self.itos) else self.SPECIALS[self.UNK])
        return " ".join(words)


def check_caption(caption: object, where: str) -> str:
    """Return ``caption`` if it is a non-empty string, else raise naming ``where`` it came from."""
    if not isinstance(caption, str):
        raise TypeError(f"caption of {where} must be a string; got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError(f"caption of {where} is empty; every image needs a non-empty caption")
    return caption


class TextSketchImageDataModule(SplitLoaders, pl.LightningDataModule):
    """Base of the text + sketch → image DataModules: loaders, vocabulary, class names.

    Subclasses fill ``self.splits`` (``{"train", "val", "test"}`` → datasets yielding the items of the module
    docstring), ``self.class_names`` and ``self.description`` in :meth:`setup`, then call
    :meth:`_finish_setup`.

    Args:
        image_size: side of the square images and sketches (>= 8).
        batch_size: training batch size (>= 2); eval_batch_size: evaluation batch size (>= 1).
        seed: seed of the per-epoch shuffling and of the evaluation sketches.
        vocab_min_count / vocab_max_size: caption-decoder vocabulary from the training captions.
        num_workers: DataLoader workers.
    """

    def __init__(self, image_size: int, batch_size: int = 64, eval_batch_size: int = 256, seed: int = 0,
                 vocab_min_count: int = 1, vocab_max_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size: expected >= 8; got {image_size}")
        if batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (in-batch negatives); got {batch_size}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: expected >= 1; got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0; got {num_workers}")
        if vocab_min_count < 1:
            raise ValueError(f"vocab_min_count: expected >= 1; got {vocab_min_count}")
        if vocab_max_size is not None and vocab_max_size < 1:
            raise ValueError(f"vocab_max_size: expected None (no limit) or >= 1; got {vocab_max_size}")
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.vocab_min_count, self.vocab_max_size = vocab_min_count, vocab_max_size
        self.splits: dict[str, Dataset] = {}
        self.class_names: list[str] = []
        self.description = ""
        self.vocab: WordVocab | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_captions(self) -> list[str]:
        """Every training caption (for the vocabulary); subclasses override when items sample captions."""
        raise NotImplementedError

    def _finish_setup(self) -> None:
        self.vocab = WordVocab.build(self.train_captions(), self.vocab_min_count, self.vocab_max_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self.splits[split]
        if shuffle:
            return DataLoader(ds, batch_size=process_batch_size(self.batch_size, self.trainer),
                              sampler=EpochSeededSampler(len(ds), self.seed),
                              num_workers=self.num_workers, drop_last=len(ds) > self.batch_size,
                              persistent_workers=self.num_workers > 0)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def items(self, split: str, indices: Sequence[int]) -> dict[str, object]:
        """The items ``indices`` of ``split`` collated into one batch (images, sketches, captions, ...)."""
        self.setup()
        ds = self.splits[split]
        return torch.utils.data.default_collate([ds[int(i)] for i in indices])
