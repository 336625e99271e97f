"""Results of docs/ustad.md (Kim et al., *USTAD: Unified Single-model Training Achieving Diverse Scores for
Information Retrieval*, ICML 2024; distillation after *EmbedDistill*, arXiv:2301.12005) on the embedded
stdlib code-search task, over several seeds.

    python -m benchmarks.results_ustad                     # train every run (minutes of CPU each), write all
    python -m benchmarks.results_ustad --tables-only       # regenerate the tables and figure from raw.json
    python -m benchmarks.results_ustad --seeds 0 1 2 3     # more seeds (finished run directories are reused)
    python -m benchmarks.results_ustad --jobs 2            # two recipe runs at a time (one thread each)

Runs (``python -m recipes.ustad``, one thread each, in ``runs/results_ustad/<run>-seed<s>/``): the untrained
all-MiniLM-L6-v2 teacher (zero-shot, deterministic: one run), the USTAD teacher (one encoder) with its distilled
asymmetric student and the same student without the teacher (``stage=distill``), and separate CE + DE encoders
(``teacher.model=separate``), each for every seed; then both students again with a 10x longer schedule
(``train.student_epochs=10``) from each seed's USTAD teacher (``distill.teacher_checkpoint``, not retrained). The
setting is the default preset's with a smaller training set (``SETTING``): 20 steps of 16 queries instead of 40,
so that 3 seeds fit a CPU budget. Writes
``docs/results/ustad/raw.json`` (per-run test metrics, commands, commit, machine and load) and, from that file alone,
``docs/results/ustad/table.md``, ``table_students.md`` and ``docs/img/ustad_mrr.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._common import git_output, run_recipe_dir, save_figure, write_tables
from benchmarks._common import results_machine as machine
from lit_cascades.effects import mean_std, paired_differences, paired_interval
from lit_cascades.effects import seed_verdict as verdict

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "ustad"
RUNS = ROOT / "runs" / "results_ustad"
RECIPE = "recipes.ustad"
SEEDS = [0, 1, 2]
#: the reported setting: the default preset with 320 training queries (20 steps), no per-epoch validation
SETTING = ["data.max_train_queries=320", "trainer.limit_val_batches=0", "logger.wandb=false",
           "trainer.enable_progress_bar=false"]
RUNS_PER_SEED = {"ustad": ["stage=distill"], "separate": ["teacher.model=separate"]}
#: the same students trained 10x longer (200 steps) from each seed's finished USTAD teacher (loaded, not retrained)
STUDENT_EPOCHS_LONG = 10
LONG_STUDENTS = "students_long"
#: student rows of table_students: (run, schedule)
STUDENT_RUNS = (("ustad", "1 epoch (20 steps)"), (LONG_STUDENTS, f"{STUDENT_EPOCHS_LONG} epochs (200 steps)"))
ZERO_SHOT = ["train.epochs=0"]
METRICS = ("mrr@10", "recall@1", "recall@10", "recall@100")


def collect(out: Path) -> dict[str, Any]:
    """The stage results of one run directory (``teacher``, ``student``, ``student_no_teacher``), read from each
    stage's metrics.json, so a run whose teacher finished but whose students did not still reports its teacher."""
    keep = {}
    for part in ("teacher", "student", "student_no_teacher"):
        path = out / part / "metrics.json"
        if path.exists():
            keep[part] = json.loads(path.read_text())
    return keep


def _vals(raw: dict[str, Any], run: str, part: str, scorer: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][part][scorer][metric] for r in raw["runs"] if r["run"] == run}


def _fmt(values: dict[int, float]) -> str:
    return mean_std(list(values.values())) if len(values) > 1 else f"{next(iter(values.values())):.3f}"


def table_teachers(raw: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in raw["runs"] if r["run"] == "ustad"})
    data = raw["data"]
    lines = [f"Test: {data['n_test_queries']} queries against the whole test corpus ({data['n_test_docs']} functions), "
             f"CE reranking of the DE top 10. Mean ± sample std over seeds {seeds} (the seed sets batch order and "
             "sampled negatives; every encoder starts from the same pretrained weights). Zero-shot is deterministic "
             "(one run).", "",
             "| model | params | n | DE MRR@10 | DE R@1 | DE R@10 | DE R@100 | DE+CE MRR@10 | DE+CE R@1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run, name in (("zero_shot", "MiniLM, no training (zero-shot)"), ("ustad", "**USTAD** (one encoder)"),
                      ("separate", "separate CE + DE encoders")):
        rows = [r for r in raw["runs"] if r["run"] == run]
        if not rows:
            continue
        params = rows[0]["metrics"]["teacher"]["params"]["total"] / 1e6
        cells = [_fmt(_vals(raw, run, "teacher", "de", m)) for m in METRICS]
        cells += [_fmt(_vals(raw, run, "teacher", "rerank", m)) for m in ("mrr@10", "recall@1")]
        lines.append(f"| {name} | {params:.1f}M | {len(rows)} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed (USTAD − separate); verdict: *beyond seed spread* when all seeds agree in sign and "
              "|mean Δ| > 2 × std of Δ, else *noise*; 95% interval of the mean Δ: Student t over the seeds.", "",
              "| metric | Δ mean ± std | per seed | verdict | 95% interval |", "|---|---:|---|---|---:|"]
    for scorer, metric, name in (("de", "mrr@10", "DE MRR@10"), ("de", "recall@1", "DE R@1"),
                                 ("rerank", "mrr@10", "DE+CE MRR@10"), ("rerank", "recall@1", "DE+CE R@1")):
        a, b = _vals(raw, "ustad", "teacher", scorer, metric), _vals(raw, "separate", "teacher", scorer, metric)
        d = paired_differences(a, b)
        mean = mean_std(d) if len(d) > 1 else f"{d[0]:+.3f} (one seed)"
        lines.append(f"| {name} | {mean} | {' / '.join(f'{x:+.3f}' for x in d)} | {verdict(d)} | "
                     f"{paired_interval(d)} |")
    return "\n".join(lines) + "\n"


def table_students(raw: dict[str, Any]) -> str:
    rows = [r for r in raw["runs"] if r["run"] == "ustad" and "student" in r["metrics"]]
    seeds = sorted(r["seed"] for r in rows)
    st = rows[0]["metrics"]["student"]
    lines = [f"Asymmetric students of the USTAD teachers above (one per seed): the teacher's embeddings + first layer, "
             f"embeddings frozen ({st['params']['trainable'] / 1e6:.2f}M trainable, "
             f"{st['online_params']['total'] / 1e6:.1f}M online query encoder), against the teacher's frozen document "
             f"tower; lr 2e-4, `distill_scores=both`, `emb_distance=mse`, α = β = γ = 1. Mean ± sample std over seeds "
             f"{seeds}; retention = student DE MRR@10 / its teacher's DE MRR@10.", "",
             "| student | schedule | n | DE MRR@10 | R@1 | R@10 | R@100 | retention of teacher MRR@10 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    teacher = _vals(raw, "ustad", "teacher", "de", "mrr@10")
    verdicts = []
    for run, schedule in STUDENT_RUNS:
        if not any(r["run"] == run and "student" in r["metrics"] for r in raw["runs"]):
            continue
        for part, name in (("student", "distilled"), ("student_no_teacher", "no teacher (α = β = 0)")):
            cells = [_fmt(_vals(raw, run, part, "de", m)) for m in METRICS]
            mrr = _vals(raw, run, part, "de", "mrr@10")
            ret = [mrr[s] / teacher[s] for s in sorted(mrr)]
            lines.append(f"| {name} | {schedule} | {len(mrr)} | " + " | ".join(cells)
                         + f" | {mean_std([100 * x for x in ret], 1)}% |")
        a, b = _vals(raw, run, "student", "de", "mrr@10"), _vals(raw, run, "student_no_teacher", "de", "mrr@10")
        d = paired_differences(a, b)
        verdicts.append(f"{schedule}: {mean_std(d)} ({' / '.join(f'{x:+.3f}' for x in d)}), {verdict(d)}")
    lines += ["", "Distilled − no teacher, DE MRR@10 paired by seed: " + "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{file name: markdown}`` computed from the raw results alone."""
    out = {"table.md": table_teachers(raw)}
    if any("student" in r["metrics"] for r in raw["runs"]):
        out["table_students.md"] = table_students(raw)
    return out


def figure(raw: dict[str, Any]) -> Any:
    from lit_cascades.plotting import new_axes

    bars = [("USTAD\n(one encoder)", "ustad", "teacher"), ("separate\nCE + DE", "separate", "teacher"),
            ("student,\ndistilled,\n1 epoch", "ustad", "student"),
            ("student,\nno teacher,\n1 epoch", "ustad", "student_no_teacher"),
            (f"student,\ndistilled,\n{STUDENT_EPOCHS_LONG} epochs", LONG_STUDENTS, "student"),
            (f"student,\nno teacher,\n{STUDENT_EPOCHS_LONG} epochs", LONG_STUDENTS, "student_no_teacher")]
    bars = [b for b in bars if any(r["run"] == b[1] and b[2] in r["metrics"] for r in raw["runs"])]
    fig, ax = new_axes(figsize=(8.5, 4.6))
    n = len({r["seed"] for r in raw["runs"] if r["run"] == "ustad"})
    for j, (scorer, color, label) in enumerate((("de", "tab:blue", "DE retrieval"),
                                                ("rerank", "tab:orange", "DE top-10 + CE rerank"))):
        xs, means, stds = [], [], []
        for i, (_, run, part) in enumerate(bars):
            vals = [r["metrics"][part][scorer]["mrr@10"] for r in raw["runs"]
                    if r["run"] == run and part in r["metrics"] and scorer in r["metrics"][part]]
            if not vals:
                continue
            x = i + (j - 0.5) * 0.38
            xs.append(x)
            means.append(statistics.fmean(vals))
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
        ax.bar(xs, means, 0.36, yerr=stds, capsize=3, color=color, label=f"{label} (mean ± std, {n} seed{'s' if n != 1 else ''})")
    zs = [r["metrics"]["teacher"]["de"]["mrr@10"] for r in raw["runs"] if r["run"] == "zero_shot"]
    if zs:
        ax.axhline(zs[0], color="0.3", ls="--", lw=1, label=f"zero-shot MiniLM, DE ({zs[0]:.3f})")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("test MRR@10")
    ax.set_ylim(0, 1.0)
    students = ", and distilled students" if any(b[2] != "teacher" for b in bars) else ""
    ax.set_title(f"USTAD on stdlib code search: one encoder vs separate CE + DE{students}\n"
                 "(dots: individual seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def write_outputs(raw: dict[str, Any]) -> None:
    write_tables(OUT, tables(raw))
    print(f"wrote {save_figure(figure(raw), 'ustad_mrr.png', dpi=130).relative_to(ROOT)}")


def one_run(name: str, seed: int, extra: list[str], rerun: bool) -> dict[str, Any]:
    """Run (or reuse) ``runs/results_ustad/<name>-seed<seed>``; its command, timing and stage metrics."""
    out = RUNS / f"{name}-seed{seed}"
    print(f"[results_ustad] {name} seed {seed}", flush=True)
    overrides = [*extra, f"seed={seed}", *SETTING]
    if (out / "teacher" / "metrics.json").exists() and not (out / "metrics.json").exists() and not rerun:
        # stopped after its teacher stage (the students did not fit the CPU budget): report the teacher only
        info = {"command": " ".join(["python", "-m", RECIPE, *overrides, f"output_dir={out.relative_to(ROOT)}"]),
                "partial": "stopped after the teacher stage; students not run",
                "teacher_wall_seconds": round((out / "teacher" / "metrics.json").stat().st_mtime - datetime.fromisoformat(
                    json.loads((out / "run.json").read_text())["created"]).timestamp(), 1),
                "wall_seconds_source": "run.json 'created' to the mtime of teacher/metrics.json",
                "run_git_commit": json.loads((out / "run.json").read_text()).get("git_commit")}
    else:
        info = run_recipe_dir(RECIPE, overrides, out, rerun)
    return {"run": name, "seed": seed, **info, "metrics": collect(out)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables-only", action="store_true", help="regenerate tables and figure from raw.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    ap.add_argument("--rerun", action="store_true", help="train again even when a finished run directory exists")
    ap.add_argument("--jobs", type=int, default=1, help="recipe runs at a time (one thread each)")
    args = ap.parse_args(argv)
    raw_path = OUT / "raw.json"
    if args.tables_only:
        write_outputs(json.loads(raw_path.read_text()))
        return
    plan = [("zero_shot", 0, ZERO_SHOT)] + [(name, s, extra) for s in args.seeds for name, extra in RUNS_PER_SEED.items()]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own one-thread process
        runs = list(pool.map(lambda item: one_run(*item, rerun=args.rerun), plan))
        # then the longer student schedule, from each seed's finished USTAD teacher
        teachers = {s: RUNS / f"ustad-seed{s}" / "teacher" / "model.pt" for s in args.seeds}
        long = [(LONG_STUDENTS, s, ["stage=distill", f"train.student_epochs={STUDENT_EPOCHS_LONG}",
                                    f"distill.teacher_checkpoint={ckpt.relative_to(ROOT)}"])
                for s, ckpt in teachers.items() if ckpt.exists()]
        runs += list(pool.map(lambda item: one_run(*item, rerun=args.rerun), long))
    data = next((json.loads((RUNS / f"{r['run']}-seed{r['seed']}" / "metrics.json").read_text())["data"]
                 for r in runs if "partial" not in r), None)
    raw = {"command": "python -m benchmarks.results_ustad" + (f" --seeds {' '.join(map(str, args.seeds))}"
                                                              if args.seeds != SEEDS else "")
                      + (f" --jobs {args.jobs}" if args.jobs != 1 else ""),
           "commit": git_output("rev-parse", "HEAD"),
           "dirty": bool(git_output("status", "--porcelain", "--", "lit_cascades", "recipes")),
           "seeds": args.seeds, "setting": SETTING, "machine": machine(), "data": data, "jobs": args.jobs,
           "note": f"one thread per run, {args.jobs} run(s) at a time, on a 2-core machine (see loadavg per run)",
           "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    write_outputs(raw)


if __name__ == "__main__":
    main()
