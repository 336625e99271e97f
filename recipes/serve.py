"""Serve a cascade over HTTP (LitServe): calibrate a trained run's cascade, or load a saved one, and serve it.

    python -m recipes.serve run=runs/gatekeeper/x target_rate=0.2                 # Clopper–Pearson, 95%
    python -m recipes.serve run=runs/gatekeeper/x target_rate=0.2 method=conformal save=deploy/digits serve=false
    python -m recipes.serve cascade=deploy/digits port=8000 max_batch_size=32 batch_timeout=0.01

With ``run=<run dir>`` (a ``gatekeeper`` recipe run) the cascade is built by ``Cascade.from_run`` and calibrated
on the run's held-out ``split`` (default ``val``: its rows fit no weights) so that the deferral rate stays at or
below ``target_rate`` (``method`` = ``clopper_pearson`` (default; with ``confidence``), ``conformal`` or
``quantile``: docs/cascade.md says what each guarantees). The calibration report is printed; ``save=<dir>``
writes the calibrated cascade. With ``cascade=<dir>`` a saved cascade (a ``Cascade`` or a
``GenerationCascade``) is served at its saved threshold. An LM recipe run is calibrated in Python
(docs/cascade_lm.md), saved, and served with ``cascade=``.

The server binds 127.0.0.1 unless ``host=`` says otherwise: ``POST /predict``, ``GET /stats``, ``GET /health``
(docs/serving.md). Ctrl+C or SIGTERM stops it and its worker processes. A bad argument prints
``error: <key>: <message>`` and exits with status 2 before any work.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Only the standard library at module level: LitServe's spawned workers re-import this module (as __mp_main__),
# and lit_cascades.runner imports Lightning (tens of seconds of start-up per worker on a busy machine).

#: every key, its default and type (None: no default; the type is that of the example)
DEFAULTS: dict[str, Any] = {
    "run": None, "cascade": None, "target_rate": None, "method": "clopper_pearson", "confidence": None,
    "split": "val", "small_stage": "gatekeeper", "large_stage": "large", "batch_size": None,
    "save": None, "overwrite": False, "serve": True,
    "host": "127.0.0.1", "port": 8000, "max_batch_size": 16, "batch_timeout": 0.005, "max_rows": 256,
    "workers": 1, "accelerator": "auto",
}
TYPES: dict[str, type] = {"target_rate": float, "confidence": float, "batch_size": int, "overwrite": bool,
                          "serve": bool, "port": int, "max_batch_size": int, "batch_timeout": float,
                          "max_rows": int, "workers": int}
CALIBRATION_KEYS = ("target_rate", "method", "confidence", "split", "small_stage", "large_stage", "batch_size")
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds


def _convert(key: str, text: str) -> Any:
    from lit_cascades.runner.config import ConfigError

    kind = TYPES.get(key, str)
    if text.lower() in ("null", "none"):
        return None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"expected true or false; got {text!r}", key=key)
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"expected {'an integer' if kind is int else 'a number'}; got {text!r}", key=key) from None


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` items -> the settings, checked; a bad one is a ``ConfigError`` naming its key."""
    from lit_cascades.runner.config import ConfigError, split_argv

    given = split_argv(argv)
    for key in given:
        if key not in DEFAULTS:
            raise ConfigError(f"unknown key; valid keys: {', '.join(DEFAULTS)}", key=key)
    args = {**DEFAULTS, **{k: _convert(k, v) for k, v in given.items()}}
    if (args["run"] is None) == (args["cascade"] is None):
        raise ConfigError("give exactly one of run=<run dir> (calibrate and serve) or cascade=<saved dir>", key="run")
    if args["run"] is not None:
        if not (Path(args["run"]) / "config.yaml").is_file():
            raise ConfigError(f"no config.yaml in {args['run']}; expected a gatekeeper recipe run directory", key="run")
        from lit_cascades.cascade_lm import LM_RECIPES, recipe_of_run

        if recipe_of_run(args["run"]) in LM_RECIPES:
            raise ConfigError(f"a {recipe_of_run(args['run'])} run: calibrate its GenerationCascade on held-out "
                              "prompts in Python (docs/cascade_lm.md), save it, and serve it with cascade=<dir>",
                              key="run")
        if args["target_rate"] is None:
            raise ConfigError("required with run=: the deferral rate not to exceed, e.g. target_rate=0.2",
                              key="target_rate")
        if not 0.0 <= args["target_rate"] <= 1.0:
            raise ConfigError(f"expected a deferral rate in [0, 1]; got {args['target_rate']}", key="target_rate")
        from lit_cascades.cascade import METHODS

        if args["method"] not in METHODS:
            raise ConfigError(f"expected one of {list(METHODS)}; got {args['method']!r}", key="method")
        if args["method"] == "clopper_pearson":
            args["confidence"] = 0.95 if args["confidence"] is None else args["confidence"]
            if not 0.0 < args["confidence"] < 1.0:
                raise ConfigError(f"expected a level in (0, 1), e.g. 0.95; got {args['confidence']}", key="confidence")
        elif args["confidence"] is not None:
            raise ConfigError(f"only method=clopper_pearson takes a confidence level; method={args['method']}",
                              key="confidence")
        if args["split"] == "train":
            raise ConfigError("the models were fitted on 'train'; calibrate on held-out rows (val or test)",
                              key="split")
    else:
        if not (Path(args["cascade"]) / "cascade.json").is_file():
            raise ConfigError(f"no cascade.json in {args['cascade']}; expected a directory written by Cascade.save",
                              key="cascade")
        for key in (*CALIBRATION_KEYS, "save"):
            if key in given:
                raise ConfigError("applies to run=<run dir>; a saved cascade is served at its saved threshold",
                                  key=key)
    if args["save"] is not None and Path(args["save"]).is_dir() and any(Path(args["save"]).iterdir()) \
            and not args["overwrite"]:
        raise ConfigError(f"{args['save']} is not empty; add overwrite=true to replace it", key="save")
    if args["host"] not in HOSTS:
        raise ConfigError(f"expected one of {list(HOSTS)}; got {args['host']!r}", key="host")
    if not 1024 <= args["port"] <= 65535:
        raise ConfigError(f"expected a port in [1024, 65535]; got {args['port']}", key="port")
    for key in ("max_batch_size", "max_rows", "workers", *(("batch_size",) if args["batch_size"] else ())):
        if args[key] < 1:
            raise ConfigError(f"expected an integer >= 1; got {args[key]}", key=key)
    if args["batch_timeout"] < 0:
        raise ConfigError(f"expected seconds >= 0; got {args['batch_timeout']}", key="batch_timeout")
    if args["accelerator"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"expected auto, cpu or cuda; got {args['accelerator']!r}", key="accelerator")
    if not args["serve"] and args["save"] is None:
        raise ConfigError("serve=false does nothing without save=<dir>", key="serve")
    return args


def calibrated_cascade(args: dict[str, Any]) -> Any:
    """The run's cascade (``Cascade.from_run``), calibrated on the run's held-out ``split``."""
    from omegaconf import OmegaConf

    from lit_cascades.cascade import Cascade
    from lit_cascades.runner import ConfigError, build

    cfg = OmegaConf.load(Path(args["run"]) / "config.yaml")
    if OmegaConf.select(cfg, "data") is None:
        raise ConfigError("its config.yaml has no 'data' section; expected a gatekeeper recipe run", key="run")
    with errors_as("run"):
        dm = build(cfg.data, "data", seed=int(cfg.get("seed", 0)))
        dm.setup()
    if args["split"] not in dm.splits:
        raise ConfigError(f"the run's data has splits {sorted(dm.splits)}; got {args['split']!r}", key="split")
    with errors_as("run", names=("small_stage", "large_stage")):
        cascade = Cascade.from_run(args["run"], args["small_stage"], args["large_stage"], datamodule=dm,
                                   batch_size=args["batch_size"])
    cascade.calibrate(dm.predict_dataloader(args["split"]), args["target_rate"], confidence=args["confidence"],
                      method=args["method"])
    cascade.source["calibration_split"] = args["split"]
    return cascade


def report_text(cascade: Any) -> str:
    """The calibration report in a few lines."""
    rep = cascade.calibration
    if rep is None:
        return f"threshold {cascade.threshold} (no calibration report)"
    lines = [f"calibration: {rep.method} on {rep.n} rows, target deferral rate {rep.target_rate:g}",
             f"  threshold {rep.threshold:.6g}; realised rate {rep.rate:.4f}; bound {rep.bound}",
             f"  guarantee: {rep.guarantee}"]
    if rep.cascade_quality is not None:
        lines.append(f"  accuracy: small {rep.small_quality:.4f}, cascade {rep.cascade_quality:.4f}, "
                     f"large {rep.large_quality:.4f}; expected model calls per row {rep.cost:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        print("keys and defaults:", json.dumps(DEFAULTS))
        return
    from lit_cascades.runner.config import ConfigError

    try:
        args = parse_args(argv)
        if args["run"] is not None:
            cascade = calibrated_cascade(args)
        else:
            from lit_cascades.cascade import Cascade

            with errors_as("cascade"):
                cascade = Cascade.load(args["cascade"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report_text(cascade), flush=True)
    if args["save"] is not None:
        cascade.save(args["save"], overwrite=args["overwrite"])
        print(f"saved to {args['save']}", flush=True)
    if not args["serve"]:
        return
    from lit_cascades.serving import serve

    shown = "127.0.0.1" if args["host"] == "0.0.0.0" else args["host"]
    print(f"serving on http://{shown}:{args['port']}/predict (stats: /stats, health: /health); Ctrl+C stops",
          flush=True)
    serve(cascade, host=args["host"], port=args["port"], max_batch_size=args["max_batch_size"],
          batch_timeout=args["batch_timeout"], max_rows=args["max_rows"], workers_per_device=args["workers"],
          accelerator=args["accelerator"])


@contextlib.contextmanager
def errors_as(key: str, names: Sequence[str] = ()) -> Iterator[None]:
    """A ``ValueError``/``TypeError``/``OSError`` raised inside -> ``ConfigError`` for ``key``, or for the
    argument its message starts with when that is one of ``names`` (``small_stage: no weights at ...``)."""
    from lit_cascades.runner.config import ConfigError

    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as err:
        msg = " ".join(str(err).split())
        head, _, rest = msg.partition(": ")
        if head in names:
            raise ConfigError(rest, key=head) from err
        raise ConfigError(rest if head in ("run_dir", "directory") else msg, key=key) from err


if __name__ == "__main__":
    main()
