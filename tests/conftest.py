"""Test-suite wide settings: offline switches (set before transformers/wandb are imported) and seeds."""

from __future__ import annotations

import os
import tempfile

_WANDB_HOME = tempfile.mkdtemp(prefix="lit_cascades_wandb_")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": _WANDB_HOME,
    "WANDB_CACHE_DIR": _WANDB_HOME,
    "WANDB_CONFIG_DIR": _WANDB_HOME,
    "TOKENIZERS_PARALLELISM": "false",
    # tiny models: one intra-op thread per process avoids oversubscription (DDP tests run 2 processes)
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trained LM pair saved once per session (see tests/lm_helpers.py); load it with ``load_pair``."""
    from tests.lm_helpers import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("lm_pair") / "pair")
