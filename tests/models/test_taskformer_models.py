"""Towers (CNN with flatten pooling, config-built BERT/CLIP) and the caption decoder."""

from __future__ import annotations

import pytest
import torch

from lit_cascades.models.caption_decoder import CaptionDecoder
from lit_cascades.models.towers import build_text_tower, build_vision_tower, mean_pool
from lit_cascades.models.vision import CNN


def test_cnn_flatten_pooling_keeps_position():
    torch.manual_seed(0)
    net = CNN((1, 16, 16), 8, width=4, depth=2, pool="flatten").eval()
    x = torch.zeros(2, 1, 16, 16)
    x[0, :, 2:5, 2:5] = 1
    x[1, :, 10:13, 10:13] = 1  # the same blob elsewhere
    with torch.no_grad():
        feats = net.features(x)
        # the same blob elsewhere: globally pooled features agree, the flattened map (and the output) does not
        torch.testing.assert_close(feats[0].mean((1, 2)), feats[1].mean((1, 2)), rtol=0.05, atol=0.02)
        assert not torch.allclose(net(x)[0], net(x)[1], atol=1e-3)
    assert net.head.in_features == 8 * 4 * 4
    with pytest.raises(ValueError, match="pool"):
        CNN((1, 8, 8), 2, pool="max")


@pytest.mark.parametrize("spec", ["cnn", "tiny-clip"])
def test_vision_towers(spec):
    tower = build_vision_tower(spec, 16, 12, **({"width": 4, "depth": 2} if spec == "cnn" else {}))
    assert tower(torch.rand(3, 3, 16, 16)).shape == (3, 12)


@pytest.mark.parametrize("spec", ["tiny-bert", "tiny-clip"])
def test_text_towers(spec):
    tower = build_text_tower(spec, 12, max_length=16)
    out = tower(["a red three", "a blue bag and a green seven on a black background"])
    assert out.shape == (2, 12)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        tower(["a red three", "  "])


def test_mean_pool_ignores_padding():
    states = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(states, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_decoder_is_causal_and_conditioned_on_the_context():
    torch.manual_seed(0)
    dec = CaptionDecoder(vocab_size=11, context_dim=6, dim=16, layers=2, heads=2, max_length=10).eval()
    tokens = torch.randint(4, 11, (2, 7))
    ctx = torch.randn(2, 6)
    with torch.no_grad():
        logits = dec(tokens, ctx)
        changed = tokens.clone()
        changed[:, 4:] = 5
        torch.testing.assert_close(dec(changed, ctx)[:, :4], logits[:, :4])  # the future is not seen
        assert not torch.allclose(dec(tokens, torch.randn(2, 6)), logits)
    assert logits.shape == (2, 7, 11)


def test_decoder_loss_is_per_caption_token_mean_and_generate_is_greedy():
    torch.manual_seed(1)
    dec = CaptionDecoder(vocab_size=9, context_dim=4, dim=8, layers=1, heads=2, max_length=8).eval()
    tokens = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 4, 6, 2]])
    ctx = torch.randn(2, 4)
    logp = dec(tokens[:, :-1], ctx).log_softmax(-1)
    per = []
    for b in range(2):
        n = int((tokens[b, 1:] != 0).sum())
        per.append(-sum(logp[b, i, tokens[b, i + 1]] for i in range(n)) / n)
    assert dec.loss(tokens, ctx).item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)
    out = dec.generate(ctx, bos_id=1, eos_id=2, max_length=6)
    with torch.no_grad():
        for b in range(2):  # each generated token is the argmax given the prefix
            for i in range(1, out.shape[1]):
                if out[b, i - 1] in (2, 0) and i > 1:
                    break
                assert out[b, i] == dec(out[b : b + 1, :i], ctx[b : b + 1])[0, -1].argmax()
    with pytest.raises(ValueError, match="max_length"):
        dec(torch.ones(1, 9, dtype=torch.long), ctx[:1])
