"""A small autoregressive caption decoder that cross-attends to one context vector (TASK-former's auxiliary
caption-generation loss, Sangkloy et al., ECCV 2022; ``shared/papers/training.md`` §3.4: the released weights
hold a 6-layer, 8-head, 512-d x-transformers decoder cross-attending to a 1-token context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        self.pad_id, self.max_length = pad_id, max_length
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
        b, length = tokens.shape
        if length > self.max_length:
            raise ValueError(f"captions of {length} tokens exceed the decoder's max_length={self.max_length}")
        if context.shape[0] != b:
            raise ValueError(f"`context` has {context.shape[0]} rows for {b} captions")
        x = self.tok(tokens) + self.pos(torch.arange(length, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
        h = self.decoder(x, self.ctx(context)[:, None], tgt_mask=causal, tgt_is_causal=True,
                         tgt_key_padding_mask=None)
        return self.out(self.norm(h))

    def loss(self, tokens: Tensor, context: Tensor) -> Tensor:
        """Teacher-forced token cross-entropy, averaged over each caption's tokens, then over captions (so each
        caption weighs the same, and equal shards on several processes average to the global value)."""
        logits = self(tokens[:, :-1], context)
        target = tokens[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.pad_id, reduction="none")  # [B, L-1]
        mask = (target != self.pad_id).to(ce.dtype)
        return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

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
