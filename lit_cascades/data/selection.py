"""SALT_DS data selection: score training sequences with the small LM, serve the selected ones during KD.

Reference: Rawat et al., arXiv:2410.18779, SALT_DS. Each candidate sequence gets a score from the small model
(:class:`SequenceSelector`; default: the median loss of the tokens whose true id is in the small model's top-k,
k = 10, :func:`~lit_cascades.functional.distillation.topk_median_score`). The **highest**-scored ``fraction``
("challenging yet learnable") forms the KD stage's batches; from ``kd_steps`` on the batches are the common
stream's, the baseline's (:class:`StagedBatchSampler`; which sequences are candidates: :class:`SALTDataModule`).
The selection fraction is not reported in the paper (UNVERIFIED; default 0.5 here). The paper scores with an
early checkpoint of the small model; here the given teacher scores (pass another model to :meth:`select`).

Scores are computed once and cached on disk (:meth:`SequenceSelector.cached_scores`), in a file named by the
config hash (:func:`lit_cascades.io.config_hash`) of the scored token blocks, the scoring model's parameters
and the selector's settings; the file is written atomically, read back with ``weights_only=True`` (a file
holding pickled code is refused with ``ValueError``) and its recorded key is checked on load (a file from
another corpus or teacher is recomputed). The default cache directory is ``<cache root>/selection_scores``
(:func:`lit_cascades.io.cache_dir`; the root is ``$LIT_CASCADES_CACHE``).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_cascades import io
from lit_cascades._progress import progress_bar
from lit_cascades.data.lm import LMCorpusDataModule
from lit_cascades.functional._checks import check_range
from lit_cascades.functional.distillation import select_top_fraction, topk_median_score


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameter names and values (identifies a teacher in caches/checkpoints)."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_fingerprint(x: Tensor) -> str:
    """A short hash of a tensor's shape, dtype and values (e.g. the training token blocks)."""
    h = hashlib.sha1(f"{tuple(x.shape)}{x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_tokens(dataset: Dataset) -> Tensor:
    """``[N, L]`` token ids of a dataset of ``{"input_ids": [L]}`` items (``BlockDataset.blocks`` directly)."""
    blocks = getattr(dataset, "blocks", None)
    if isinstance(blocks, Tensor):
        return blocks
    return torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])  # type: ignore[arg-type]


class SequenceSelector:
    """Scores sequences with a (small) causal LM and selects the top ``fraction``.

    Subclass and override :meth:`score_batch` (and :attr:`name` via a class attribute) for another score;
    the cache key includes :meth:`config`, so different scores never share a cache file.

    Args:
        fraction: share of the training sequences served during the KD stage, in (0, 1].
        k: top-k of the "learnable token" filter (paper: 10).
        highest: keep the highest scores (SALT_DS: hard but learnable) or the lowest.
        batch_size: sequences per scoring forward pass.
        chunk_size: positions per chunk of the scoring (memory).
        progress: show a progress bar while scoring (stderr).
    """

    name = "topk_median"

    def __init__(self, fraction: float = 0.5, k: int = 10, highest: bool = True, batch_size: int = 32,
                 chunk_size: int | None = None, progress: bool = True) -> None:
        check_range("fraction", fraction, 0.0, 1.0, low_open=True)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int; got {k!r}")
        self.fraction, self.k, self.highest = float(fraction), k, highest
        self.batch_size, self.chunk_size, self.progress = batch_size, chunk_size, progress

    def config(self) -> dict[str, Any]:
        """What the scores depend on besides the data and the model (part of the cache key)."""
        return {"name": self.name, "k": self.k}

    def score_batch(self, logits: Tensor, target: Tensor) -> Tensor:
        """``[B]`` scores from aligned ``logits [B, T, V]`` and next-token ``target [B, T]`` (-100 = none)."""
        return topk_median_score(logits, target, k=self.k, chunk_size=self.chunk_size)[0]

    @torch.inference_mode()
    def score(self, model: nn.Module, tokens: Tensor, progress: bool | None = None) -> Tensor:
        """``[N]`` scores of the sequences ``tokens [N, L]`` (model in eval mode, on its own device).

        ``progress`` (default: the selector's) shows a bar over the sequences.
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        show = self.progress if progress is None else progress
        try:
            with progress_bar(desc="SALT_DS scoring", total=tokens.shape[0], unit="seq", progress=show) as bar:
                for start in range(0, tokens.shape[0], self.batch_size):
                    ids = tokens[start:start + self.batch_size].to(device)
                    logits = model(input_ids=ids).logits
                    target = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
                    out.append(self.score_batch(logits, target).float().cpu())
                    bar.update(ids.shape[0])
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def select(self, scores: Tensor) -> Tensor:
        """Indices (ascending) of the selected sequences."""
        return select_top_fraction(scores, self.fraction, highest=self.highest)

    def cache_key(self, model: nn.Module, tokens: Tensor) -> dict[str, Any]:
        return {"corpus": tensor_fingerprint(tokens), "teacher": model_fingerprint(model), "selector": self.config()}

    def cache_path(self, key: dict[str, Any], cache_dir: str | os.PathLike | bool) -> Path:
        """The file of the scores keyed by ``key`` in ``cache_dir`` (``True``: ``<cache root>/selection_scores``)."""
        base = io.cache_dir("selection_scores") if cache_dir is True else Path(cache_dir).expanduser()
        return base / f"salt_scores-{io.config_hash(key, length=20)}.pt"

    def cached_scores(self, model: nn.Module, tokens: Tensor, cache_dir: str | os.PathLike | bool | None,
                      progress: bool | None = None) -> tuple[Tensor, bool]:
        """Scores of ``tokens`` by ``model``, from ``cache_dir`` when a matching file is there.

        ``cache_dir``: a directory, ``True`` for the default ``<cache root>/selection_scores``, ``None``/``False``
        to recompute every time. Returns ``(scores [N], hit)``. The file name is the config hash of the key
        (corpus tokens, model parameters, selector config); the key is also stored in the file and compared on
        load, so a file from another corpus or teacher is detected and recomputed (with a warning). Writes
        are atomic; reads use ``weights_only=True``.

        Raises:
            ValueError: the cache file holds pickled objects beyond tensors (refused, never unpickled).
        """
        key = self.cache_key(model, tokens)
        if cache_dir is None or cache_dir is False:
            return self.score(model, tokens, progress=progress), False
        path = self.cache_path(key, cache_dir)
        if path.exists():
            try:
                saved = io.safe_torch_load(path)
            except ValueError:
                raise
            except Exception as err:  # a truncated or foreign file
                warnings.warn(f"unreadable score cache {path} ({err}); recomputing", UserWarning, stacklevel=2)
            else:
                if (isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("scores"), Tensor)
                        and saved["scores"].shape == (tokens.shape[0],)):
                    return saved["scores"], True
                found = saved.get("key") if isinstance(saved, dict) else type(saved).__name__
                warnings.warn(f"score cache {path} was written for {found}, not {key}; recomputing",
                              UserWarning, stacklevel=2)
        scores = self.score(model, tokens, progress=progress)
        io.atomic_save({"key": key, "scores": scores}, path)
        return scores, False


def stream_permutation(seed: int, epoch: int, num_items: int) -> Tensor:
    """``[num_items]`` permutation of epoch ``epoch`` of the common batch stream of ``seed``."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_items, generator=g)


class StagedBatchSampler(Sampler[list[int]]):
    """One seeded batch stream shared by every method; SALT_DS's KD stage draws the selected items from it.

    **The common stream.** Global position ``p = 0, 1, …`` holds item ``perm_e[p mod N]`` with
    ``e = p // N`` and ``perm_e`` the ``e``-th permutation of the ``N = num_items`` items drawn from a
    generator seeded by ``(seed, e)`` only. The global batch of optimizer step ``s`` is positions
    ``s·G … s·G + G − 1`` (``G = batch_size · world_size``; with gradient accumulation, micro-batch ``b``
    takes positions ``b·G …``). It does not depend on ``kd_steps``: the baseline (``kd_steps = 0``), SALT and a
    KD-weight-0 control get the identical batch at every step, and stage 2 *continues* the stream (step
    ``kd_steps + k`` is the baseline's step ``kd_steps + k``), it does not restart it.

    **SALT_DS** (``selected`` given). During stage 1 (``step < kd_steps``) the batches come from the
    *selected stream*: the same permutations restricted to the selected items (``perm_e`` with the
    unselected items removed), so the selected items keep the relative order in which the common stream visits
    them; step ``s`` takes positions ``s·G …`` of it. Selection therefore decides which examples form the
    stage-1 batches (each selected item is seen about ``1/fraction`` times as often, the unselected ones not
    at all); from step ``kd_steps`` on the batches are the common stream's, identical to the baseline's.

    The batch of each step is a pure function of ``(seed, step)``, so a resumed run (:meth:`set_step` with the
    restored ``global_step``) sees the same batches as an uninterrupted one, and each of ``world_size``
    processes takes its own contiguous slice of the global batch (pass ``use_distributed_sampler=False`` to
    the Trainer). One "epoch" (one ``iter``) is ``num_items // G`` batches; iteration continues the stream.

    Args:
        num_items: size of the full training set.
        selected: indices served during stage 1 (``None``: everything, i.e. plain SALT / the baseline).
        kd_steps: optimizer steps of stage 1.
        batch_size: per-process batch size.
        seed: shuffling seed (the stream's only seed).
        world_size, rank: data-parallel layout.
        accumulate_grad_batches: batches per optimizer step (the stage follows optimizer steps).
    """

    def __init__(self, num_items: int, selected: Tensor | Sequence[int] | None, kd_steps: int, batch_size: int,
                 seed: int = 0, world_size: int = 1, rank: int = 0, accumulate_grad_batches: int = 1) -> None:
        if num_items < 1:
            raise ValueError(f"`num_items` must be >= 1; got {num_items}")
        if kd_steps < 0:
            raise ValueError(f"`kd_steps` must be >= 0; got {kd_steps}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or accumulate_grad_batches < 1:
            raise ValueError(f"bad layout: batch_size={batch_size}, world_size={world_size}, rank={rank}, "
                             f"accumulate_grad_batches={accumulate_grad_batches}")
        self.num_items, self.kd_steps, self.batch_size = num_items, kd_steps, batch_size
        self.seed, self.world_size, self.rank, self.accumulate = seed, world_size, rank, accumulate_grad_batches
        self.selected = None if selected is None else torch.as_tensor(selected, dtype=torch.long).reshape(-1)
        if self.selected is not None:
            if self.selected.numel() == 0:
                raise ValueError("`selected` is empty; select at least one sequence")
            if int(self.selected.min()) < 0 or int(self.selected.max()) >= num_items:
                raise ValueError(f"`selected` indices must be in [0, {num_items})")
            self._mask = torch.zeros(num_items, dtype=torch.bool)
            self._mask[self.selected] = True
            self.num_selected = int(self._mask.sum())
        self.batch_index = 0
        self._perms: dict[tuple[bool, int], Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_step(self, step: int) -> None:
        """Continue from optimizer step ``step`` (e.g. ``trainer.global_step`` after a resume)."""
        self.batch_index = step * self.accumulate

    def stage(self, batch_index: int) -> int:
        """1 for a micro-batch of an optimizer step ``< kd_steps``, else 2."""
        return 1 if batch_index // self.accumulate < self.kd_steps else 2

    def _perm(self, selected_only: bool, epoch: int) -> Tensor:
        """Epoch ``epoch`` of the common stream (all items), or of the selected stream (its selected items)."""
        key = (selected_only, epoch)
        if key not in self._perms:
            perm = stream_permutation(self.seed, epoch, self.num_items)
            if selected_only:
                perm = perm[self._mask[perm]]
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = perm
        return self._perms[key]

    def global_batch_at(self, batch_index: int) -> list[int]:
        """All ``G`` indices of the global (micro-)batch number ``batch_index``."""
        selected_only = self.selected is not None and self.stage(batch_index) == 1
        size = self.num_selected if selected_only else self.num_items
        start = batch_index * self.global_batch
        return [int(self._perm(selected_only, pos // size)[pos % size])
                for pos in range(start, start + self.global_batch)]

    def batch_at(self, batch_index: int) -> list[int]:
        """This process's slice of :meth:`global_batch_at`."""
        g = self.global_batch_at(batch_index)
        return g[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def stream(self, steps: int) -> list[list[int]]:
        """The global batches of optimizer steps ``0 … steps − 1`` (all micro-batches; does not move the sampler)."""
        return [self.global_batch_at(b) for b in range(steps * self.accumulate)]

    def __len__(self) -> int:
        return max(1, self.num_items // self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            batch = self.batch_at(self.batch_index)
            self.batch_index += 1
            yield batch


def stream_fingerprint(batches: Sequence[Sequence[int]]) -> str:
    """A short hash of a sequence of batches of item indices (equal streams have equal fingerprints)."""
    h = hashlib.sha1()
    for batch in batches:
        h.update(torch.as_tensor(list(batch), dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


class SALTDataModule(LMCorpusDataModule):
    """:class:`~lit_cascades.data.lm.LMCorpusDataModule` whose training batches follow SALT's two stages.

    Without :meth:`select` every step's batch is the common stream's (:class:`StagedBatchSampler`): the
    baseline, SALT and a KD-weight-0 control train on identical batches. Call :meth:`select` with the small
    model before ``fit`` for SALT_DS: it scores a *pool* of training sequences and keeps the selector's top
    fraction, which forms the stage-1 batches; stage 2 is the common stream again, from step ``kd_steps``.

    Pools (``select_pool``):

    * ``"window"`` (default): the sequences at the common stream's first ``⌈kd_steps·G / fraction⌉`` positions
      (``G`` the global batch). With ``fraction = f`` the window holds ``1/f`` times the sequences the baseline
      sees during the KD stage and the selection keeps ``f`` of them, so SALT_DS's stage 1 sees as many
      distinct sequences as the baseline's, the selected ones of the same candidates, each once, in stream
      order. The cost: ``kd_steps·G/f`` scored sequences instead of the whole training set. The unselected
      window sequences beyond position ``kd_steps·G`` are seen in stage 2 like everyone's; the selected ones
      among them are seen twice.
    * ``"all"``: every training sequence is scored (the paper's global selection); the selected set (``f`` of
      the data) is cycled through during stage 1.

    Args:
        kd_steps: optimizer steps of the KD stage.
        selector: the :class:`SequenceSelector` (default: top-k median, k = 10, fraction 0.5).
        score_cache_dir: where scores are cached: a directory, ``True`` for ``<cache root>/selection_scores``,
            ``None`` to recompute every time (see :meth:`SequenceSelector.cached_scores`).
        seed: the batch stream's seed (:class:`StagedBatchSampler`).
        accumulate_grad_batches: match the Trainer's.
        select_pool: ``"window"`` or ``"all"`` (see above).
        **kwargs: :class:`LMCorpusDataModule` arguments; ``batch_size`` is the global batch (a data-parallel
            recipe divides ``hparams.batch_size`` per process; :attr:`global_batch_size` keeps the global one).
    """

    POOLS = ("window", "all")

    def __init__(self, kd_steps: int = 0, selector: SequenceSelector | None = None,
                 score_cache_dir: str | os.PathLike | bool | None = None, seed: int = 0, accumulate_grad_batches: int = 1,
                 select_pool: str = "window", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["tokenizer", "selector"])
        if not isinstance(kd_steps, int) or kd_steps < 0:
            raise ValueError(f"kd_steps: expected an integer >= 0; got {kd_steps!r}")
        if select_pool not in self.POOLS:
            raise ValueError(f"select_pool: expected one of {list(self.POOLS)}; got {select_pool!r}")
        self.kd_steps, self.seed, self.accumulate = kd_steps, seed, accumulate_grad_batches
        self.select_pool = select_pool
        self.global_batch_size = int(self.hparams.batch_size)
        self.selector = selector if selector is not None else SequenceSelector()
        self.score_cache_dir = score_cache_dir
        self.pool: Tensor | None = None
        self.selected: Tensor | None = None
        self.scores: Tensor | None = None
        self.cache_hit: bool | None = None
        self.sampler: StagedBatchSampler | None = None

    @property
    def selected_fraction(self) -> float:
        """Share of the scored pool served during KD (1.0 without a selection)."""
        if self.selected is None or self.pool is None:
            return 1.0
        return self.selected.numel() / self.pool.numel()

    def selection_pool(self) -> Tensor:
        """``[P]`` training-item indices that :meth:`select` scores (see the class docstring)."""
        if "train" not in self.datasets:
            self.setup()
        n = len(self.datasets["train"])
        if self.select_pool == "all":
            return torch.arange(n)
        window = math.ceil(self.kd_steps * self.accumulate * self.global_batch_size / self.selector.fraction)
        if window >= n:
            return torch.arange(n)
        return stream_permutation(self.seed, 0, n)[:max(1, window)].sort().values

    def select(self, model: nn.Module) -> Tensor:
        """Score the pool's sequences with ``model`` (cached) and keep the selector's top fraction.

        Returns the selected training-item indices (ascending). The scoring bar shows when both the
        datamodule's ``progress`` and the selector's are on (rank 0 only).
        """
        self.setup()
        self.pool = self.selection_pool()
        tokens = dataset_tokens(self.datasets["train"])[self.pool]
        progress = self._progress() and self.selector.progress
        self.scores, self.cache_hit = self.selector.cached_scores(model, tokens, self.score_cache_dir,
                                                                  progress=progress)
        self.selected = self.pool[self.selector.select(self.scores)]
        return self.selected

    def batch_stream(self, steps: int) -> list[list[int]]:
        """The global batches (training-item indices) of optimizer steps ``0 … steps − 1``."""
        if "train" not in self.datasets:
            self.setup()
        sampler = StagedBatchSampler(len(self.datasets["train"]), self.selected, self.kd_steps,
                                     self.global_batch_size, self.seed, 1, 0, self.accumulate)
        return sampler.stream(steps)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.setup()
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        self.sampler = StagedBatchSampler(len(self.datasets["train"]), self.selected, self.kd_steps,
                                          self.hparams.batch_size, self.seed, world, rank, self.accumulate)
        if trainer is not None:
            self.sampler.set_step(trainer.global_step)
        return DataLoader(self.datasets["train"], batch_sampler=self.sampler, num_workers=self.hparams.num_workers)
