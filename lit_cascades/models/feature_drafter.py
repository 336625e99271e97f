"""Feature-level drafter: a one-layer head that drafts from the verifier's own last hidden states (EAGLE).

Reference: Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", ICML 2024
(arXiv:2401.15077). A separate small LM must relearn the verifier's next-token distribution from tokens alone;
the verifier's last hidden state ``f_j`` (what its LM head reads) already carries most of it. The drafter predicts
the *next feature* autoregressively and reads tokens through the verifier's own LM head:

    ĥ_j = Body(FC([f_{j-1} ; E(x_j)]))  ≈ f_j,        q(x_{j+1}) = softmax(Head(ĥ_j)),

with ``E`` and ``Head`` the verifier's input embeddings and output layer (shared, not copied, never trained) and
``Body`` a small decoder of the verifier's architecture (``num_layers`` layers, default 1, its own final norm).
Column ``j`` of the drafter therefore sees the token ``x_j`` and the verifier's feature of the *previous* token
(zeros at a sequence's first column). While drafting, the features of the verified prefix are the verifier's and
those of draft tokens are the drafter's own ``ĥ``; after each verification the drafter's cache entries built on
predicted features are recomputed from the verifier's (:func:`lit_cascades.models.speculative.
speculative_generate` does this when the drafter has ``uses_verifier_features = True``).

Training (:func:`feature_drafter_loss`, :class:`lit_cascades.modules.feature_drafter.FeatureDrafterLM`): the
EAGLE objective, a Smooth-L1 regression of ``ĥ_j`` on ``f_j`` plus ``w_cls`` × the cross-entropy of
``Head(ĥ_j)`` against the verifier's distribution at ``j``, with uniform noise on the input features (the paper's
``U(−0.1, 0.1)``) so that the drafter tolerates its own prediction errors when it drafts several tokens.
``unroll=k`` adds passes that read the drafter's own predictions instead (draft step ``k``'s condition).

Only the trainable part (``fc`` and ``body``) is in ``state_dict``; :meth:`FeatureDrafter.save` /
:meth:`FeatureDrafter.load` write and read it beside a small JSON, and loading needs the verifier.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cascades.models.generation import position_ids_from_mask

#: file names of :meth:`FeatureDrafter.save`.
CONFIG_FILE, WEIGHTS_FILE = "feature_drafter.json", "feature_drafter.safetensors"


def uses_verifier_features(model: nn.Module) -> bool:
    """True for drafters that draft from the verifier's hidden states (:class:`FeatureDrafter` and subclasses)."""
    return bool(getattr(model, "uses_verifier_features", False))


def hidden_size(model: nn.Module) -> int:
    """Width of a causal LM's last hidden state (the input of its LM head)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[1])


@contextmanager
def capture_head_input(model: nn.Module) -> Iterator[list[Tensor]]:
    """Record what ``model``'s output layer reads during the forwards inside the block: its last hidden state
    ``[B, T', d]`` (``T'`` = the columns it computes logits for), appended to the yielded list.

    ``output_hidden_states=True`` is not used: transformers records hidden states with forward hooks it installs on
    first use, and a model handed to a ``torch.multiprocessing.spawn`` child (``ddp_spawn``) returns
    ``hidden_states=None`` there. The output layer's input is the last hidden state for every causal LM
    (post-head transforms such as logit soft-capping come after it).
    """
    store: list[Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: store.append(args[0]))
    try:
        yield store
    finally:
        handle.remove()


def shift_features(features: Tensor) -> Tensor:
    """``[B, T, d]`` → ``[B, T, d]``: column ``j`` gets the feature of column ``j − 1`` (zeros at column 0)."""
    return torch.cat([features.new_zeros(features.shape[0], 1, features.shape[2]), features[:, :-1]], 1)


class FeatureDrafter(nn.Module):
    """EAGLE drafter for a Hugging Face causal-LM verifier (module docstring).

    Args:
        verifier: the causal LM to draft for; its text config shapes ``body`` and its input embeddings and LM head
            are shared (held by reference, outside ``state_dict``).
        num_layers: decoder layers of ``body``.

    Call it as ``drafter(input_ids [B, T], attention_mask [B, S], position_ids [B, T], features [B, T, d])`` with
    ``features[:, j]`` the verifier's feature of the token *before* ``input_ids[:, j]`` (:func:`shift_features`);
    it returns a ``CausalLMOutputWithPast`` whose ``hidden_states[-1]`` is ``ĥ`` ``[B, T, d]`` and whose
    ``logits`` ``[B, T, V]`` come from the verifier's head.
    """

    uses_verifier_features = True

    def __init__(self, verifier: nn.Module, num_layers: int = 1) -> None:
        super().__init__()
        from transformers import AutoModel

        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"`num_layers` must be an integer >= 1; got {num_layers!r}")
        if not (hasattr(verifier, "config") and hasattr(verifier, "get_output_embeddings")):
            raise TypeError(f"the verifier must be a Hugging Face causal LM; got {type(verifier).__name__}")
        config = copy.deepcopy(verifier.config.get_text_config(decoder=True))
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[:num_layers]
        d = hidden_size(verifier)
        self.body = AutoModel.from_config(config)
        # inputs come through `fc`: no second vocabulary table (a frozen 1-row stand-in: DDP rejects unused
        # trainable parameters)
        self.body.set_input_embeddings(nn.Embedding(1, d).requires_grad_(False))
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.feature_size = d  #: width of the verifier features it reads
        self.config = self.body.config
        params = inspect.signature(type(self.body).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.num_layers = num_layers
        self._shared = (verifier.get_input_embeddings(), verifier.get_output_embeddings())  # not submodules

    def get_input_embeddings(self) -> nn.Module:
        return self._shared[0]

    def get_output_embeddings(self) -> nn.Module:
        return self._shared[1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                features: Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
                logits_to_keep: int = 0, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if features is None:
            raise ValueError("a FeatureDrafter drafts from the verifier's hidden states: pass features [B, T, d] "
                             "(column j: the verifier's feature of the token before input_ids[:, j]; "
                             "speculative_generate supplies them)")
        if features.shape[:2] != input_ids.shape or features.shape[-1] != self.fc.out_features:
            raise ValueError(f"`features` must be [B, T, {self.fc.out_features}] for input_ids "
                             f"{tuple(input_ids.shape)}; got {tuple(features.shape)}")
        embed, head = self._shared
        e = embed(input_ids)
        h = self.fc(torch.cat([features.to(e.dtype), e], -1))
        out = self.body(inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, **{self._cache_kwarg: past_key_values})
        hidden = out.last_hidden_state
        logits = head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values, hidden_states=(hidden,))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``fc`` and ``body`` (safetensors) and the settings to directory ``path``; returns it."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps({"num_layers": self.num_layers, "hidden_size": self.fc.out_features,
                                                    "class": type(self).__name__}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verifier: nn.Module) -> FeatureDrafter:
        """A drafter written by :meth:`save`, attached to ``verifier`` (the model it was trained on).

        Raises:
            FileNotFoundError: ``path`` holds no saved drafter.
            ValueError: ``verifier``'s hidden size is not the drafter's.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} holds no feature drafter (no {CONFIG_FILE}); train one with "
                                    "`python -m recipes.lm_pair preset=smollm2_feature_drafter`")
        info = json.loads((path / CONFIG_FILE).read_text())
        if info["hidden_size"] != hidden_size(verifier):  # before building: a clear error, not a shape mismatch
            raise ValueError(f"the drafter in {str(path)!r} was trained on a verifier of hidden size "
                             f"{info['hidden_size']}; this verifier's is {hidden_size(verifier)}")
        drafter = cls(verifier, num_layers=int(info["num_layers"]))
        drafter.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return drafter.to(next(verifier.parameters()).dtype).eval()


def check_unroll(unroll: Any) -> int:
    """``unroll`` if it is an integer >= 1 (the passes of :func:`feature_drafter_loss`), else ValueError."""
    if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 1:
        raise ValueError(f"`unroll` must be an integer >= 1; got {unroll!r}")
    return unroll


def feature_drafter_loss(drafter: FeatureDrafter, input_ids: Tensor, attention_mask: Tensor | None,
                         features: Tensor, verifier_logits: Tensor, cls_weight: float = 0.1,
                         noise: float = 0.1, unroll: int = 1) -> dict[str, Tensor]:
    """EAGLE training loss on one teacher-forced batch (module docstring).

    Args:
        drafter: the drafter being trained.
        input_ids: ``[B, T]`` tokens; ``attention_mask`` ``[B, T]`` (1 = token) or None.
        features: ``[B, T, d]`` the verifier's last hidden states on ``input_ids`` (no gradient).
        verifier_logits: ``[B, T, V]`` the verifier's logits there (the classification target is their softmax).
        cls_weight: weight of the token term (the paper's 0.1).
        noise: half-width ``a`` of the uniform noise ``U(−a, a)`` added to the input features (0 = none).
        unroll: passes of the drafter per batch (1 = EAGLE). Pass ``k > 1`` reads, in every column, the drafter's
            own prediction ``ĥ`` of the previous column from pass ``k − 1`` instead of the verifier's feature, as
            draft step ``k`` of a speculative round does (a simplified "training-time test": "EAGLE-3: Scaling up
            Inference Acceleration of Large Language Models via Training-Time Test", arXiv:2503.01840; "Learning
            Harmonized Representations for Speculative Sampling", arXiv:2408.15766). Every pass has the same
            targets; gradients flow through the chained predictions. Simplification (UNVERIFIED against those
            papers' exact masks): in pass ``k`` the earlier columns the drafter attends to also hold predicted
            features, where a decoding round has the verifier's for all but the last ``k − 1`` columns.

    Returns:
        ``{"loss", "regression", "classification", "agreement"}``: the total, the Smooth-L1 feature term, the
        cross-entropy to the verifier's distribution, and the top-1 agreement of ``Head(ĥ)`` with the verifier
        (no gradient) — all averaged over the positions where ``attention_mask`` is 1; with ``unroll > 1`` the
        loss terms are the means over the passes, ``agreement`` is the first pass's (reading the verifier's
        features) and ``agreement_<k>`` pass ``k``'s.
    """
    check_unroll(unroll)
    if features.shape[:2] != input_ids.shape or verifier_logits.shape[:2] != input_ids.shape:
        raise ValueError(f"`features` [B, T, d] and `verifier_logits` [B, T, V] must match input_ids "
                         f"{tuple(input_ids.shape)}; got {tuple(features.shape)} and {tuple(verifier_logits.shape)}")
    # padding columns read as zeros, as in decoding (the column before a row's first token)
    inputs = shift_features(features if attention_mask is None else features * attention_mask[..., None])
    if noise > 0:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    positions = None if attention_mask is None else position_ids_from_mask(attention_mask)
    keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool())
    n = keep.sum().clamp(min=1)
    target = torch.softmax(verifier_logits.float(), -1)
    top = verifier_logits.max(-1).indices  # the first maximum, as argmax, in half its time on CPU
    regs: list[Tensor] = []
    clss: list[Tensor] = []
    out: dict[str, Tensor] = {}
    pred: Tensor | None = None
    for k in range(1, unroll + 1):
        if pred is not None:  # the previous pass's predictions, one column on, as the next draft step reads them
            inputs = shift_features(pred if attention_mask is None else pred * attention_mask[..., None])
        step = drafter(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, features=inputs)
        pred, logits = step.hidden_states[-1], step.logits.float()
        regs.append((F.smooth_l1_loss(pred.float(), features.float(), reduction="none").mean(-1) * keep).sum() / n)
        clss.append((-(target * torch.log_softmax(logits, -1)).sum(-1) * keep).sum() / n)
        with torch.no_grad():
            out["agreement" if k == 1 else f"agreement_{k}"] = ((logits.max(-1).indices == top) & keep).sum() / n
    reg, cls = torch.stack(regs).mean(), torch.stack(clss).mean()
    return {"loss": reg + cls_weight * cls, "regression": reg, "classification": cls, **out}
