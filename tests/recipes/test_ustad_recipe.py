"""The USTAD recipe on the run layer: the smoke preset with the distillation stages on the embedded stdlib task
(one run shared by the tests), a distillation from that run's teacher weights (``distill.teacher_checkpoint``,
loaded with ``weights_only=True``), the separate-models baseline on MS MARCO files written by the test
(``data=msmarco``), bad values that stop the run before any work, and two DDP processes against one."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch

from lit_cascades.runner import load_config, main, run_recipe
from recipes.ustad import run
from tests.data.test_retrieval_data import write_tiny_msmarco

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
NAMES = ["mrr@10", "recall@1", "recall@10", "recall@100", "ndcg@10"]
STAGES = ("teacher", "student", "student_no_teacher")


def _check(m, names=NAMES):
    assert set(m) == set(names)
    assert 0 <= m["recall@1"] <= m["mrr@10"] <= m[names[2]] <= m[names[3]] <= 1


#: the shared run's config (CPU: the DDP test compares it with two CPU processes)
SMOKE = ["preset=smoke", "stage=distill", "trainer.accelerator=cpu"]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ustad") / "run"
    _, metrics = run_recipe("ustad", run, [*SMOKE, f"output_dir={out}"])
    return out, metrics


@pytest.mark.slow
def test_smoke_distill_writes_the_run_and_stage_layout(smoke_run):
    out, _ = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["recipe"] == "ustad" and metrics["stage"] == "distill"
    assert metrics["data"]["description"].startswith("Python stdlib code search")
    assert metrics["data"]["n_train_queries"] == 48 and metrics["data"]["n_test_queries"] == 24
    assert metrics["data"]["n_test_docs"] > 100  # the whole test split's corpus
    for key in STAGES:
        _check(metrics[key]["de"])
    _check(metrics["teacher"]["rerank"])
    assert metrics["student"]["params"]["trainable"] < metrics["teacher"]["params"]["trainable"] / 5
    rows = list(csv.reader(open(out / "retrieval.csv")))
    assert rows[0] == ["model", "scorer", "params", "trainable_params", *NAMES] and len(rows) == 5
    assert float(rows[3][4]) == pytest.approx(metrics["student"]["de"]["mrr@10"], abs=1e-4)
    for stage in STAGES:
        for f in ("model.pt", "config.yaml", "metrics.json", "logs/fit/metrics.csv", "logs/test/metrics.csv"):
            assert (out / stage / f).exists(), (stage, f)
        assert json.loads((out / stage / "metrics.json").read_text())["de"] == pytest.approx(metrics[stage]["de"])
    assert "alpha_score: 0.0" in (out / "student_no_teacher" / "config.yaml").read_text()
    logs = list(csv.DictReader(open(out / "teacher" / "logs" / "fit" / "metrics.csv")))
    assert any(row.get("val/retrieval/de/mrr@10") for row in logs)
    assert any(row.get("val/retrieval/rerank/mrr@10") for row in logs)
    assert any(row.get("train/ce") for row in logs) and any(row.get("data/truncated/encoder_doc") for row in logs)
    logs = list(csv.DictReader(open(out / "student" / "logs" / "fit" / "metrics.csv")))
    assert any(row.get("train/score_ce") for row in logs) and any(row.get("train/emb") for row in logs)
    assert len(list((out / "wandb").glob("offline-run-*"))) >= len(STAGES)


@pytest.mark.slow
def test_distill_from_a_teacher_checkpoint(smoke_run, tmp_path):
    """The teacher's model.pt of the shared run (a state dict, loaded with weights_only=True): no teacher fit,
    the same teacher test results, and the same distilled student (its stage is seeded)."""
    first, metrics = smoke_run
    out = tmp_path / "run"
    _, again = run_recipe("ustad", run, [*SMOKE, "distill.baseline=false",
                                         f"distill.teacher_checkpoint={first / 'teacher' / 'model.pt'}",
                                         f"output_dir={out}", "logger.wandb=false"])
    assert not (out / "teacher" / "logs" / "fit").exists() and not (out / "teacher" / "model.pt").exists()
    assert again["teacher"]["de"] == pytest.approx(metrics["teacher"]["de"], abs=1e-6)
    assert again["teacher"]["rerank"] == pytest.approx(metrics["teacher"]["rerank"], abs=1e-6)
    assert again["student"]["de"] == pytest.approx(metrics["student"]["de"], abs=1e-6)
    assert "student_no_teacher" not in again


@pytest.mark.slow
def test_two_ddp_processes_match_one(smoke_run, tmp_path):
    """The shared smoke run's teacher and distilled student again on two ddp_spawn processes, same config
    (``data.batch_size`` is the global batch: 4 rows per process; ``distill.baseline=false`` saves two spawned
    trainer calls, the no-teacher student being the same module with two loss weights at 0). Every loss sees
    what one process sees: the DE InfoNCE losses and the teacher's DE scores distilled by the student gather
    the in-batch candidates across processes, the CE lists borrow the other queries' positives from the
    gathered global batch, the encoders run without dropout, and the evaluation corpus is encoded in shards
    and gathered. Measured: every test metric equal, trained weights within 2.7e-6 (float summation order).
    Tolerances: 1e-6 on the metrics, 1e-4 on every weight."""
    first, _ = smoke_run
    out = tmp_path / "run"
    run_recipe("ustad", run, [*SMOKE, "distill.baseline=false", "trainer.devices=2", "trainer.strategy=ddp_spawn",
                              "logger.wandb=false", f"output_dir={out}"])
    one, two = (_flat({k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k != "run"})
                for d in (first, out))
    assert set(two) == {k for k in one if not k.startswith("student_no_teacher/")}
    for key, value in two.items():
        assert value == (pytest.approx(one[key], abs=1e-6) if isinstance(value, float) else one[key]), key
    for stage in ("teacher", "student"):
        w1, w2 = (torch.load(d / stage / "model.pt", weights_only=True) for d in (first, out))
        assert w1.keys() == w2.keys()
        for name, w in w1.items():
            torch.testing.assert_close(w2[name], w, rtol=0, atol=1e-4, msg=f"{stage}: {name}")


@pytest.mark.slow
def test_msmarco_files_separate_models(tmp_path, capsys):
    write_tiny_msmarco(tmp_path / "msmarco")
    out = tmp_path / "run"
    _, metrics = run_recipe("ustad", run, [
        "preset=smoke", "data=msmarco", f"data.root={tmp_path / 'msmarco'}", "teacher.model=separate",
        "data.batch_size=2", "data.num_workers=0", "data.max_test_queries=3", "data.max_val_queries=3",
        "teacher.recall_ks=[1,2,3]", "teacher.rerank_depth=3", "logger.wandb=false", f"output_dir={out}"])
    assert "1 of 3 queries have no relevant document" in capsys.readouterr().out
    assert metrics["teacher"]["model"] == "separate" and metrics["data"]["n_test_docs"] == 8
    _check(metrics["teacher"]["de"], ["mrr@10", "recall@1", "recall@2", "recall@3", "ndcg@10"])


def _pickled_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    return path


@pytest.mark.parametrize("args, message", [
    (["stage=student"], "error: stage: expected one of teacher, distill"),
    (["stage=distill", "student.distill_scores=all"], "error: student.distill_scores: `distill_scores` must be"),
    (["stage=distill", "distill.teacher_checkpoint=PICKLED"], "error: distill.teacher_checkpoint: "),
    (["stage=distill", "distill.teacher_checkpoint=MISSING"], "error: distill.teacher_checkpoint: no such file"),
])
def test_bad_values_exit_2_before_any_work(tmp_path, capsys, args, message):
    args = [a.replace("PICKLED", str(_pickled_checkpoint(tmp_path / "evil.ckpt")))
            .replace("MISSING", str(tmp_path / "none.pt")) for a in args]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main("ustad", run, ["preset=smoke", "logger.wandb=false", f"output_dir={out}", *args])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(message), err
    if "PICKLED" in " ".join(args) or "evil" in err[0]:
        assert "refusing to load" in err[0]
    assert not out.exists()


def test_config_groups_and_keys():
    cfg, _ = load_config("ustad", ["data=msmarco", "data.root=/x", "teacher.model=separate", "stage=distill",
                                   "student.student=symmetric", "teacher.recall_ks=[1,5]"], CONFIGS)
    assert cfg.data.source == "msmarco" and cfg.data.root == "/x" and cfg.teacher.model == "separate"
    assert cfg.student.student == "symmetric" and cfg.student.alpha_score == 1.0
    assert list(cfg.student.recall_ks) == [1, 5]  # the students evaluate at the teacher's cut-offs
    cfg, _ = load_config("ustad", ["preset=smoke"], CONFIGS)
    assert cfg.teacher.encoder == "tiny-bert" and cfg.data.source == "stdlib"

