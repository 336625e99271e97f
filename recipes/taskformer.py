"""TASK-former: image retrieval from text plus sketch (Sangkloy et al., ECCV 2022).

    python -m recipes.taskformer                        # constructed scenes, offline, 4-7 min on 2 CPU cores
    python -m recipes.taskformer query=text             # text-only baseline, same budget (query=sketch likewise)
    python -m recipes.taskformer model.w_caption=0      # remove an auxiliary loss (model.w_classification=0)
    python -m recipes.taskformer data=coco data.root=/path/to/coco       # COCO with the default small towers
    python -m recipes.taskformer preset=coco data.root=/path/to/coco     # the paper's setting (CLIP ViT-B/16, GPU)
    python -m recipes.taskformer --help                 # presets, config groups and every key

1. build the data (constructed scenes or COCO; the log names which);
2. train TaskFormer (validation Recall@K each epoch);
3. test: Recall@{1,5,10} and MRR@10 of text, sketch and text+sketch queries against the whole test gallery;
4. write retrieval.csv, retrieval_examples.png (queries and their top-5) and metrics.json (files and W&B).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lit_cascades.data import CocoCaptionsDataModule, SceneRetrievalDataModule, TextSketchImageDataModule
from lit_cascades.models import count_parameters
from lit_cascades.modules import TaskFormer
from lit_cascades.plotting import plot_retrieval_examples
from lit_cascades.runner import ConfigError, Run, main

DATAMODULES = {"scenes": SceneRetrievalDataModule, "coco": CocoCaptionsDataModule}


def build_datamodule(data: DictConfig, seed: int) -> TextSketchImageDataModule:
    """The DataModule named by ``data.source`` with the other ``data`` keys as arguments."""
    kwargs: dict[str, Any] = OmegaConf.to_container(data, resolve=True)  # type: ignore[assignment]
    source = kwargs.pop("source")
    if source not in DATAMODULES:
        raise ConfigError(f"data.source must be one of {sorted(DATAMODULES)}; got {source!r}")
    return DATAMODULES[source](**kwargs, seed=seed)


def example_figure(module: TaskFormer, dm: TextSketchImageDataModule, emb: dict[str, torch.Tensor], n: int,
                   k: int = 5) -> Any:
    """Top-``k`` images of ``n`` test queries, each asked as every query type the model serves."""
    gallery = emb["image"]
    queries = torch.linspace(0, len(gallery) - 1, n).round().long().tolist()
    items = dm.items("test", queries)
    rows, captions, sketches, titles, targets = [], [], [], [], []
    for j, qi in enumerate(queries):
        for qt in module.query_types:
            rows.append(module.retrieve(emb[qt][qi : qi + 1], gallery, k)[1][0])
            captions.append(items["caption"][j] if "text" in qt else "")
            sketches.append(items["sketch"][j] if "sketch" in qt else torch.zeros_like(items["sketch"][j]))
            titles.append(qt)
            targets.append(qi)
    ranked = torch.stack(rows)
    needed = sorted(set(ranked.flatten().tolist()))
    images = torch.zeros(len(gallery), *items["image"].shape[1:])
    images[needed] = dm.items("test", needed)["image"]
    return plot_retrieval_examples(images, ranked, torch.tensor(targets), captions, torch.stack(sketches), titles,
                                   title=f"test queries and their top-{k} (green: the query's image)")


def run(cfg: DictConfig, r: Run) -> dict[str, Any]:
    dm = build_datamodule(cfg.data, cfg.seed)
    dm.setup()
    print(f"[taskformer] data: {dm.description}")
    model_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    module = TaskFormer(image_size=dm.image_size, query=cfg.query, num_classes=dm.num_classes,
                        class_names=dm.class_names, caption_vocab=dm.vocab.words, recall_ks=list(cfg.eval.recall_ks),
                        **model_kwargs)
    r.fit("taskformer", module, dm, max_epochs=cfg.train.epochs)
    logged = r.test("test", module, dm)

    names = [*(f"recall@{k}" for k in cfg.eval.recall_ks), "mrr@10"]
    test = {qt: {n: logged[f"test/retrieval/{qt}/{n}"] for n in names} for qt in module.query_types}
    r.save_table("retrieval", ["query", *names], [[qt, *(round(v[n], 4) for n in names)] for qt, v in test.items()])
    emb = r.predict(module, dm.test_dataloader())
    r.save_figure("retrieval_examples", example_figure(module, dm, emb, int(cfg.eval.examples)))
    return {
        "data": {"description": dm.description, **{f"n_{k}": len(v) for k, v in dm.splits.items()},
                 "num_classes": dm.num_classes, "vocab_size": len(dm.vocab)},
        "query": cfg.query,
        "params": count_parameters(module),
        "logit_scale": float(module.temperature.reciprocal()),
        "test": test,
    }


if __name__ == "__main__":
    main("taskformer", run)
