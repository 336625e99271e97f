"""The LM pair: a small and a large causal LM that share one tokenizer.

Every LM recipe (the LM cascade, token-level Gatekeeper, speculative cascades, SALT) consumes a pair. A pair
directory written by :func:`save_pair` looks like::

    <path>/pair.json          {"small": "small", "large": "large", "tokenizer": "tokenizer", ...metadata}
    <path>/small/             model.save_pretrained + tokenizer.save_pretrained (self-contained)
    <path>/large/             likewise
    <path>/tokenizer/         the shared tokenizer
    <path>/drafter/           optional: an EAGLE feature drafter of the large model ("drafter" in pair.json;
                              :class:`~lit_cascades.models.feature_drafter.FeatureDrafter`, loaded onto ``large``)

so ``AutoModelForCausalLM.from_pretrained(<path>/small)`` works on its own, and :func:`load_pair` loads all
three and checks that they agree (:func:`check_same_vocab`). A pair can also be given as two hub ids /
directories (e.g. ``gpt2`` → ``gpt2-medium``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lit_cascades.models.hf import load_causal_lm, load_tokenizer

PAIR_FILE = "pair.json"


@dataclass
class LMPair:
    """A small and a large causal LM with their shared tokenizer (and where they were loaded from)."""

    small: nn.Module
    large: nn.Module
    tokenizer: Any
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: an optional :class:`~lit_cascades.models.feature_drafter.FeatureDrafter` of ``large`` (EAGLE drafting)
    drafter: nn.Module | None = None


def model_vocab_size(model: nn.Module) -> int:
    """Number of rows of the model's output layer (what its logits' last dimension will be)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def context_length(model: nn.Module) -> int | None:
    """Maximum sequence length of a HF causal LM (``n_positions`` / ``max_position_embeddings``), if any."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_diff(a: dict[str, int], b: dict[str, int], limit: int = 3) -> str:
    only_a = [t for t in a if t not in b][:limit]
    only_b = [t for t in b if t not in a][:limit]
    moved = [t for t in a if t in b and a[t] != b[t]][:limit]
    parts = []
    if only_a:
        parts.append(f"only in the first: {only_a}")
    if only_b:
        parts.append(f"only in the second: {only_b}")
    if moved:
        parts.append("different ids: " + ", ".join(f"{t!r} {a[t]} vs {b[t]}" for t in moved))
    return "; ".join(parts)


def check_same_vocab(
    first: Any,
    second: Any,
    first_tokenizer: Any | None = None,
    second_tokenizer: Any | None = None,
    names: tuple[str, str] = ("small", "large"),
) -> None:
    """Raise ``ValueError`` unless two models (and/or their tokenizers) share one vocabulary.

    Call it before any compute that mixes the two models' token ids or distributions: cascades, speculative
    decoding, distillation. Checks, in order: the models' output sizes, the tokenizers' token→id maps, and
    their special-token ids (eos/pad/bos/unk). A tokenizer may be given in place of a model. Models whose
    output layer is padded beyond the tokenizer (e.g. to a multiple of 64) still pass as long as both
    output layers have the same size and the tokenizers agree.

    Args:
        first, second: HF causal LMs (anything with ``config``) or tokenizers.
        first_tokenizer, second_tokenizer: optional tokenizers of the two models.
        names: how the two appear in error messages.
    """
    def is_model(x: Any) -> bool:
        return isinstance(x, nn.Module) or hasattr(x, "config")

    if is_model(first) and is_model(second):
        va, vb = model_vocab_size(first), model_vocab_size(second)
        if va != vb:
            raise ValueError(
                f"vocabulary mismatch: the {names[0]} model has {va} output tokens and the {names[1]} model has "
                f"{vb}; the pair must share one tokenizer/vocabulary"
            )
    tok_a = first if not is_model(first) else first_tokenizer
    tok_b = second if not is_model(second) else second_tokenizer
    if tok_a is None or tok_b is None:
        return
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        raise ValueError(
            f"tokenizer mismatch: the {names[0]} tokenizer ({len(vocab_a)} tokens) and the {names[1]} tokenizer "
            f"({len(vocab_b)} tokens) differ ({_vocab_diff(vocab_a, vocab_b)}); the pair must share one tokenizer"
        )
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        ia, ib = getattr(tok_a, attr, None), getattr(tok_b, attr, None)
        if ia is not None and ib is not None and ia != ib:
            raise ValueError(f"tokenizer mismatch: {attr} is {ia} for the {names[0]} and {ib} for the {names[1]}")
    for model, tok, name in ((first, tok_a, names[0]), (second, tok_b, names[1])):
        if is_model(model) and model_vocab_size(model) < len(tok):
            raise ValueError(
                f"the {name} model has {model_vocab_size(model)} output tokens but its tokenizer has {len(tok)}"
            )


def gpt2_config(
    vocab_size: int,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 256,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dropout: float = 0.0,
):
    """A GPT-2 config for the small/large models trained from scratch (``n_embd`` divisible by ``n_head``)."""
    from transformers import GPT2Config

    if n_embd % n_head != 0:
        raise ValueError(f"`n_embd` ({n_embd}) must be divisible by `n_head` ({n_head})")
    return GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )


def build_causal_lm(config) -> nn.Module:
    """A randomly initialised HF causal LM (fp32) from a config."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def truncated_copy(model: nn.Module, num_layers: int) -> nn.Module:
    """A new model with the first ``num_layers`` blocks of ``model`` (same embeddings, final norm and head).

    A cheap small model that shares the large model's tokenizer, e.g. a drafter or a cascade's first stage
    built from SmolLM2. Works for HF decoder-only models whose config has ``num_hidden_layers``.
    """
    total = int(model.config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"`num_layers` must be in [1, {total}] for this model; got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
        config.layer_types = config.layer_types[:num_layers]
    small = type(model)(config)
    missing, _ = small.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"truncated copy is missing weights: {missing[:5]}")
    return small


def save_pair(pair: LMPair, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``pair`` to ``path`` atomically (a complete directory or nothing; an old one is replaced).

    Returns the directory. The layout is described in the module docstring.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        for name, model in (("small", pair.small), ("large", pair.large)):
            model.save_pretrained(tmp / name)
            pair.tokenizer.save_pretrained(tmp / name)
        pair.tokenizer.save_pretrained(tmp / "tokenizer")
        info = {"small": "small", "large": "large", "tokenizer": "tokenizer", **pair.meta, **(meta or {})}
        if pair.drafter is not None:
            pair.drafter.save(tmp / "drafter")
            info["drafter"] = "drafter"
        (tmp / PAIR_FILE).write_text(json.dumps(info, indent=2, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pair.path = str(path)
    return path


def load_pair(
    path: str | os.PathLike | None = None,
    small: str | None = None,
    large: str | None = None,
    tokenizer: str | None = None,
) -> LMPair:
    """Load a pair from a :func:`save_pair` directory, or from two model ids/paths.

    Args:
        path: a pair directory (with ``pair.json``). Mutually exclusive with ``small``/``large``.
        small, large: hub ids or ``save_pretrained`` directories (e.g. ``"gpt2"``, ``"gpt2-medium"``).
        tokenizer: tokenizer id/path; default: the small model's.

    Raises:
        FileNotFoundError: ``path`` is not a pair directory (says how to make one).
        ValueError: the two models (or their tokenizers) do not share a vocabulary, before loading weights
            twice over is wasted on more compute.
    """
    if path is not None and (small is not None or large is not None):
        raise ValueError("give either `path` (a pair directory) or `small` and `large`, not both")
    meta: dict[str, Any] = {}
    if path is not None:
        root = Path(path).expanduser()
        info_file = root / PAIR_FILE
        if not info_file.exists():
            raise FileNotFoundError(
                f"{str(root)!r} is not an LM pair directory (no {PAIR_FILE}); build one with "
                "`python -m recipes.lm_pair` or pass pair.small=<id or dir> pair.large=<id or dir>"
            )
        meta = json.loads(info_file.read_text())
        small, large = str(root / meta["small"]), str(root / meta["large"])
        tokenizer = str(root / meta.get("tokenizer", meta["small"]))
    if small is None or large is None:
        raise ValueError("an LM pair needs both `small` and `large` (or a pair directory `path`)")
    tok = load_tokenizer(tokenizer or small)
    large_tok = load_tokenizer(large) if tokenizer is None and path is None else tok
    check_same_vocab(tok, large_tok)
    small_model = load_causal_lm(small).eval()
    large_model = load_causal_lm(large).eval()
    check_same_vocab(small_model, large_model, tok, large_tok)
    drafter = None
    if meta.get("drafter"):
        from lit_cascades.models.feature_drafter import FeatureDrafter

        drafter = FeatureDrafter.load(Path(path).expanduser() / meta["drafter"], large_model)
    return LMPair(small_model, large_model, tok, None if path is None else str(path), meta, drafter)


def pair_lm(
    tokenizer: Any = None,
    init: str | None = None,
    truncate_layers: int | None = None,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 256,
    dropout: float = 0.0,
) -> nn.Module:
    """One model of a pair, as a config section builds it: a pretrained LM or a fresh GPT-2 config.

    Args:
        tokenizer: the pair's tokenizer (its size and eos/pad ids shape a fresh model; a pretrained one is
            checked against it).
        init: a hub id / directory / ``smollm2-135m-instruct`` to load instead of a fresh model (the
            architecture arguments are then ignored).
        truncate_layers: keep only the first k layers of ``init`` (:func:`truncated_copy`).
        n_layer, n_embd, n_head, n_positions, dropout: the GPT-2 architecture (:func:`gpt2_config`).
    """
    if truncate_layers is not None and not init:
        raise ValueError(f"`truncate_layers` ({truncate_layers}) needs `init` (a pretrained model to truncate)")
    if init:
        model = load_causal_lm(init)
        if truncate_layers:
            model = truncated_copy(model, int(truncate_layers))
        if tokenizer is not None:
            check_same_vocab(model, model, tokenizer, tokenizer)
        return model
    if tokenizer is None:
        raise ValueError("`tokenizer` is needed to size a fresh GPT-2 model")
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("n_positions", n_positions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}")
    config = gpt2_config(len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dropout=dropout)
    return build_causal_lm(config)
