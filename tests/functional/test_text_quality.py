"""Exact match and token F1 of generated lines."""

from __future__ import annotations

import pytest
import torch

from lit_cascades.functional.text import code_tokens, exact_match, text_quality, token_f1


def test_exact_match_ignores_trailing_whitespace_only():
    assert exact_match("    return x  ", "    return x") == 1.0
    assert exact_match("return x", "    return x") == 0.0


def test_token_f1_by_hand():
    assert code_tokens("self.x = foo(a, 1)") == ["self", ".", "x", "=", "foo", "(", "a", ",", "1", ")"]
    # pred tokens: return, x ; ref tokens: return, x, +, 1 -> P = 1, R = 0.5, F1 = 2/3
    assert token_f1("return x", "return x + 1") == pytest.approx(2 / 3)
    assert token_f1("a a b", "a b b") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_text_quality_vector_and_errors():
    q = text_quality(["a", "b c"], ["a", "b"], "token_f1")
    assert torch.allclose(q, torch.tensor([1.0, 2 / 3]))
    assert text_quality(["a", "b"], ["a", "c"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="length mismatch"):
        text_quality(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="`metric` must be one of"):
        text_quality(["a"], ["a"], "bleu")
