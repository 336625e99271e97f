"""Batched greedy generation with per-token log-probabilities and hidden-state features.

Wraps Hugging Face ``generate`` (greedy, left-padded batches, a set of stop tokens) and returns, per row, the
generated tokens padded to ``max_new_tokens``, the model's log-probability of each generated token (from the
raw logits, before any logits processor) and a mask that covers the tokens up to **and including** the first
stop token (the model's decision to end the output is part of its uncertainty; drop it with
``include_stop=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cascades.models.lm_pair import context_length


@dataclass
class Generation:
    """Output of :func:`greedy_generate` for a batch of ``B`` prompts (``M = max_new_tokens``).

    Attributes:
        tokens: ``[B, M]`` generated ids (``pad_token_id`` after the end).
        logprobs: ``[B, M]`` float32 log-probabilities of ``tokens`` (0 where masked).
        mask: ``[B, M]`` bool, True on the tokens that belong to the output.
        stopped: ``[B]`` bool, whether a stop token was generated within ``M`` tokens.
    """

    tokens: Tensor
    logprobs: Tensor
    mask: Tensor
    stopped: Tensor


def check_fits_context(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ``ValueError`` if ``prompt_len + max_new_tokens`` exceeds the model's context window."""
    ctx = context_length(model)
    if ctx is not None and prompt_len + max_new_tokens > ctx:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's context window of {ctx} tokens; shorten the prompts (context_tokens) or "
            "max_new_tokens"
        )


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    include_stop: bool = True,
) -> Generation:
    """Greedy decoding of a left-padded batch with HF ``generate``; see :class:`Generation`.

    Args:
        model: a HF causal LM.
        input_ids: ``[B, L]`` left-padded prompts.
        attention_mask: ``[B, L]`` 1 on prompt tokens.
        max_new_tokens: generation budget ``M``.
        stop_token_ids: ids that end an output (e.g. every token holding a newline).
        pad_token_id: id written after a row has stopped.
        include_stop: whether the stop token counts as part of the output in ``mask``.
    """
    from transformers import GenerationConfig

    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"`input_ids` and `attention_mask` must both be [B, L]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1; got {max_new_tokens}")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every prompt needs at least one token; got an empty (all-padding) prompt")
    check_fits_context(model, input_ids.shape[1], max_new_tokens)
    stops = list(stop_token_ids)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops,
        pad_token_id=pad_token_id, return_dict_in_generate=True, output_logits=True,
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    prompt_len = input_ids.shape[1]
    new = out.sequences[:, prompt_len:]
    logits = torch.stack(out.logits, dim=1).float()  # [B, M', V]
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, new[..., None]).squeeze(-1)
    is_stop = torch.isin(new, torch.tensor(stops, device=new.device))
    before = is_stop.long().cumsum(-1) - is_stop.long()  # number of stop tokens strictly before t
    mask = before == 0
    if not include_stop:
        mask = mask & ~is_stop
    stopped = is_stop.any(-1)
    pad = max_new_tokens - new.shape[1]
    if pad > 0:
        new = F.pad(new, (0, pad), value=pad_token_id)
        logprobs = F.pad(logprobs, (0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    logprobs = logprobs.masked_fill(~mask, 0.0)
    return Generation(new, logprobs, mask, stopped)


@torch.no_grad()
def output_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    generated: Tensor,
    generated_mask: Tensor,
    layer: int = -1,
) -> Tensor:
    """Mean hidden state of ``layer`` over the positions that produced the generated tokens.

    Feeds ``[prompt, generated]`` (teacher forcing) and averages the layer-``layer`` states at the positions
    whose next-token logits scored each valid generated token (the last prompt position and the generated
    ones but the last). ``layer`` indexes ``hidden_states`` (0 = embeddings, -1 = final layer).

    Returns:
        ``[B, d]`` float32 features.
    """
    check_fits_context(model, input_ids.shape[1], generated.shape[1])
    ids = torch.cat([input_ids, generated], dim=1)
    mask = torch.cat([attention_mask.long(), generated_mask.long()], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    states = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
    n_layers = len(states)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"`layer` must index one of the model's {n_layers} hidden states; got {layer}")
    h = states[layer].float()
    prompt_len = input_ids.shape[1]
    # the state at position prompt_len - 1 + t produced generated token t
    h = h[:, prompt_len - 1: prompt_len - 1 + generated.shape[1]]
    w = generated_mask.float()[..., None]
    return (h * w).sum(1) / w.sum(1).clamp(min=1.0)
