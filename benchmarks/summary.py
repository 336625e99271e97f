"""The performance-target table, generated from the benchmarks' raw JSON files.

    python -m benchmarks.summary            # docs/results/benchmarks/*.json -> docs/results/benchmarks/table.md
    python -m benchmarks.summary --check    # exit 1 if table.md differs from what the JSON files give

Each benchmark in ``ORDER`` that has a target writes rows ``{"what", "unit", "target", "median", "min", "max", "pass"}``
under ``"targets"`` in its JSON (``benchmarks._common.target_row``); this module only formats them, with the
run's load average (the machine is shared) and torch threads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import _common

#: the benchmarks this table covers, in this order (speculative decoding and serving have their own tables)
ORDER = ("gatekeeper_step", "deferral_metrics", "ustad_step", "taskformer_step", "gatekeeper_lm_step", "salt_step")


def load_results(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """``name -> payload`` of the ``ORDER`` benchmarks' JSON files in ``directory`` (default: the results folder)."""
    directory = directory or _common.RESULTS
    return {name: json.loads((directory / f"{name}.json").read_text()) for name in ORDER
            if (directory / f"{name}.json").exists()}


def cpu_name(payload: dict[str, Any]) -> str:
    """The CPU a benchmark ran on, short (``"Intel(R) Xeon(R) Processor"`` -> ``"Intel Xeon"``)."""
    cpu = str(payload.get("machine", {}).get("cpu") or "n/a")
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        cpu = cpu.replace(noise, "")
    return " ".join(cpu.split())


def render(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of every target row, the benchmarks in ``ORDER`` first."""
    names = [n for n in ORDER if n in results] + sorted(n for n in results if n not in ORDER)
    lines = ["| benchmark | measured ratio | target | median | min–max | pass | alternations / repeats "
             "| load avg (1 min, start → end) | CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        payload = results[name]
        for row in payload.get("targets", []):
            reps = _count(payload, row)
            what = row["what"] + (f" ({payload['encoder']} encoder)" if "encoder" in payload else "")
            lines.append(f"| `{name}` | {what} | ≤ {row['target']:.2f} | {row['median']:.3f} | "
                         f"{row['min']:.3f}–{row['max']:.3f} | {'yes' if row['pass'] else '**no**'} | {reps} | "
                         f"{_common.load_text(payload)} | {cpu_name(payload)} |")
    machines = {(p["machine"].get("cpu"), p["machine"].get("torch")) for p in results.values()
                if p.get("targets") and "machine" in p}
    threads = sorted({p.get("torch_threads", p.get("machine", {}).get("torch_threads")) for p in results.values()
                      if p.get("targets")} - {None})
    lines += ["", "Ratios are per-alternation (timing) or per-repeat (memory) ratios of the two sides measured in one "
              "run, interleaved after warm-up; torch threads: " + ", ".join(map(str, threads)) + "; machine: "
              + "; ".join(f"{cpu}, torch {torch}" for cpu, torch in sorted(machines, key=str))
              + " (a ratio compares two sides on one machine; the CPU column says which)"
              + ". Raw times are in `docs/results/benchmarks/<benchmark>.json`; regenerate this table with "
              "`python -m benchmarks.summary`."]
    return "\n".join(lines) + "\n"


def _count(payload: dict[str, Any], row: dict[str, Any]) -> int | str:
    if row.get("unit") == "memory":
        return len(payload.get("memory_ratio", {}).get("per_repeat", [])) or "n/a"
    found = _find_alternations(payload)
    return found if found is not None else "n/a"


def _find_alternations(obj: Any) -> int | None:
    if isinstance(obj, dict):
        if "alternations" in obj and isinstance(obj["alternations"], int) and "ratios" in obj:
            return obj["alternations"]
        for v in obj.values():
            found = _find_alternations(v)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if table.md is out of date")
    args = parser.parse_args(argv)
    text = render(load_results())
    path = _common.RESULTS / "table.md"
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run python -m benchmarks.summary", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
