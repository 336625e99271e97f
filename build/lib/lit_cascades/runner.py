"""The one recipe runner: ``python -m recipes.<name> [preset=<preset>] [key=value ...]``.

A recipe is a function ``run(cfg, r: Run) -> dict`` plus ``main("<name>", run)`` under
``if __name__ == "__main__"``. The runner

1. loads ``configs/_base.yaml`` (keys every recipe has), ``configs/<name>/default.yaml`` and the chosen
   preset (which lists only what it changes), then the command-line ``key=value`` overrides. Unknown keys
   are rejected with the valid ones listed; ``+key=value`` adds a new key on purpose. A value whose type
   differs from the default's (``model.alpha=abc`` for a float) is rejected too. Config groups: a section
   ``<group>`` with a folder ``configs/<name>/<group>/`` is chosen by name (``data=coco`` on the command line,
   ``data: coco`` in a config file), which replaces the whole section by ``<group>/coco.yaml``;
2. creates the run directory (``output_dir``, default ``runs/<name>/<preset>-<time>``), seeds everything,
   and starts the loggers (CSV always; an offline-by-default W&B run when ``logger.wandb=true``);
3. calls the recipe, then writes ``config.yaml`` and ``metrics.json`` atomically. A recipe that raises leaves
   no ``metrics.json`` behind and marks the W&B run as failed.

``Run.fit`` trains one named stage with checkpoints under ``checkpoints/<stage>/``; ``resume=<ckpt>``
resumes the stage that checkpoint belongs to and reloads earlier, finished stages of the same run directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

FINAL_CKPT = "final.ckpt"


class ConfigError(ValueError):
    """A preset or an override that does not fit the recipe's configuration schema."""


# --------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------
def available_presets(config_dir: Path, name: str) -> list[str]:
    """Names of the presets of recipe ``name`` (the YAML files in ``config_dir/name``)."""
    return sorted(p.stem for p in (config_dir / name).glob("*.yaml"))


def _valid_keys_message(cfg: DictConfig, full_key: str) -> str:
    parent_key, _, _leaf = full_key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    except Exception:
        parent = None
    where = f"under '{parent_key}'" if parent_key else "at the top level"
    if isinstance(parent, DictConfig):
        return f"valid keys {where}: {', '.join(sorted(str(k) for k in parent.keys()))}"
    return f"'{parent_key}' is not a section"


def _check_types(default: Any, new: Any, path: str) -> None:
    """Reject overrides whose type does not fit the default's type (None accepts anything)."""
    if isinstance(default, DictConfig) and isinstance(new, DictConfig):
        for key in new.keys():
            if key in default:
                _check_types(default[key], new[key], f"{path}.{key}" if path else str(key))
        return
    if default is None or new is None:
        return
    if isinstance(default, bool):
        ok = isinstance(new, bool)
    elif isinstance(default, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(default, float):
        ok = isinstance(new, int | float) and not isinstance(new, bool)
    elif isinstance(default, ListConfig | list):
        ok = isinstance(new, ListConfig | list)
    elif isinstance(default, DictConfig):
        ok = isinstance(new, DictConfig)
    else:
        ok = True  # strings accept anything (paths, names)
    if not ok:
        raise ConfigError(f"config key '{path}' expects a {type(default).__name__} (default {default!r}); "
                          f"got {new!r}")


def _merge_strict(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    _check_types(cfg, other, "")
    try:
        return OmegaConf.merge(cfg, other)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        full_key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(
            f"unknown config key '{full_key}' (from {source}); {_valid_keys_message(cfg, str(full_key))}. "
            "Use +key=value to add a new key on purpose."
        ) from None


def _group_options(config_dir: Path, name: str, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / name / group).glob("*.yaml"))


def _is_group(config_dir: Path, name: str, key: str) -> bool:
    return "." not in key and (config_dir / name / key).is_dir()


def _select_group(cfg: DictConfig, config_dir: Path, name: str, group: str, option: Any) -> DictConfig:
    """Replace section ``group`` of ``cfg`` by ``configs/<name>/<group>/<option>.yaml``."""
    options = _group_options(config_dir, name, group)
    if not isinstance(option, str) or option not in options:
        raise ConfigError(f"unknown option {option!r} for config group '{group}'; available: {', '.join(options)}")
    with open_dict(cfg):
        cfg[group] = OmegaConf.load(config_dir / name / group / f"{option}.yaml")
    return cfg


def _merge_layer(cfg: DictConfig, layer: DictConfig, config_dir: Path, name: str, source: str,
                 strict: bool = True) -> DictConfig:
    """Merge a config file: its group selections (``group: option``) first, then the rest of its keys."""
    for key in [k for k in layer.keys() if _is_group(config_dir, name, str(k)) and isinstance(layer[k], str)]:
        cfg = _select_group(cfg, config_dir, name, str(key), layer[key])
        del layer[key]
    return _merge_strict(cfg, layer, source) if strict else OmegaConf.merge(cfg, layer)  # type: ignore[return-value]


def load_config(name: str, argv: Sequence[str], config_dir: str | Path) -> tuple[DictConfig, str]:
    """Compose the configuration of recipe ``name`` from its files and ``argv`` (``key=value`` items).

    Returns ``(cfg, preset)``. Raises :class:`ConfigError` for an unknown preset or key, a malformed item
    or a value of the wrong type.
    """
    config_dir = Path(config_dir)
    presets = available_presets(config_dir, name)
    if "default" not in presets:
        raise ConfigError(f"recipe '{name}' has no configs/{name}/default.yaml in {config_dir}")
    preset, items, additions, groups = "default", [], [], []
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r} (try --help)")
        key, value = item.split("=", 1)
        if key == "preset":
            preset = value
        elif key.startswith("+"):
            additions.append((key[1:], value))
        elif _is_group(config_dir, name, key):
            groups.append((key, value))
        else:
            items.append(item)
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for recipe '{name}'; available presets: {', '.join(presets)}")
    base_file = config_dir / "_base.yaml"
    cfg = OmegaConf.load(base_file) if base_file.exists() else OmegaConf.create()
    cfg = _merge_layer(cfg, OmegaConf.load(config_dir / name / "default.yaml"), config_dir, name, "default.yaml",
                       strict=False)
    OmegaConf.set_struct(cfg, True)
    if preset != "default":
        cfg = _merge_layer(cfg, OmegaConf.load(config_dir / name / f"{preset}.yaml"), config_dir, name,
                           f"preset '{preset}'")
    for key, value in groups:
        cfg = _select_group(cfg, config_dir, name, key, value)
    if items:
        cfg = _merge_strict(cfg, OmegaConf.from_dotlist(items), "the command line")
    for key, value in additions:
        OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"x={value}"]).x, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg, preset


# --------------------------------------------------------------------------------------------------------
# run directory, loggers, trainers
# --------------------------------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename (never leaves a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def summarize_runs(rows: Sequence[dict[str, Any]], group_key: str, value_keys: Sequence[str]
                   ) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and sample standard deviation of ``value_keys`` per group (e.g. per method over seeds).

    Returns ``{group: {key: (mean, std)}}`` in first-seen group order; std is 0 for a single run.
    """
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[group_key]), []).append(row)
    out = {}
    for group, members in groups.items():
        out[group] = {}
        for key in value_keys:
            values = [float(m[key]) for m in members]
            out[group][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Flatten nested dicts: ``{"a": {"b": 1}} -> {"a/b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


@dataclass
class Run:
    """One recipe run: its configuration, directory, loggers and trainers.

    Attributes:
        name: the recipe name.
        cfg: the composed configuration.
        dir: the run directory (all outputs go here).
        preset: the preset the configuration came from.
    """

    name: str
    cfg: DictConfig
    dir: Path
    preset: str = "default"
    _wandb: Any = field(default=None, init=False, repr=False)

    # -- loggers ------------------------------------------------------------------------------------------
    @property
    def wandb_run(self) -> Any:
        """The W&B run of this recipe run (created on first use), or ``None`` when W&B is off."""
        logger_cfg = self.cfg.get("logger", {})
        if not logger_cfg.get("wandb", False):
            return None
        if self._wandb is None:
            import wandb

            wandb_dir = self.dir / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=logger_cfg.get("project", "lit_cascades"),
                name=f"{self.name}-{self.dir.name}",
                dir=str(self.dir),
                config=OmegaConf.to_container(self.cfg, resolve=True),  # type: ignore[arg-type]
                mode=os.environ.get("WANDB_MODE") or logger_cfg.get("mode", "offline"),
                tags=[self.name, self.preset],
                reinit="finish_previous",
            )
        return self._wandb

    def loggers(self, stage: str) -> list[Any]:
        """Loggers for one stage: CSV under ``logs/<stage>`` and W&B with keys prefixed by the stage."""
        from lightning.pytorch.loggers import CSVLogger, WandbLogger

        out: list[Any] = [CSVLogger(save_dir=str(self.dir), name="logs", version=stage)]
        if self.wandb_run is not None:
            out.append(WandbLogger(experiment=self.wandb_run, prefix=stage))
        return out

    # -- trainers -----------------------------------------------------------------------------------------
    def trainer(self, stage: str, callbacks: Iterable[pl.Callback] = (), checkpoint: bool = True,
                **overrides: Any) -> pl.Trainer:
        """A ``Trainer`` for ``stage`` built from ``cfg.trainer`` (``overrides`` win), wired to the loggers.

        With ``checkpoint=True`` a ``ModelCheckpoint`` keeps the latest epoch's checkpoint in
        ``checkpoints/<stage>/`` with ``last.ckpt`` linking to it (the file to pass as ``resume=``).
        """
        from lightning.pytorch.callbacks import ModelCheckpoint

        kwargs = {**OmegaConf.to_container(self.cfg.trainer, resolve=True), **overrides}  # type: ignore[dict-item]
        logger = kwargs.pop("logger", None)
        cbs = list(callbacks)
        if checkpoint:
            cbs.append(ModelCheckpoint(dirpath=str(self.dir / "checkpoints" / stage), save_last="link",
                                       save_top_k=1, every_n_epochs=1))
        return pl.Trainer(default_root_dir=str(self.dir),
                          logger=self.loggers(stage) if logger is None else logger, callbacks=cbs,
                          enable_checkpointing=checkpoint, **kwargs)

    def stage_checkpoint(self, stage: str) -> Path:
        """Path of the final checkpoint of a finished stage."""
        return self.dir / "checkpoints" / stage / FINAL_CKPT

    def fit(self, stage: str, module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
            callbacks: Iterable[pl.Callback] = (), **overrides: Any) -> pl.LightningModule:
        """Train ``module`` as the named stage and save ``checkpoints/<stage>/final.ckpt`` atomically.

        With ``cfg.resume`` set: a stage already finished in this run directory is reloaded instead of
        retrained, and the stage owning the ``resume`` checkpoint continues from it.
        """
        final = self.stage_checkpoint(stage)
        resume = self.cfg.get("resume")
        ckpt_path = None
        if resume:
            if final.exists():
                state = torch.load(final, map_location="cpu", weights_only=False)
                module.load_state_dict(state["state_dict"])
                print(f"[{self.name}] stage '{stage}': reloaded finished stage from {final}")
                return module
            if Path(resume).parent.name == stage:
                ckpt_path = str(resume)
        trainer = self.trainer(stage, callbacks=callbacks, **overrides)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        tmp = final.with_name(f".{FINAL_CKPT}.tmp")
        trainer.save_checkpoint(str(tmp))  # collective under DDP; only rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, final)
        return module

    def test(self, stage: str, module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
             callbacks: Iterable[pl.Callback] = (), **overrides: Any) -> dict[str, float]:
        """Run ``trainer.test`` for ``stage`` and return its logged metrics as floats."""
        trainer = self.trainer(stage, callbacks=callbacks, checkpoint=False, **overrides)
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    def predict(self, module: pl.LightningModule, dataloader: Any, **overrides: Any) -> dict[str, torch.Tensor]:
        """Run ``trainer.predict`` and concatenate the per-batch dicts of tensors."""
        overrides.setdefault("enable_progress_bar", False)
        trainer = self.trainer("predict", checkpoint=False, **{**overrides, "logger": False})
        outs = trainer.predict(module, dataloaders=dataloader)
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}  # type: ignore[index]

    # -- outputs ------------------------------------------------------------------------------------------
    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``<dir>/<name>.json`` atomically."""
        return atomic_write_text(self.dir / f"{name}.json", json.dumps(_jsonable(obj), indent=2))

    def save_text(self, filename: str, text: str) -> Path:
        """Write ``<dir>/<filename>`` atomically."""
        return atomic_write_text(self.dir / filename, text)

    def save_figure(self, name: str, fig: Any) -> Path:
        """Save a matplotlib figure as ``<dir>/<name>.png`` (atomically) and log it to W&B."""
        import matplotlib.pyplot as plt

        path = self.dir / f"{name}.png"
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
        plt.close(fig)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(str(path))})
        return path

    def save_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        """Save rows as ``<dir>/<name>.csv`` (atomically) and log them to W&B as a table."""
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(rows)
        path = atomic_write_text(self.dir / f"{name}.csv", buf.getvalue())
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        return path

    def finish(self, metrics: dict[str, Any] | None, failed: bool = False) -> None:
        """Write ``metrics.json`` (unless failed) and close the W&B run."""
        if metrics is not None and not failed:
            self.save_json("metrics", metrics)
        if self._wandb is not None:
            if metrics and not failed:
                flat = flatten(_jsonable(metrics))
                self._wandb.summary.update({k: v for k, v in flat.items() if isinstance(v, int | float)})
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None


def _default_config_dir(run_fn: Callable[..., Any]) -> Path:
    module = sys.modules.get(run_fn.__module__)
    if module is None or not getattr(module, "__file__", None):
        raise ConfigError("cannot locate the recipe's configs/ directory; pass config_dir=")
    return Path(module.__file__).resolve().parent / "configs"  # type: ignore[arg-type]


def _usage(name: str, config_dir: Path) -> str:
    cfg, _ = load_config(name, [], config_dir)
    groups = sorted(p.name for p in (config_dir / name).iterdir() if p.is_dir())
    group_lines = "".join(f"{g}={'|'.join(_group_options(config_dir, name, g))}  (config group)\n" for g in groups)
    return (
        f"usage: python -m recipes.{name} [preset=<preset>] [key=value ...] [+new.key=value ...]\n\n"
        f"presets: {', '.join(available_presets(config_dir, name))}\n{group_lines}\n"
        f"default configuration (configs/_base.yaml + configs/{name}/default.yaml):\n\n{OmegaConf.to_yaml(cfg)}"
    )


def setup_run(name: str, argv: Sequence[str], config_dir: str | Path) -> Run:
    """Compose the config, create the run directory and seed: everything before the recipe body."""
    cfg, preset = load_config(name, argv, config_dir)
    if cfg.get("resume") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file")
    if cfg.get("output_dir"):
        run_dir = Path(cfg.output_dir)
    elif cfg.get("resume"):
        run_dir = Path(cfg.resume).resolve().parent.parent.parent  # <run>/checkpoints/<stage>/x.ckpt
    else:
        run_dir = Path("runs") / name / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    return Run(name=name, cfg=cfg, dir=run_dir, preset=preset)


def run_recipe(name: str, run_fn: Callable[[DictConfig, Run], dict[str, Any]], argv: Sequence[str],
               config_dir: str | Path | None = None) -> tuple[Run, dict[str, Any]]:
    """Programmatic entry point (used by tests and notebooks): returns ``(run, metrics)``."""
    config_dir = Path(config_dir) if config_dir is not None else _default_config_dir(run_fn)
    r = setup_run(name, argv, config_dir)
    try:
        metrics = run_fn(r.cfg, r)
    except BaseException:
        r.finish(None, failed=True)
        raise
    r.finish(metrics)
    return r, metrics


def main(name: str, run_fn: Callable[[DictConfig, Run], dict[str, Any]], argv: Sequence[str] | None = None,
         config_dir: str | Path | None = None) -> None:
    """Command-line entry point: ``python -m recipes.<name> [preset=<p>] [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_dir = Path(config_dir) if config_dir is not None else _default_config_dir(run_fn)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(_usage(name, config_dir))
        return
    try:
        r, metrics = run_recipe(name, run_fn, argv, config_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(_jsonable(metrics), indent=2))
    print(f"[{name}] outputs in {r.dir}")
