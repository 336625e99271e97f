"""The TASK-former recipe on the run layer: the smoke preset on constructed scenes (one run shared by the tests),
COCO files written by the test (``data=coco``, text-only) run by a TaskFormer subclass through ``model._target_``,
bad values that stop the run before any work, and two DDP processes against one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lit_cascades.modules import TaskFormer
from lit_cascades.runner import load_config, main, run_recipe
from recipes.taskformer import run
from tests.data.test_coco import write_tiny_coco

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
QUERY_TYPES = ["text+sketch", "text", "sketch"]


class MarkedTaskFormer(TaskFormer):
    """A user's subclass: logs one extra loss component, so the test can see that it is what was trained."""

    def compute_losses(self, batch):
        out = super().compute_losses(batch)
        out["marker"] = torch.tensor(7.0)
        return out


def _check_recalls(test, query_types):
    assert set(test) == set(query_types)
    for qt, m in test.items():
        assert 0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1, qt
        assert m["recall@1"] <= m["mrr@10"] <= m["recall@10"], qt


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("taskformer") / "run"
    _, metrics = run_recipe("taskformer", run, ["preset=smoke", f"output_dir={out}", "model.share_encoders=true"])
    return out, metrics


@pytest.mark.slow
def test_smoke_preset_writes_the_run_and_stage_layout(smoke_run, capsys):
    out, returned = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["recipe"] == "taskformer" and metrics["run"]["preset"] == "smoke"
    assert metrics["data"]["description"].startswith("constructed scenes (not natural images)")
    assert metrics["data"]["n_train"] == 192 and metrics["data"]["n_test"] == 48
    assert metrics["query"] == "text+sketch" and metrics["params"] > 0
    _check_recalls(metrics["test"], QUERY_TYPES)
    for qt in QUERY_TYPES:
        assert metrics["test"][qt] == pytest.approx(returned["test"][qt])
    rows = list(csv.reader(open(out / "retrieval.csv")))
    assert rows[0] == ["query", "recall@1", "recall@5", "recall@10", "mrr@10"]
    assert {r[0] for r in rows[1:]} == set(QUERY_TYPES)
    for r in rows[1:]:
        assert float(r[2]) == pytest.approx(metrics["test"][r[0]]["recall@5"], abs=1e-4)
    assert (out / "retrieval_examples.png").stat().st_size > 10_000
    st = out / "taskformer"
    stage_metrics = json.loads((st / "metrics.json").read_text())
    assert all(stage_metrics["test"][qt] == pytest.approx(metrics["test"][qt]) for qt in QUERY_TYPES)
    for f in ("model.pt", "config.yaml", "logs/fit/metrics.csv", "logs/test/metrics.csv", "predictions.pt"):
        assert (st / f).exists(), f
    assert "share_encoders: true" in (st / "config.yaml").read_text()
    assert "_target_: lit_cascades.modules.TaskFormer" in (out / "config.yaml").read_text()
    logs = list(csv.DictReader(open(st / "logs" / "fit" / "metrics.csv")))
    assert any(row.get("val/retrieval/text+sketch/recall@1") for row in logs)
    assert any(row.get("train/contrastive") for row in logs)
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))


@pytest.mark.slow
def test_coco_files_text_only_through_a_subclass(tmp_path):
    root = write_tiny_coco(tmp_path / "coco", n_train=24, n_val=24)
    out = tmp_path / "run"
    _, metrics = run_recipe("taskformer", run, [
        "preset=smoke", "data=coco", f"data.root={root}", "data.image_size=32", "data.num_val=12",
        "data.num_test=12", "data.batch_size=8", "data.num_workers=0", "data.vocab_min_count=1",
        "model._target_=tests.recipes.test_taskformer_recipe.MarkedTaskFormer", "model.query=text",
        "model.recall_ks=[1,5]", "eval.examples=1", f"output_dir={out}", "logger.wandb=false"])
    assert metrics["data"]["description"].startswith("COCO 2014 captions")
    assert metrics["query"] == "text" and metrics["data"]["num_classes"] == 3
    assert set(metrics["test"]) == {"text"}
    m = metrics["test"]["text"]
    assert 0 <= m["recall@1"] <= m["recall@5"] <= 1
    logs = list(csv.DictReader(open(out / "taskformer" / "logs" / "fit" / "metrics.csv")))
    assert {float(row["train/marker"]) for row in logs if row.get("train/marker")} == {7.0}
    assert (out / "retrieval_examples.png").exists()


@pytest.mark.parametrize("args, message", [
    (["model.query=video"], "error: model.query: `query` must be one of"),
    (["+model.unknown_arg=1"], "error: model.unknown_arg: not an argument of TaskFormer"),
    (["+model.image_size=32"], "error: model.image_size: set by the recipe"),
    (["model.recall_ks=[1,5,100]"], "error: model.recall_ks: the val gallery has 48 images"),
])
def test_bad_values_exit_2_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main("taskformer", run, ["preset=smoke", "logger.wandb=false", f"output_dir={out}", *args])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_missing_coco_root_is_a_data_error(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main("taskformer", run, ["preset=smoke", "data=coco", f"data.root={tmp_path / 'nowhere'}",
                                 f"output_dir={out}", "logger.wandb=false"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: data.root: ") and "COCO root" in err[0], err
    assert "annotations/" in err[0]
    assert not out.exists()


def test_presets_compose():
    cfg, _ = load_config("taskformer", ["preset=coco", "data.root=/data/coco"], CONFIGS)
    assert cfg.data._target_.endswith("CocoCaptionsDataModule") and cfg.data.root == "/data/coco"
    assert cfg.data.image_size == 224 and cfg.model.image_encoder.startswith("clip:")
    assert cfg.model.image_encoder_kwargs is None
    assert cfg.model.w_contrastive == 100 and cfg.model.w_classification == 10 and cfg.model.w_caption == 1
    cfg, _ = load_config("taskformer", ["preset=text_only"], CONFIGS)
    assert cfg.model.query == "text" and cfg.data._target_.endswith("SceneRetrievalDataModule")
    cfg, _ = load_config("taskformer", ["model.query=sketch", "data=coco"], CONFIGS)
    assert cfg.model.query == "sketch" and cfg.data._target_.endswith("CocoCaptionsDataModule")
    assert cfg.model.image_encoder == "cnn"


#: the smoke preset with no randomness drawn per process row: no sketch stroke dropout or shifts (drawn per item
#: from the global RNG), GroupNorm instead of BatchNorm in the CNN, no dropout in the tiny BERT. Query-modality
#: dropout stays on: the module draws it for the global batch and keeps each process's rows.
DETERMINISTIC = ["preset=smoke", "logger.wandb=false", "trainer.accelerator=cpu", "eval.examples=0",
                 "data.keep_min=1.0", "data.max_shift=0", "model.image_encoder_kwargs.norm=group",
                 "model.text_encoder_kwargs.hidden_dropout_prob=0.0",
                 "model.text_encoder_kwargs.attention_probs_dropout_prob=0.0"]


@pytest.mark.slow
def test_two_ddp_processes_match_one(tmp_path):
    """The same config, data.batch_size included (it is the global batch: 16 rows per process), on one and on two
    ddp_spawn processes. Measured: every test metric and the logit scale equal, the trained weights within 1.2e-6
    (float summation order; 6 smoke steps). Tolerances: 1e-6 on the metrics and the logit scale, 1e-4 on every
    weight."""
    _, one = run_recipe("taskformer", run, [*DETERMINISTIC, f"output_dir={tmp_path / 'one'}"])
    _, two = run_recipe("taskformer", run, [*DETERMINISTIC, f"output_dir={tmp_path / 'two'}", "trainer.devices=2",
                                            "trainer.strategy=ddp_spawn"])
    assert two["data"] == one["data"] and two["params"] == one["params"]
    assert two["logit_scale"] == pytest.approx(one["logit_scale"], abs=1e-6)
    for qt in QUERY_TYPES:
        assert two["test"][qt] == pytest.approx(one["test"][qt], abs=1e-6), qt
    saved = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert all(saved["test"][qt] == pytest.approx(two["test"][qt]) for qt in QUERY_TYPES)
    w1, w2 = (torch.load(tmp_path / d / "taskformer" / "model.pt", weights_only=True) for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for name, w in w1.items():
        torch.testing.assert_close(w2[name], w, rtol=0, atol=1e-4, msg=name)
