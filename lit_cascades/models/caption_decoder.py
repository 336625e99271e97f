"""A small autoregressive caption decoder that cross-attends to one context vector (TASK-former's auxiliary
caption-generation loss; Sangkloy et al., "A Sketch Is Worth a Thousand Words: Image Retrieval with Text and
Sketch", arXiv:2208.03354, ECCV 2022: the released weights
hold a 6-layer, 8-head, 512-d x-transformers decoder cross-attending to a 1-token context).

Cross-attention to a single memory token is a projection: the softmax over one key is 1 whatever the query, so
every position receives ``out_proj(v_proj(memory))``. :func:`single_token_cross_attention` computes that once per
caption (``[B, 1, D]``) instead of the query projection, the attention kernel and the output projection over all
``B x L`` positions; :class:`CaptionDecoder` uses it whenever the layers have no dropout to apply, with
:func:`causal_self_attention` (the layer's own self-attention weights, without ``nn.MultiheadAttention``'s
sequence-first layout copies), and its loss runs the last position-wise block (feed-forward, norm, output layer)
only at positions that have a target: a causal decoder's later positions cannot change earlier ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def single_token_cross_attention(attn: nn.MultiheadAttention, memory: Tensor) -> Tensor:
    """``attn(query, memory, memory)[0]`` for a memory of one token, whatever the queries ``[B, L, D]``.

    With one key the attention weights are exactly 1, so the output at every query position is the projected
    value ``out_proj(v_proj(memory))``: it is computed once per row as ``[B, 1, D]``, which broadcasts against
    ``[B, L, D]``. The queries do not change
    the output; through the full attention they, and the query/key projections, get a zero gradient. Separate
    query/key projection weights (``kdim``/``vdim`` set) are kept in the autograd graph with that zero gradient,
    so distributed data parallel training without ``find_unused_parameters`` sees them used.

    Args:
        attn: a batch-first :class:`~torch.nn.MultiheadAttention` without ``bias_k``/``bias_v``, zero attention or
            (when training) dropout; other modules raise ``ValueError``.
        memory: ``[B, 1, D]`` the single key/value token.

    Returns:
        ``[B, 1, D]``: the output of every query position.
    """
    if not attn.batch_first or attn.bias_k is not None or attn.add_zero_attn or (attn.training and attn.dropout > 0):
        raise ValueError("single_token_cross_attention needs a batch-first attention without bias_k/bias_v, "
                         "zero attention or active dropout")
    if memory.ndim != 3 or memory.shape[1] != 1:
        raise ValueError(f"`memory` must be [B, 1, D] (one token); got shape {tuple(memory.shape)}")
    d = attn.embed_dim
    b_v = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * d:]
    if attn._qkv_same_embed_dim:  # one packed weight: its query/key rows get zeros through the slice
        value = attn.out_proj(F.linear(memory, attn.in_proj_weight[2 * d:], b_v))
    else:
        value = attn.out_proj(F.linear(memory, attn.v_proj_weight, b_v)) + zero_gradient_anchor(
            attn.q_proj_weight, attn.k_proj_weight)
    return value


def causal_self_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """``attn(x, x, x, attn_mask=causal, is_causal=True)[0]`` of a batch-first attention without dropout.

    The same packed projection, the same causal scaled-dot-product kernel and the same output projection as
    ``nn.MultiheadAttention``, computed in the batch-first layout (``[B, L, 3, H, d]`` viewed as ``[B, H, L, d]``
    per projection) instead of its sequence-first copies.

    Args:
        attn: batch-first, one packed input projection, no ``bias_k``/``bias_v``, zero attention or (when
            training) dropout; other modules raise ``ValueError``.
        x: ``[B, L, D]``.

    Returns:
        ``[B, L, D]``: position ``i`` attends to positions ``<= i``.
    """
    if (not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn
            or (attn.training and attn.dropout > 0)):
        raise ValueError("causal_self_attention needs a batch-first attention with a packed input projection and "
                         "no bias_k/bias_v, zero attention or active dropout")
    b, length, d = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, length, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, d] each
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.out_proj(out.transpose(1, 2).reshape(b, length, d))


def zero_gradient_anchor(*tensors: Tensor) -> Tensor:
    """``0 · Σ sums``: a scalar exactly 0 (finite inputs) that puts ``tensors`` in the autograd graph with a zero
    gradient, where the full computation would give them one (distributed data parallel needs every parameter
    used in each step unless ``find_unused_parameters`` is set)."""
    return sum(t.sum() for t in tensors) * 0.0


class CaptionDecoder(nn.Module):
    """Pre-norm transformer decoder over caption tokens with the context embedding as its only memory token.

    Args:
        vocab_size: output vocabulary (e.g. a :class:`~lit_cascades.data.text_sketch.WordVocab`).
        context_dim: width of the context vector ``[B, context_dim]``.
        dim: model width; layers / heads: decoder depth and attention heads.
        max_length: longest token sequence (learned positions).
        dropout: dropout inside the layers.
        pad_id: padding id (ignored by the loss).
    """

    def __init__(self, vocab_size: int, context_dim: int, dim: int = 64, layers: int = 1, heads: int = 4,
                 max_length: int = 32, dropout: float = 0.0, pad_id: int = 0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({heads})")
        self.pad_id, self.max_length, self.dropout = pad_id, max_length, dropout
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_length, dim)
        self.ctx = nn.Linear(context_dim, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, tokens: Tensor, context: Tensor) -> Tensor:
        """``tokens [B, L]``, ``context [B, C]`` → next-token logits ``[B, L, V]`` (position ``i`` sees tokens
        ``≤ i`` and the context)."""
        return self.out(self.norm(self.hidden(tokens, context)))

    def hidden(self, tokens: Tensor, context: Tensor, positions: Tensor | None = None) -> Tensor:
        """Decoder states before the final norm: ``[B, L, dim]``, or ``[P, dim]`` at ``positions`` (indices into
        the flattened ``B x L`` positions, e.g. those with a target), where the last layer's feed-forward block
        runs only at those positions."""
        b, length = tokens.shape
        if length > self.max_length:
            raise ValueError(f"captions of {length} tokens exceed the decoder's max_length={self.max_length}")
        if context.shape[0] != b:
            raise ValueError(f"`context` has {context.shape[0]} rows for {b} captions")
        x = self.tok(tokens) + self.pos(torch.arange(length, device=tokens.device))
        memory = self.ctx(context)[:, None]
        layers = self.decoder.layers
        if self.training and self.dropout > 0:  # the dropout masks need nn.TransformerDecoderLayer's positions
            causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
            for layer in layers:
                x = layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
            return x if positions is None else x.reshape(b * length, -1)[positions]
        for i, layer in enumerate(layers):  # norm-first: x + SA(norm1 x), + CA(norm2 x), + FF(norm3 x)
            x = x + causal_self_attention(layer.self_attn, layer.norm1(x))
            # the cross-attention's query (norm2 x) cannot change its output: norm2 gets its zero gradient
            cross = single_token_cross_attention(layer.multihead_attn, memory)
            x = x + (cross + zero_gradient_anchor(layer.norm2.weight, layer.norm2.bias))  # [B, 1, D] broadcast
            if positions is not None and i == len(layers) - 1:
                x = x.reshape(b * length, -1)[positions]
            x = x + layer._ff_block(layer.norm3(x))
        return x

    def loss(self, tokens: Tensor, context: Tensor) -> Tensor:
        """Teacher-forced token cross-entropy, averaged over each caption's tokens, then over captions (so each
        caption weighs the same, and equal shards on several processes average to the global value). Only
        positions with a (non-padding) target go through the last position-wise layers."""
        target = tokens[:, 1:]
        valid = target != self.pad_id  # [B, L-1]
        positions = valid.flatten().nonzero().squeeze(1)
        logits = self.out(self.norm(self.hidden(tokens[:, :-1], context, positions)))  # [P, V]
        ce = F.cross_entropy(logits, target.flatten()[positions], reduction="none")
        per_caption = ce.new_zeros(tokens.shape[0]).index_add_(0, positions // target.shape[1], ce)
        return (per_caption / valid.sum(1).clamp(min=1)).mean()

    @torch.no_grad()
    def generate(self, context: Tensor, bos_id: int, eos_id: int, max_length: int | None = None) -> Tensor:
        """Greedy decoding ``[B, ≤ max_length]`` starting from ``bos_id``; rows stop at ``eos_id`` (then pad)."""
        max_length = min(max_length or self.max_length, self.max_length)
        tokens = torch.full((context.shape[0], 1), bos_id, dtype=torch.long, device=context.device)
        done = torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
        while tokens.shape[1] < max_length and not bool(done.all()):
            nxt = self(tokens, context)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos_id
        return tokens
