"""Per-example quality of generated text: exact match and a softer token-level F1.

Used as the per-example quality of a generative cascade (Gupta et al., ICLR 2024, §2.5 use exact match for
QA-style tasks and BLEU for translation; arXiv:2404.10136). Plain Python on strings.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")


def code_tokens(text: str) -> list[str]:
    """Split text into identifier/number words and single punctuation marks (whitespace dropped)."""
    return _CODE_TOKEN.findall(text)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the strings are equal after removing trailing whitespace (indentation still counts), else 0.0."""
    return float(prediction.rstrip() == reference.rstrip())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 between the multisets of :func:`code_tokens` of prediction and reference.

    Independent of the model's tokenizer, so models with different vocabularies are scored alike. Two
    empty strings score 1.0; one empty string scores 0.0.
    """
    pred, ref = code_tokens(prediction), code_tokens(reference)
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


QUALITY_FUNCTIONS = {"exact_match": exact_match, "token_f1": token_f1}


def text_quality(predictions: Sequence[str], references: Sequence[str], metric: str = "exact_match") -> Tensor:
    """Per-example quality ``[N]`` (float32) of ``predictions`` against ``references``.

    Args:
        predictions, references: ``N`` strings each.
        metric: ``"exact_match"`` or ``"token_f1"``.
    """
    if metric not in QUALITY_FUNCTIONS:
        raise ValueError(f"`metric` must be one of {sorted(QUALITY_FUNCTIONS)}; got {metric!r}")
    if len(predictions) != len(references):
        raise ValueError(
            f"length mismatch: {len(predictions)} predictions vs {len(references)} references"
        )
    fn = QUALITY_FUNCTIONS[metric]
    return torch.tensor([fn(p, r) for p, r in zip(predictions, references)], dtype=torch.float32)
