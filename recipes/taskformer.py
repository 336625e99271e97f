"""TASK-former: image retrieval from text plus sketch (Sangkloy et al., ECCV 2022).

    python -m recipes.taskformer                        # constructed scenes, offline, 4-7 min on 2 CPU cores
    python -m recipes.taskformer preset=text_only       # text-only baseline, same budget (preset=sketch_only likewise)
    python -m recipes.taskformer model.w_caption=0      # remove an auxiliary loss (model.w_classification=0)
    python -m recipes.taskformer data=coco data.root=/path/to/coco       # COCO with the default small towers
    python -m recipes.taskformer preset=coco data.root=/path/to/coco     # the paper's setting (CLIP ViT-B/16, GPU)
    python -m recipes.taskformer model._target_=my_pkg.MyTaskFormer      # a subclass of TaskFormer
    python -m recipes.taskformer --help                 # presets, config groups and every key

Components are built from their config sections (``_target_`` plus constructor arguments): ``data`` (a
``TextSketchImageDataModule``; the recipe supplies ``seed``), ``model`` (a :class:`~lit_cascades.modules.
TaskFormer`; the recipe supplies ``image_size``, ``num_classes``, ``class_names`` and ``caption_vocab`` from the
data) and ``callbacks`` (extra Lightning callbacks for the fit). Everything is built and the data set up before
training starts, so a bad value stops the run at once (``error: <key>: ...``, exit status 2).

One stage, ``taskformer``:

1. build the data (constructed scenes or COCO; the log names which) and the model;
2. fit TaskFormer (validation Recall@K each epoch): ``taskformer/model.pt``, ``taskformer/logs/fit/metrics.csv``;
3. test: Recall@K and MRR@10 of text, sketch and text+sketch queries against the whole test gallery
   (``taskformer/logs/test/metrics.csv``, ``taskformer/metrics.json``);
4. embed the test split (``taskformer/predictions.pt``, gathered across processes) for
   ``retrieval_examples.png`` (queries and their top-5); ``retrieval.csv`` and ``metrics.json`` in the run dir.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lit_cascades.data import TextSketchImageDataModule
from lit_cascades.models import count_parameters
from lit_cascades.modules import TaskFormer
from lit_cascades.plotting import plot_retrieval_examples
from lit_cascades.runner import ConfigError, Run, build, build_list, config_errors, main


def build_datamodule(cfg: DictConfig) -> TextSketchImageDataModule:
    """The ``data`` section's DataModule (seeded by ``cfg.seed``), set up: data errors are ``data.<arg>`` errors."""
    dm = build(cfg.data, "data", seed=int(cfg.seed))
    if not isinstance(dm, TextSketchImageDataModule):
        raise ConfigError(f"expected a TextSketchImageDataModule subclass; got {type(dm).__qualname__}",
                          key="data._target_")
    with config_errors("data", names=list(cfg.data)):
        dm.setup()
    return dm


def build_model(cfg: DictConfig, dm: TextSketchImageDataModule) -> TaskFormer:
    """The ``model`` section's TaskFormer with the data's image size, classes and caption vocabulary."""
    module = build(cfg.model, "model", image_size=dm.image_size, num_classes=dm.num_classes,
                   class_names=dm.class_names, caption_vocab=dm.vocab.words)
    if not isinstance(module, TaskFormer):
        raise ConfigError(f"expected a TaskFormer subclass; got {type(module).__qualname__}", key="model._target_")
    return module


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
    # -- build and check everything before any work ----------------------------------------------------
    if int(cfg.train.epochs) < 1:
        raise ConfigError(f"expected an integer >= 1; got {cfg.train.epochs}", key="train.epochs")
    if int(cfg.eval.examples) < 0:
        raise ConfigError(f"expected an integer >= 0; got {cfg.eval.examples}", key="eval.examples")
    dm = build_datamodule(cfg)
    print(f"[taskformer] data: {dm.description}")
    module = build_model(cfg, dm)
    callbacks = build_list(cfg.get("callbacks"), "callbacks")
    k_max = max(module.hparams.recall_ks)
    for split in ("val", "test"):
        if len(dm.splits[split]) < k_max:
            raise ConfigError(f"the {split} gallery has {len(dm.splits[split])} images, fewer than the largest "
                              f"recall cut-off k={k_max}; lower model.recall_ks or use more images",
                              key="model.recall_ks")

    # -- the stage -------------------------------------------------------------------------------------
    st = r.stage("taskformer", kind="taskformer",
                 config={"model": OmegaConf.to_container(cfg.model, resolve=True),
                         "data": OmegaConf.to_container(cfg.data, resolve=True), "epochs": int(cfg.train.epochs)})
    st.fit(module, dm, callbacks=callbacks, max_epochs=int(cfg.train.epochs))
    logged = st.test(module, dm)
    names = [*(f"recall@{k}" for k in module.hparams.recall_ks), "mrr@10"]
    test = {qt: {n: logged[f"test/retrieval/{qt}/{n}"] for n in names} for qt in module.query_types}
    if int(cfg.eval.examples) > 0:
        emb = st.predict(module, dataloaders=dm.test_dataloader())
        r.save_figure("retrieval_examples", example_figure(module, dm, emb, int(cfg.eval.examples)))
    st.finish({"test": test, "logit_scale": float(module.temperature.detach().reciprocal())})
    r.save_table("retrieval", ["query", *names], [[qt, *(round(v[n], 4) for n in names)] for qt, v in test.items()])
    return {
        "data": {"description": dm.description, **{f"n_{k}": len(v) for k, v in dm.splits.items()},
                 "num_classes": dm.num_classes, "vocab_size": len(dm.vocab)},
        "query": module.hparams.query,
        "params": count_parameters(module),
        "logit_scale": float(module.temperature.detach().reciprocal()),
        "test": test,
    }


if __name__ == "__main__":
    main("taskformer", run)
