"""Results of docs/salt.md (Rawat et al., *A Little Help Goes a Long Way: Efficient LLM Training by Leveraging
Small LMs*, arXiv:2410.18779) on the embedded stdlib corpus, over several seeds.

    python -m benchmarks.results_salt                  # 8 seeds of the default preset (~3 CPU minutes each), all outputs
    python -m benchmarks.results_salt --jobs 2         # two seeds at a time (2 cores)
    python -m benchmarks.results_salt --tables-only    # regenerate table.md and the figure from raw.json
    python -m benchmarks.results_salt --seeds 0 1 2    # fewer or other seeds (finished run directories are reused)

Each seed is one run of the recipe (``python -m recipes.salt seed=<s>``, one thread, in
``runs/results_salt/seed<s>/``): the teacher trained on the same data, then baseline, SALT, the KD-weight-0
control and SALT_DS on one batch stream. Writes ``docs/results/salt/raw.json`` (per seed: the recipe's
metrics.json parts the tables use, the command, wall and CPU seconds, load average; the git commit, machine and
setting) and, from that file alone, ``docs/results/salt/table.md`` and ``docs/img/salt_val_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks._common import IMG, git_output, write_tables
from benchmarks._common import results_machine as machine
from lit_cascades.effects import mean_std, paired_interval
from lit_cascades.effects import seed_verdict as verdict

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "salt"
RUNS = ROOT / "runs" / "results_salt"
RECIPE = "recipes.salt"
SEEDS = list(range(8))
#: the reported setting: the default preset as is (W&B off, no progress bars)
SETTING = ["logger.wandb=false", "trainer.enable_progress_bar=false"]
METHODS = ("baseline", "salt", "control", "salt_ds")
LABELS = {"baseline": "baseline (NTP only)", "salt": "SALT (KD, ω = {w})", "control": "control (KD weight 0)",
          "salt_ds": "SALT_DS (KD on selected data)"}
TIMEOUT_S = 3 * 3600


# ---------------------------------------------------------------------------------------------- running
def run_seed(seed: int, rerun: bool = False, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Run ``python -m recipes.salt seed=<seed>`` (one thread) unless its run directory holds a finished run;
    return the command, wall and CPU seconds (the child's own rusage) and the load average around it."""
    out = RUNS / f"seed{seed}"
    argv = [f"seed={seed}", *SETTING, f"output_dir={out.relative_to(ROOT)}"]
    info: dict[str, Any] = {"seed": seed, "command": " ".join(["python", "-m", RECIPE, *argv])}
    timing = out / "timing.json"
    if rerun or not (out / "metrics.json").exists():
        if out.exists():
            raise SystemExit(f"{out} exists without metrics.json (an interrupted run?): remove it or resume it with "
                             f"python -m {RECIPE} resume={out.relative_to(ROOT)}")
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        load_before, start = os.getloadavg(), time.time()
        log = open(RUNS / f"seed{seed}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", RECIPE, *argv], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        while True:  # os.wait4 gives this child's own CPU time (other runs may be going on in parallel)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - start > timeout_s:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                raise RuntimeError(f"{info['command']} ran past {timeout_s} s and was stopped")
            time.sleep(1.0)
        log.close()
        code = os.waitstatus_to_exitcode(status)
        if code:
            tail = (RUNS / f"seed{seed}.log").read_text()[-3000:]
            raise RuntimeError(f"{info['command']} failed (exit {code}):\n{tail}")
        timing.write_text(json.dumps({"wall_seconds": time.time() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}))
    info.update(json.loads(timing.read_text()) if timing.exists() else {})
    return info


def collect(metrics: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run's metrics.json that the tables and the figure use."""
    keep = ("kd_steps", "kd_weight", "curve", "final_val_loss", "steps_to_baseline_final", "train_seconds",
            "student_params", "student_non_embedding_params", "teacher_margin_in_kd_window", "stream_stage1",
            "stream_stage2", "selected", "pool", "train_sequences", "select_pool", "score_seconds")
    return {"teacher": metrics["teacher"], "non_embedding_ratio": metrics["non_embedding_ratio"],
            "train_steps": metrics["train_steps"], "kd_steps": metrics["kd_steps"],
            "student_module": metrics["student_module"], "select": metrics["select"],
            "methods": {m: {k: v for k, v in res.items() if k in keep} for m, res in metrics["methods"].items()}}


def run_all(seeds: list[int], jobs: int, rerun: bool) -> dict[str, Any]:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start, t0 = os.getloadavg(), time.time()
    reused = [s for s in seeds if not rerun and (RUNS / f"seed{s}" / "metrics.json").exists()]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        infos = list(pool.map(lambda s: run_seed(s, rerun), seeds))
    from omegaconf import OmegaConf

    runs = []
    for info in infos:
        metrics = json.loads((RUNS / f"seed{info['seed']}" / "metrics.json").read_text())
        cfg = OmegaConf.load(RUNS / f"seed{info['seed']}" / "config.yaml")
        arch = {k: f"{cfg[k].model.n_layer}×{cfg[k].model.n_embd}" for k in ("student", "teacher")}
        run_json = json.loads((RUNS / f"seed{info['seed']}" / "run.json").read_text())
        info["git_commit"] = run_json.get("git_commit")  # the code the run trained with
        runs.append({**info, "metrics": {**collect(metrics), "architecture": arch,
                                         "data": OmegaConf.to_container(cfg.data)}})
    config = (ROOT / "runs" / "results_salt" / f"seed{seeds[0]}" / "config.yaml")
    commit = git_output("rev-parse", "HEAD")
    return {"command": "python -m benchmarks.results_salt " + " ".join(sys.argv[1:]),
            "commit": commit, "git_commit": commit,
            "git_dirty": bool(git_output("status", "--porcelain", "--", "recipes/salt.py", "recipes/configs/salt",
                                         "lit_cascades")),
            "started_utc": started, "wall_seconds": time.time() - t0, "jobs": jobs,
            "reused_runs": reused,  # finished run directories collected again (their own timing is per run)
            "machine": machine(), "loadavg_start": list(load_start),
            "note": "other jobs ran at the same time (see each run's loadavg)",
            "seeds": seeds, "setting": SETTING, "config": config.read_text() if config.exists() else None,
            "runs": runs}


# ---------------------------------------------------------------------------------------------- tables
def _curve(run: dict[str, Any], method: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in run["metrics"]["methods"][method]["curve"]}


def table(raw: dict[str, Any]) -> str:
    runs = sorted(raw["runs"], key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    m0 = runs[0]["metrics"]
    steps, kd = m0["train_steps"], m0["kd_steps"]
    methods = [m for m in METHODS if all(m in r["metrics"]["methods"] for r in runs)]
    base = {r["seed"]: r["metrics"]["methods"]["baseline"]["final_val_loss"] for r in runs}
    omega = m0["student_module"].get("kd_weight")
    lines = [
        f"Validation loss (nats/token) after {steps} steps and steps to reach the baseline's final validation loss, "
        f"seeds {seeds} (n = {len(seeds)}; mean ± sample std over seeds; per-seed values in brackets). KD for "
        f"steps < {kd} ({100 * kd / steps:.0f}% of the steps). Δ = method − baseline final val loss, paired by seed; "
        "verdict: *beyond seed spread* when all seeds agree in sign and |mean Δ| > 2 × std of Δ, else *noise*; "
        "95% interval: Student-t interval of the mean paired Δ (how well the seeds pin down the mean effect; it "
        "does not change the verdict). Steps to reach: the first evaluated step with val loss ≤ that seed's baseline final (evaluations every "
        f"{_eval_every(runs[0])} steps; *not reached* within {steps}).",
        "",
        "| method | final val loss | Δ vs baseline | 95% interval of mean Δ | verdict | steps to baseline's final "
        "| per seed: final val loss / steps to reach |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        res = {r["seed"]: r["metrics"]["methods"][m] for r in runs}
        finals = [res[s]["final_val_loss"] for s in seeds]
        reach = [res[s].get("steps_to_baseline_final") for s in seeds]
        diffs = [res[s]["final_val_loss"] - base[s] for s in seeds]
        got = [x for x in reach if x is not None]
        if len(got) == len(reach):
            reach_txt = mean_std([float(x) for x in got], 0)
        else:
            reach_txt = f"not reached in {len(reach) - len(got)} of {len(reach)} seeds"
            if got:
                reach_txt += f" (others: {', '.join(str(x) for x in got)})"
        per_seed = ", ".join(f"{f:.3f} / {x if x is not None else '—'}" for f, x in zip(finals, reach))
        if m == "baseline":
            d_txt, ci_txt, v_txt = "—", "—", "—"
        else:
            d_txt = f"{statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.4f}"
            ci_txt = paired_interval(diffs)
            v_txt = verdict(diffs) if any(abs(d) > 0 for d in diffs) else "identical"
        name = LABELS[m].format(w=omega)
        lines.append(f"| {name} | {mean_std(finals)} | {d_txt} | {ci_txt} | {v_txt} | {reach_txt} | [{per_seed}] |")
    lines += ["", curve_table(runs, methods, omega)]
    t = [r["metrics"]["teacher"] for r in runs]
    student_ne = runs[0]["metrics"]["methods"]["baseline"]["student_non_embedding_params"]
    student_all = runs[0]["metrics"]["methods"]["baseline"]["student_params"]
    margins = {m: [r["metrics"]["methods"][m].get("teacher_margin_in_kd_window") for r in runs]
               for m in methods if m != "baseline"}
    lines += [
        "",
        f"Teacher: {t[0]['params']:,} parameters ({t[0]['non_embedding_params']:,} non-embedding) vs the student's "
        f"{student_all:,} ({student_ne:,} non-embedding): non-embedding ratio {m0['non_embedding_ratio']:.2f}; "
        f"trained {t[0].get('steps')} steps on the same data and stream, final val loss "
        f"{mean_std([x['final_val_loss'] for x in t])} (the teacher used for KD). Teacher better than the student at "
        "every evaluation inside the KD window — min over the window of (student − teacher val loss), per seed: "
        + "; ".join(f"{m} [{', '.join(f'{x:+.3f}' for x in v)}]" for m, v in margins.items() if None not in v)
        + ".",
        "",
        "Batch streams (fingerprints of the global batches of steps < KD end / ≥ KD end; one row per seed): "
        + "; ".join(_streams(r, methods) for r in runs) + ".",
        "",
        f"Cost: {_cost(raw)}",
    ]
    return "\n".join(lines) + "\n"


def curve_table(runs: list[dict[str, Any]], methods: list[str], omega: Any) -> str:
    """Mean validation loss over seeds at selected steps (every step of the KD window, then a few after)."""
    m0 = runs[0]["metrics"]
    kd, steps = m0["kd_steps"], m0["train_steps"]
    every = _eval_every(runs[0])
    common = sorted(set.intersection(*(set(_curve(r, "baseline")) for r in runs)))
    show = [s for s in common if s <= kd] + [s for s in common if s > kd and (s - kd) % max(every, (steps - kd) // 4)
                                             == 0 and s != steps] + [steps]
    show = sorted(set(show))
    head = "| method | " + " | ".join(f"step {s}" for s in show) + " |"
    lines = [f"Validation loss at evaluated steps, mean over the {len(runs)} seeds (KD window: steps ≤ {kd}; the teacher "
             "row is the trained teacher used for KD, a constant).", "", head,
             "|---|" + "---|" * len(show)]
    for m in methods:
        curves = [_curve(r, m) for r in runs]
        lines.append(f"| {LABELS[m].format(w=omega)} | "
                     + " | ".join(f"{statistics.fmean(c[s] for c in curves):.3f}" for s in show) + " |")
    tfinal = statistics.fmean(r["metrics"]["teacher"]["final_val_loss"] for r in runs)
    lines.append("| teacher (trained, used for KD) | " + " | ".join(f"{tfinal:.3f}" for _ in show) + " |")
    return "\n".join(lines)


def _eval_every(run: dict[str, Any]) -> int:
    steps = [s for s, _ in run["metrics"]["methods"]["baseline"]["curve"]]
    return steps[1] - steps[0] if len(steps) > 1 else steps[0]


def _streams(run: dict[str, Any], methods: list[str]) -> str:
    res = run["metrics"]["methods"]
    s1 = {m: res[m]["stream_stage1"] for m in methods}
    s2 = {m: res[m]["stream_stage2"] for m in methods}
    same1 = sorted(m for m in methods if s1[m] == s1["baseline"])
    same2 = sorted(m for m in methods if s2[m] == s2["baseline"])
    return (f"seed {run['seed']}: stage 1 identical to the baseline's for {', '.join(same1)}; stage 2 identical "
            f"for {', '.join(same2)}")


def _cost(raw: dict[str, Any]) -> str:
    runs = sorted(raw["runs"], key=lambda r: r["seed"])
    cpu = [r.get("cpu_seconds") for r in runs]
    wall = [r.get("wall_seconds") for r in runs]
    if None in cpu:
        return "not recorded."
    loads = [f"{r['loadavg_before'][0]:.1f}→{r['loadavg_after'][0]:.1f}" for r in runs]
    return (f"{sum(cpu) / 60:.1f} CPU minutes for the {len(runs)} seeds ({', '.join(f'{c / 60:.1f}' for c in cpu)} per "
            f"seed: teacher + 4 methods, one thread each); wall {', '.join(f'{w / 60:.1f}' for w in wall)} min per seed "
            f"with {raw.get('jobs', 1)} run(s) at a time on the shared 2-core machine (1-min load average before→after "
            f"each run: {', '.join(loads)}; {raw.get('note', 'other jobs were running')}).")


# ---------------------------------------------------------------------------------------------- figure
def figure(raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(raw["runs"], key=lambda r: r["seed"])
    m0 = runs[0]["metrics"]
    kd, omega = m0["kd_steps"], m0["student_module"].get("kd_weight")
    methods = [m for m in METHODS if all(m in r["metrics"]["methods"] for r in runs)]
    colors = {"baseline": "tab:blue", "salt": "tab:red", "control": "tab:green", "salt_ds": "tab:purple"}
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in methods:
        curves = [_curve(r, m) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        vals = [[c[s] for c in curves] for s in steps]
        mean = [statistics.fmean(v) for v in vals]
        # the control coincides with the baseline when the stream is shared: drawn dashed on a thicker baseline
        style = {"linestyle": (0, (4, 3)), "linewidth": 1.3, "zorder": 4} if m == "control" else {
            "linewidth": 3.0 if m == "baseline" else 1.6}
        ax.plot(steps, mean, color=colors[m], label=LABELS[m].format(w=omega), **style)
        if m != "control" or any(_curve(r, m) != _curve(r, "baseline") for r in runs):
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=colors[m], alpha=0.18)
        if m != "baseline":
            base = [_curve(r, "baseline") for r in runs]
            diffs = [[c[s] - b[s] for c, b in zip(curves, base)] for s in steps]
            ax_d.plot(steps, [statistics.fmean(d) for d in diffs], color=colors[m], label=LABELS[m].format(w=omega),
                      **{**style, "linewidth": 1.6 if m != "control" else 1.3})
            ax_d.fill_between(steps, [min(d) for d in diffs], [max(d) for d in diffs], color=colors[m], alpha=0.18)
    tcurves = [{int(s): v for s, v in r["metrics"]["teacher"]["curve"]} for r in runs]
    tsteps = sorted(set.intersection(*(set(c) for c in tcurves)))
    ax.plot(tsteps, [statistics.fmean(c[s] for c in tcurves) for s in tsteps], color="black", linewidth=1,
            linestyle=":", label="teacher, during its own training")
    tfinal = [r["metrics"]["teacher"]["final_val_loss"] for r in runs]
    ax.axhline(statistics.fmean(tfinal), color="black", linewidth=1, linestyle="-.",
               label="teacher used for KD (final)")
    for a in (ax, ax_d):
        a.axvspan(0, kd, color="gray", alpha=0.12, label=f"KD window (steps < {kd})" if a is ax else None)
        a.set_xlabel("optimizer step")
    allvals = [v for r in runs for m in methods for v in _curve(r, m).values()]
    ax.set_ylim(min(allvals + tfinal) - 0.1, sorted(allvals)[int(0.97 * (len(allvals) - 1))] + 0.2)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss vs step")
    ax.legend(loc="upper right", fontsize=8)
    ax_d.axhline(0.0, color="tab:blue", linewidth=1)
    ax_d.set_ylabel("val loss − baseline's, same seed (nats/token)")
    ax_d.set_title("Difference to the baseline (paired by seed)")
    ax_d.legend(loc="upper right", fontsize=8)
    n = len(runs)
    arch = m0.get("architecture", {"student": "?", "teacher": "?"})
    fig.suptitle(f"SALT on the stdlib corpus: student {arch['student']}, teacher {arch['teacher']}, "
                 f"{m0['train_steps']} steps, KD for the first {kd}; "
                 f"lines: mean over {n} seeds, bands: min–max over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tables(raw: dict[str, Any]) -> dict[str, str]:
    """``{file name in docs/results/salt: its text}``, made from ``raw`` alone."""
    return {"table.md": table(raw)}


def write_outputs(raw: dict[str, Any]) -> None:
    write_tables(OUT, tables(raw))
    figure(raw, IMG / "salt_val_loss.png")
    print(f"wrote {(IMG / 'salt_val_loss.png').relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--jobs", type=int, default=1, help="recipe runs at a time (one thread each)")
    p.add_argument("--rerun", action="store_true", help="run again even where a finished run directory exists")
    p.add_argument("--tables-only", action="store_true", help="regenerate table.md and the figure from raw.json")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        raw = json.loads((OUT / "raw.json").read_text())
    else:
        raw = run_all(args.seeds, args.jobs, args.rerun)
        (OUT / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")
    write_outputs(raw)


if __name__ == "__main__":
    main()
