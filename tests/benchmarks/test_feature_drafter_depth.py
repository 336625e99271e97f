"""``benchmarks.feature_drafter_depth``: agreement by draft depth against a direct computation on a tiny Llama
verifier (depth 1 = the training loss's agreement; depth 2 = the loss's second-pass agreement, restricted to the
columns from 1 on)."""

from __future__ import annotations

import torch

from benchmarks.feature_drafter_depth import depth_agreement
from lit_cascades.models.feature_drafter import FeatureDrafter, capture_head_input, feature_drafter_loss
from tests.models.test_speculative_architectures import VOCAB, make_pair


def test_depth_agreement_matches_the_loss_passes():
    _, verifier = make_pair("llama")
    verifier.eval()
    torch.manual_seed(0)
    drafter = FeatureDrafter(verifier).eval()
    blocks = [torch.randint(6, VOCAB, (3, 9), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    got = depth_agreement(drafter, verifier, blocks, depths=3)
    assert len(got) == 3 and all(0 <= a <= 1 for a in got)
    hits1 = hits2 = n1 = n2 = 0
    for ids in blocks:
        with torch.no_grad(), capture_head_input(verifier) as hidden:
            logits = verifier(input_ids=ids).logits
        with torch.no_grad():
            parts = feature_drafter_loss(drafter, ids, None, hidden[-1], logits, noise=0.0, unroll=2)
        hits1 += float(parts["agreement"]) * ids.numel()
        n1 += ids.numel()
        # pass 2 over columns >= 1: all columns minus column 0, which reads zeros in both passes (same prediction)
        all_columns = float(parts["agreement_2"]) * ids.numel()
        with torch.no_grad():
            col0 = drafter(input_ids=ids, features=torch.zeros_like(hidden[-1])).logits[:, 0].argmax(-1)
        hits2 += all_columns - float((col0 == logits[:, 0].argmax(-1)).sum())
        n2 += ids[:, 1:].numel()
    assert abs(got[0] - hits1 / n1) < 1e-6
    assert abs(got[1] - hits2 / n2) < 1e-6
