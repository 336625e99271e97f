"""LM pair: a small and a large causal LM sharing one tokenizer, trained on one corpus and saved together.

    python -m recipes.lm_pair                      # stdlib corpus, BPE-4096, GPT-2 1x128 and 4x256, CPU minutes
    python -m recipes.lm_pair preset=smollm2       # SmolLM2-135M as the large LM, its first layers as the small
    python -m recipes.lm_pair preset=smoke         # seconds (tests)
    python -m recipes.lm_pair small.module.lr=0.001 large.steps=1200 output_dir=runs/my_pair

1. build the corpus DataModule from ``data`` (``_target_`` + arguments): load and split the corpus (file level),
   train a byte-level BPE tokenizer on the training split or take ``data.tokenizer``;
2. build each model from ``<role>.model`` (:func:`lit_cascades.models.lm_pair.pair_lm`: a GPT-2 config, or a
   pretrained ``init`` optionally cut to its first ``truncate_layers`` layers) and its ``<role>.module``
   (:class:`~lit_cascades.modules.causal_lm.CausalLM`), all before any training;
3. stages ``small`` and ``large``: train with next-token cross-entropy for ``<role>.steps`` steps, test
   (held-out loss/perplexity/token accuracy in ``<role>/metrics.json``);
4. save the pair with ``save_pretrained`` to ``<run>/pair`` (the corpus section recorded in ``pair.json``).

The other LM recipes read a pair from ``pair.path=<run>/pair``, or build one themselves with
``pair.build_preset=<preset>`` (trained once into ``<cache root>/lm_pair/<config hash>/run`` and reused).
The body lives in the library (:func:`lit_cascades.lm_tasks.train_pair`) because those recipes run it too.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lit_cascades.lm_tasks import train_pair
from lit_cascades.runner import Run, main


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    return train_pair(cfg, r)


if __name__ == "__main__":
    main("lm_pair", run)
