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


def _reference_forward(dec: CaptionDecoder, tokens: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The decoder through ``nn.TransformerDecoder`` with full cross-attention over the one memory token."""
    length = tokens.shape[1]
    x = dec.tok(tokens) + dec.pos(torch.arange(length))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
    return dec.out(dec.norm(dec.decoder(x, dec.ctx(ctx)[:, None], tgt_mask=causal, tgt_is_causal=True)))


@pytest.mark.parametrize("layers", [1, 2])
def test_decoder_single_token_cross_attention_equals_full_attention(layers):
    """Value and every parameter's gradient equal the full ``nn.TransformerDecoder`` (cross-attention over one
    key); the cross-attention's query side (norm2, query/key rows of in_proj) gets the same zero gradient."""
    torch.manual_seed(2)
    dec = CaptionDecoder(vocab_size=13, context_dim=5, dim=16, layers=layers, heads=4, max_length=12).train()
    for p in dec.parameters():  # away from the default init (norms at 1/0, zero biases)
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(0, 13, (3, 9))
    ctx = torch.randn(3, 5)
    grads = []
    for forward in (dec, lambda t, c: _reference_forward(dec, t, c)):
        dec.zero_grad(set_to_none=True)
        out = forward(tokens, ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}))
    (ours, g_ours), (ref, g_ref) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert g_ours.keys() == g_ref.keys()  # every parameter gets a gradient (DDP needs them all used)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    for layer in range(layers):
        assert not g_ours[f"decoder.layers.{layer}.norm2.weight"].any()
        assert not g_ours[f"decoder.layers.{layer}.multihead_attn.in_proj_weight"][: 2 * 16].any()


@pytest.mark.parametrize("kdim", [None, 7])
def test_single_token_cross_attention_equals_multihead_attention(kdim):
    from lit_cascades.models.caption_decoder import single_token_cross_attention

    torch.manual_seed(3)
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
    query, memory = torch.randn(4, 6, 8), torch.randn(4, 1, kdim or 8)
    ref = attn(query, memory, memory, need_weights=False)[0]
    out = single_token_cross_attention(attn, memory)
    assert out.shape == (4, 1, 8)
    torch.testing.assert_close(out.expand_as(ref), ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()  # separate query/key weights are in the graph with a zero gradient
    if kdim is not None:
        assert attn.q_proj_weight.grad is not None and not attn.q_proj_weight.grad.any()
    with pytest.raises(ValueError, match="one token"):
        single_token_cross_attention(attn, torch.randn(4, 2, kdim or 8))
    with pytest.raises(ValueError, match="dropout"):
        single_token_cross_attention(torch.nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True).train(), memory)


def test_decoder_with_dropout_trains_through_the_full_layer():
    torch.manual_seed(4)
    dec = CaptionDecoder(vocab_size=9, context_dim=4, dim=8, layers=1, heads=2, max_length=8, dropout=0.5).train()
    tokens, ctx = torch.randint(0, 9, (2, 5)), torch.randn(2, 4)
    torch.manual_seed(5)
    ours = dec(tokens, ctx)
    torch.manual_seed(5)
    torch.testing.assert_close(ours, _reference_forward(dec, tokens, ctx))


def test_decoder_loss_on_target_positions_equals_the_loss_over_all_positions():
    """The loss runs the last position-wise layers only where a target is; value and gradients equal the
    per-caption mean over the full reference decoder's logits (padding at the end and inside a row)."""
    torch.manual_seed(6)
    dec = CaptionDecoder(vocab_size=11, context_dim=4, dim=16, layers=2, heads=2, max_length=10).train()
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(3, 11, (4, 9))
    tokens[0, 6:] = 0
    tokens[1, 2:] = 0
    tokens[2, 4] = 0  # a padding id inside a caption: later positions still see it
    ctx = torch.randn(4, 4)
    grads = []
    for ref in (False, True):
        dec.zero_grad(set_to_none=True)
        if ref:
            logits, target = _reference_forward(dec, tokens[:, :-1], ctx), tokens[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            mask = (target != 0).float()
            loss = ((ce * mask).sum(1) / mask.sum(1)).mean()
        else:
            loss = dec.loss(tokens, ctx)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name in grads[1][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
