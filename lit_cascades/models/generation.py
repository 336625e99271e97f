"""Batched greedy generation with per-token log-probabilities and hidden-state features.

Wraps Hugging Face ``generate`` (greedy, left-padded batches) and returns, per row, the generated tokens padded
to ``max_new_tokens``, the model's log-probability of each generated token (from the raw logits, before any
logits processor) and a mask that covers the tokens up to **and including** the stop token (the model's
decision to end the output is part of its uncertainty; drop it with ``include_stop=False``).

Stopping is counted, so that "the next line" works for every tokenizer: ``stop_counts[v]`` says how many stop
events token ``v`` carries (e.g. how many newlines it decodes to) and a row stops once its generated tokens
have carried ``num_stops`` of them. Next-line completion prompts end *before* the last newline (tokenizers
such as GPT-2's or SmolLM2's merge a newline with the next line's indentation, so a prompt ending in a bare
newline would not tokenize as the text does) and stop at the second newline.

:func:`generate_batches` runs :func:`greedy_generate` over every batch of a loader with a progress bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cascades._progress import progress_bar
from lit_cascades.models.lm_pair import context_length, model_vocab_size


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


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` position ids that start at 0 on each row's first real token (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_fits_context(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ``ValueError`` if ``prompt_len + max_new_tokens`` exceeds the model's context window."""
    ctx = context_length(model)
    if ctx is not None and prompt_len + max_new_tokens > ctx:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's context window of {ctx} tokens; shorten the prompts (context_tokens) or "
            "max_new_tokens"
        )


def as_stop_counts(stop: Tensor | Sequence[int], vocab_size: int) -> Tensor:
    """A ``[V]`` float stop-count vector from itself or from a list of stop token ids (count 1 each)."""
    if isinstance(stop, Tensor) and stop.is_floating_point():
        if stop.ndim != 1 or stop.shape[0] < vocab_size:
            raise ValueError(f"`stop_counts` must have shape [V >= {vocab_size}]; got {tuple(stop.shape)}")
        return stop
    ids = torch.as_tensor(list(stop) if not isinstance(stop, Tensor) else stop, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("`stop_counts` is empty; give at least one stop token id")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"stop token ids must be in [0, {vocab_size}); got {ids.tolist()}")
    counts = torch.zeros(vocab_size)
    counts[ids] = 1.0
    return counts


class StopAfterCount:
    """HF stopping criterion: a row is done once its generated tokens carry ``num_stops`` stop counts."""

    def __init__(self, stop_counts: Tensor, num_stops: int, prompt_len: int) -> None:
        self.stop_counts, self.num_stops, self.prompt_len = stop_counts, num_stops, prompt_len

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        counts = self.stop_counts.to(input_ids.device)[input_ids[:, self.prompt_len:]]
        return counts.sum(-1) >= self.num_stops


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    stop_counts: Tensor | Sequence[int],
    pad_token_id: int,
    num_stops: int = 1,
    include_stop: bool = True,
    temperature: float = 0.0,
) -> Generation:
    """Greedy decoding of a left-padded batch with HF ``generate``; see :class:`Generation`.

    With ``temperature > 0`` it samples instead (plain ancestral sampling at that temperature, no top-k/top-p;
    torch's global RNG, as HF ``generate`` uses it); ``logprobs`` stay those of the raw logits.

    Args:
        model: a HF causal LM.
        input_ids: ``[B, L]`` left-padded prompts.
        attention_mask: ``[B, L]`` 1 on prompt tokens.
        max_new_tokens: generation budget ``M``.
        stop_counts: ``[V]`` stop events per token (e.g. :func:`~lit_cascades.data.lm.newline_counts`), or a
            list of stop token ids (one event each).
        pad_token_id: id written after a row has stopped.
        num_stops: stop events that end an output (2 = the second newline for next-line completion).
        include_stop: whether the stop token counts as part of the output in ``mask``.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"`input_ids` and `attention_mask` must both be [B, L]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1; got {max_new_tokens}")
    if num_stops < 1:
        raise ValueError(f"`num_stops` must be >= 1; got {num_stops}")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy); got {temperature}")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every prompt needs at least one token; got an empty (all-padding) prompt")
    check_fits_context(model, input_ids.shape[1], max_new_tokens)
    counts = as_stop_counts(stop_counts, model_vocab_size(model)).to(input_ids.device)
    prompt_len = input_ids.shape[1]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0, num_beams=1, pad_token_id=pad_token_id,
        return_dict_in_generate=True, output_logits=True,
        **({"temperature": float(temperature), "top_k": 0, "top_p": 1.0} if temperature > 0 else {}),
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         stopping_criteria=StoppingCriteriaList([StopAfterCount(counts, num_stops, prompt_len)]))
    new = out.sequences[:, prompt_len:]
    logits = torch.stack(out.logits, dim=1).float()  # [B, M', V]
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, new[..., None]).squeeze(-1)
    cum = counts[new].cumsum(-1)
    is_stop = (cum >= num_stops) & (cum - counts[new] < num_stops)  # the token that reaches num_stops
    mask = (cum - counts[new]) < num_stops  # nothing stopped the row before this token
    if not include_stop:
        mask = mask & ~is_stop
    stopped = is_stop.any(-1)
    pad = max_new_tokens - new.shape[1]
    if pad > 0:
        new = F.pad(new, (0, pad), value=pad_token_id)
        logprobs = F.pad(logprobs, (0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    past_stop = (counts[new].cumsum(-1) - counts[new]) >= num_stops
    new = new.masked_fill(past_stop, pad_token_id)
    logprobs = logprobs.masked_fill(~mask, 0.0)
    return Generation(new, logprobs, mask, stopped)


def generate_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    max_new_tokens: int,
    stop_counts: Tensor | Sequence[int],
    pad_token_id: int,
    num_stops: int = 1,
    include_stop: bool = True,
    temperature: float = 0.0,
    progress: bool = True,
    desc: str = "generating",
) -> Iterator[tuple[Mapping[str, Any], Generation]]:
    """:func:`greedy_generate` over every batch of ``batches`` (e.g. a DataLoader of
    :func:`~lit_cascades.data.lm.collate_prompts` batches), yielding ``(batch, generation)`` in order.

    Each batch's ``input_ids``/``attention_mask`` are moved to the model's device. ``progress`` shows a bar over
    the batches (stderr), labelled ``desc``. The other arguments are :func:`greedy_generate`'s.
    """
    device = next(model.parameters()).device
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    for batch in progress_bar(batches, desc=desc, total=total, unit="batch", progress=progress):
        gen = greedy_generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              max_new_tokens, stop_counts, pad_token_id, num_stops=num_stops,
                              include_stop=include_stop, temperature=temperature)
        yield batch, gen


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
    positions = position_ids_from_mask(mask)
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
