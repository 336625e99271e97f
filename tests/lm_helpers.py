"""A tiny LM pair (small and large GPT-2 configs sharing a BPE tokenizer) for tests, built in seconds.

Used through the session fixture ``tiny_pair_dir`` (tests/conftest.py); every LM test that needs a trained
pair on disk (cascades, speculative decoding, distillation) loads it with
``lit_cascades.models.lm_pair.load_pair(tiny_pair_dir)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from lit_cascades.data.lm import LMCorpusDataModule
from lit_cascades.models.lm_pair import LMPair, build_causal_lm, gpt2_config, save_pair
from lit_cascades.modules.causal_lm import CausalLM

TINY_DATA = {"source": "stdlib", "max_docs": 24, "val_fraction": 0.15, "test_fraction": 0.15, "vocab_size": 384,
             "block_size": 64, "batch_size": 8}
#: the tiny pair's corpus (recorded in its pair.json): TINY_DATA's files with a 1024-token vocabulary (whole keywords
#: and common identifiers are single tokens, so a model trained for seconds completes lines instead of spelling them
#: byte by byte); the models train on batches of TINY_TRAIN_BATCH sequences
TINY_PAIR_DATA = {**TINY_DATA, "vocab_size": 1024}
TINY_TRAIN_BATCH = 16
TINY_SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2}
TINY_LARGE = {"n_layer": 1, "n_embd": 64, "n_head": 2}
#: steps and learning rate of both tiny models: with fewer steps or lr 1e-2 both models answer every next-line
#: prompt with an empty or byte-salad line (token F1 0); with these the large model scores clearly above the small
TINY_STEPS, TINY_LR = 300, 3e-3


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny models on one thread: on a shared 2-core machine a 2-thread step of a 30k-parameter model is
    ~10x slower than a 1-thread step (threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_datamodule(**overrides) -> LMCorpusDataModule:
    """The tiny corpus: 24 stdlib files, a 384-token BPE vocabulary, 64-token blocks (the tiny pair trains on
    ``TINY_PAIR_DATA``: the same files with 1024 tokens)."""
    return LMCorpusDataModule(**{**TINY_DATA, **overrides})


def build_tiny_pair(path: str | Path, steps: int = TINY_STEPS, seed: int = 0) -> Path:
    """Train both tiny models for ``steps`` steps on the tiny corpus and save the pair to ``path``."""
    with single_thread():
        return _build_tiny_pair(path, steps, seed)


def _build_tiny_pair(path: str | Path, steps: int, seed: int) -> Path:
    L.seed_everything(seed, verbose=False)
    dm = tiny_datamodule(**{**TINY_PAIR_DATA, "batch_size": TINY_TRAIN_BATCH})
    dm.setup()
    tok = dm.get_tokenizer()
    models = {}
    for name, arch in (("small", TINY_SMALL), ("large", TINY_LARGE)):
        config = gpt2_config(len(tok), n_positions=256, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **arch)
        torch.manual_seed(seed)
        model = build_causal_lm(config)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(CausalLM(model, lr=TINY_LR, warmup_steps=5), dm)
        models[name] = model.eval()
    return save_pair(LMPair(models["small"], models["large"], tok), path, {"corpus": TINY_PAIR_DATA, "steps": steps,
                                                                            "train_batch_size": TINY_TRAIN_BATCH})
