"""Rerun published benchmarks and record which of their figures reproduce.

    python -m benchmarks.reproduce gatekeeper_step salt_step   # rerun, compare, record, regenerate the table
    python -m benchmarks.reproduce --table                     # regenerate the table from the recorded reruns
    python -m benchmarks.reproduce --check                     # exit 1 if the table is out of date
    python -m benchmarks.reproduce speculative --command "python -m benchmarks.speculative ..."  # another run

A rerun runs the published file's own command (the ``"command"`` field of
``docs/results/benchmarks/<name>.json``; for a file merged from several runs that is the last one, and
``--command`` names another, e.g. one of the commands in ``speculative.json``'s ``results.runs``) in a child process whose ``LIT_CASCADES_BENCHMARK_DIR`` is a temporary
directory, so the published files stay as they are. When it succeeds, its raw output is kept as
``docs/results/benchmarks/reruns/<name>-<UTC start time>.json`` with a ``"reproduction"`` section: the published run
it was compared with (start time, commit) and, for every figure both runs hold, both values. A figure is an entry
with a median and its min–max: a target row (named by its ``"what"``), a timing or memory ratio, a throughput. A
figure **reproduces** when the rerun's median lies inside the published run's min–max widened by
``TOLERANCE`` (1%) of the published median: the published spread is that of one run's alternations or repeats,
and memory repeats agree to a few KiB, closer than separate runs can be held to. A target's verdict (median within
the target) is compared as well. Figures only one side holds (parts of a merged file that the command did not run)
are left out.

The table ``docs/results/benchmarks/reproduction.md`` lists every recorded rerun, one row per figure, generated from
the files in ``reruns/`` that carry a ``"reproduction"`` section; earlier raw files there without one are kept as
raw output only. Run reruns with nothing else on the machine: the published timing figures were measured that way.
A failed or timed-out rerun writes nothing and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common

#: widening of the published min–max, as a fraction of the published median (see the module docstring)
TOLERANCE = 0.01
TABLE = "reproduction.md"


def figures(payload: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The figures of a benchmark's JSON: ``name -> {"median", "min", "max"[, "target"]}``.

    Target rows are named by their ``"what"`` and keep their ``"target"``; every other ``{"median", "min", "max"}``
    entry is named by its key path (``results/mlp_digits_b64/ratios/gatekeeper``) unless it repeats the three
    values of a target row or of an entry met before it.
    """
    out: dict[str, dict[str, float]] = {}
    seen: set[tuple[float, float, float]] = set()
    for row in payload.get("targets", []):
        out[row["what"]] = {k: float(row[k]) for k in ("median", "min", "max", "target")}
        seen.add((float(row["median"]), float(row["min"]), float(row["max"])))

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            if {"median", "min", "max"} <= obj.keys() and all(
                    isinstance(obj[k], (int, float)) for k in ("median", "min", "max")):
                triple = (float(obj["median"]), float(obj["min"]), float(obj["max"]))
                if triple not in seen:  # the same figure stored twice (under two names) is listed once
                    out[path] = dict(zip(("median", "min", "max"), triple))
                    seen.add(triple)
                return
            for key, value in obj.items():
                if key != "targets":
                    walk(value, f"{path}/{key}" if path else str(key))

    walk(payload, "")
    return out


def reproduces(published: dict[str, float], rerun: dict[str, float], tolerance: float = TOLERANCE) -> bool:
    """Whether ``rerun["median"]`` lies in ``[published min, max]`` widened by ``tolerance · |published median|``."""
    slack = tolerance * abs(published["median"])
    return published["min"] - slack <= rerun["median"] <= published["max"] + slack


def compare(published: dict[str, Any], rerun: dict[str, Any], tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """One row per figure both payloads hold: both values, ``reproduces`` and, for targets, both verdicts."""
    pub, new = figures(published), figures(rerun)
    rows = []
    for name, p in pub.items():
        if name not in new:
            continue
        r = new[name]
        row: dict[str, Any] = {"figure": name, "published": p, "rerun": r, "reproduces": reproduces(p, r, tolerance)}
        if "target" in p:
            row["verdict_published"] = p["median"] <= p["target"]
            row["verdict_rerun"] = r["median"] <= p["target"]
        rows.append(row)
    return rows


def published_command(name: str, payload: dict[str, Any]) -> list[str]:
    """The argv after ``python`` of a published file's command: ``["-m", "<module>", *args]``.

    Raises:
        ValueError: the file records no command, or not one of the form ``python -m <module> ...``.
    """
    command = payload.get("command")
    if not command:
        raise ValueError(f"{name}.json records no command (written without benchmarks._common.Run): rerun it by hand")
    argv = shlex.split(command)
    if len(argv) < 3 or argv[0] != "python" or argv[1] != "-m":
        raise ValueError(f"{name}.json: expected a command 'python -m <module> ...'; got {command!r}")
    return argv[1:]


def rerun(name: str, published_dir: Path | None = None, reruns_dir: Path | None = None,
          timeout_s: float = 3600.0, tolerance: float = TOLERANCE, command: str | None = None) -> Path:
    """Rerun benchmark ``name`` with its published command; record and return the rerun file (see module docstring).

    ``command`` replaces the recorded command (``python -m benchmarks.<name> ...``): for a file merged from several
    runs (``speculative``, ``serve``), whose recorded command is only the last of them, name the run to repeat;
    the comparison covers the figures both files hold.

    Raises:
        FileNotFoundError: no published ``<name>.json``.
        ValueError: the published file records no usable command.
        RuntimeError: the rerun failed, timed out or wrote no ``<name>.json`` (its output's tail in the message);
            nothing is recorded then.
    """
    published_dir = published_dir or _common.PUBLISHED
    reruns_dir = reruns_dir or published_dir / "reruns"
    path = published_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no published results for {name!r}: {path} does not exist")
    published = json.loads(path.read_text())
    argv = published_command(name, {"command": command} if command else published)
    with tempfile.TemporaryDirectory(prefix=f"rerun-{name}-") as tmp:
        env = {**os.environ, "LIT_CASCADES_BENCHMARK_DIR": tmp,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(_common.ROOT), os.environ.get("PYTHONPATH")]))}
        log = Path(tmp) / "output.log"
        t0 = time.perf_counter()
        with log.open("w") as fh:
            try:
                proc = subprocess.run([sys.executable, *argv], cwd=_common.ROOT, env=env, stdout=fh,
                                      stderr=subprocess.STDOUT, timeout=timeout_s)
                failure = f"exit status {proc.returncode}" if proc.returncode else None
            except subprocess.TimeoutExpired:
                failure = f"no result within {timeout_s:.0f} s"
        out = Path(tmp) / f"{name}.json"
        if failure is None and not out.is_file():
            failure = f"it wrote no {name}.json"
        if failure:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"rerun of {name} ({' '.join(['python', *argv])}) failed: {failure}\n{tail}")
        payload = json.loads(out.read_text())
    rows = compare(published, payload, tolerance)
    payload["reproduction"] = {
        "published": {"file": str(path.relative_to(_common.ROOT)) if path.is_relative_to(_common.ROOT) else str(path),
                      "started_utc": published.get("started_utc"), "git_commit": published.get("git_commit")},
        "command": " ".join(["python", *argv]), "tolerance": tolerance, "rerun_wall_s": time.perf_counter() - t0, "figures": rows,
    }
    stamp = (payload.get("started_utc") or time.strftime("%Y-%m-%dT%H:%M:%S")).split("+")[0]
    reruns_dir.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{stamp.replace('-', '').replace(':', '')}"
    dest, n = reruns_dir / f"{base}.json", 1
    while dest.exists():  # two reruns started in the same second
        n += 1
        dest = reruns_dir / f"{base}-{n}.json"
    part = dest.with_suffix(".json.part")
    part.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    part.replace(dest)
    return dest


def _fmt(fig: dict[str, float]) -> str:
    digits = 3 if abs(fig["median"]) < 100 else 1
    return f"{fig['median']:.{digits}f} ({fig['min']:.{digits}f}–{fig['max']:.{digits}f})"


def render(reruns_dir: Path | None = None) -> str:
    """The reproduction table (Markdown) of every rerun file in ``reruns_dir`` that carries a comparison."""
    reruns_dir = reruns_dir or _common.PUBLISHED / "reruns"
    lines = ["| benchmark | figure | published median (min–max) | rerun median (min–max) | reproduces | "
             "target verdict (published → rerun) | rerun started (UTC), load avg |",
             "|---|---|---|---|---|---|---|"]
    counts = [0, 0]
    superseded = False
    current_start: dict[str, str | None] = {}  # benchmark -> start time of its published run (None: no file)
    for path in sorted(reruns_dir.glob("*.json")):
        payload = json.loads(path.read_text())
        rep = payload.get("reproduction")
        if not rep:
            continue
        when = f"{(payload.get('started_utc') or '?').split('+')[0]}, {_common.load_text(payload)}"
        name = payload["benchmark"]
        if name not in current_start:
            current = reruns_dir.parent / f"{name}.json"
            current_start[name] = json.loads(current.read_text()).get("started_utc") if current.exists() else None
        old = current_start[name] is not None and current_start[name] != rep["published"].get("started_utc")
        superseded |= old
        mark = " †" if old else ""
        for row in rep["figures"]:
            counts[0] += row["reproduces"]
            counts[1] += 1
            verdict = ""
            if "verdict_published" in row:
                verdict = " → ".join("meets" if v else "misses" for v in (row["verdict_published"],
                                                                           row["verdict_rerun"]))
            lines.append(f"| `{payload['benchmark']}` | {row['figure']} | {_fmt(row['published'])}{mark} | "
                         f"{_fmt(row['rerun'])} | {'yes' if row['reproduces'] else '**no**'} | {verdict} | {when} |")
    pct = f"{counts[0]} of {counts[1]}" if counts[1] else "none"
    note = (" † the published run this rerun was compared with has since been replaced by a newer one (its figures "
            "are in the benchmark's JSON and the table above).") if superseded else ""
    return ("\n".join(lines) + f"\n\nFigures that reproduce: {pct}.{note} A figure reproduces when the rerun's median lies "
            f"inside the published run's min–max widened by {TOLERANCE:.0%} of the published median. Raw reruns: "
            "`docs/results/benchmarks/reruns/`; regenerate with `python -m benchmarks.reproduce --table`.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to rerun (names of docs/results/benchmarks/*.json)")
    parser.add_argument("--table", action="store_true", help="only regenerate the table")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is out of date")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per rerun")
    parser.add_argument("--command", default=None,
                        help="the command to rerun instead of the recorded one (one benchmark name only)")
    args = parser.parse_args(argv)
    table = _common.PUBLISHED / TABLE
    if args.check:
        if not table.is_file() or table.read_text() != render():
            print(f"{table} is out of date: run python -m benchmarks.reproduce --table", file=sys.stderr)
            return 1
        return 0
    if not args.names and not args.table:
        parser.error("name the benchmarks to rerun, or pass --table / --check")
    if args.command and len(args.names) != 1:
        parser.error(f"--command needs exactly one benchmark name; got {len(args.names)}")
    status = 0
    for name in args.names:
        try:
            dest = rerun(name, timeout_s=args.timeout, command=args.command)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        rows = json.loads(dest.read_text())["reproduction"]["figures"]
        print(f"{name}: {sum(r['reproduces'] for r in rows)} of {len(rows)} figures reproduce ({dest})")
        for r in rows:
            print(f"  {'yes' if r['reproduces'] else 'NO '}  {r['figure']}: published {_fmt(r['published'])}, "
                  f"rerun {_fmt(r['rerun'])}")
    table.write_text(render())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
