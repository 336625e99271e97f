"""Runs and stages: the run directory a recipe owns, and the stages that are the unit of its work.

A **run** is one directory owned by one recipe invocation::

    <run>/
      .lock             held (flock) while a process runs it: a second run on the same directory is refused
      run.json          run id, recipe, preset, config hash, lit_cascades version, git commit, status
      config.yaml       the composed configuration (resume compares against it)
      metrics.json      the recipe's results, with the run id, config hash, version and commit under "run"
      <stage>/          one directory per stage (stage names may nest: seed0/gatekeeper_a0.5)
        config.yaml     the stage's own config (what W&B groups and filters by: seed, alpha, ...)
        metrics.json    the stage's results
        model.pt        final weights (a state dict; loaded with weights_only=True)
        checkpoints/last.ckpt   the latest epoch of an unfinished fit (resume continues from it)
        logs/fit/metrics.csv, logs/test/metrics.csv   CSV logs, fit and test apart
        <name>.pt       predictions and cached results (:meth:`Stage.predict`, :meth:`Stage.cached`)
      wandb/            offline W&B runs: one per stage, grouped by the run id (job_type = stage kind)

A **stage** (:meth:`Run.stage`) trains, tests and predicts through Lightning ``Trainer`` s built from
``cfg.trainer``. Every expensive step is memoised in the stage directory: :meth:`Stage.fit` reloads
``model.pt`` when the fit finished and continues from ``checkpoints/last.ckpt`` when it did not;
:meth:`Stage.predict` and :meth:`Stage.cached` reload their saved tensors. Resuming a run
(``resume=<run dir>``) therefore replays the recipe from the top: finished stages cost a reload, the first
unfinished stage continues mid-fit, and the rest runs as usual. Seeds are set per stage (``seed``) and again
at every epoch start (``seed + epoch``), so a resumed run gives the same results as an uninterrupted one.

Distributed runs: with ``trainer.strategy=ddp_spawn`` the recipe runs in the main process and each fit,
test and predict spawns the workers; weights come back through Lightning, predictions are gathered across
ranks (the distributed sampler's padding dropped by example id) and written by rank 0, and callbacks that
define ``export_results() -> dict`` / ``import_results(dict)`` get their rank-0 results back in the main
process; each worker destroys its process group when its work is done (:class:`ReleaseProcessGroup`). With
``strategy=ddp`` every rank runs the recipe; ranks > 0 attach to rank 0's run directory (passed in
``$LIT_CASCADES_RUN_DIR``) and write nothing, and every rank destroys the group when the recipe succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_cascades.io import (
    atomic_path,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    jsonable,
    safe_torch_load,
)
from lit_cascades.runner.config import (
    ConfigError,
    available_presets,
    config_diff,
    config_errors,
    load_config,
    split_argv,
)

RUN_DIR_ENV = "LIT_CASCADES_RUN_DIR"
#: keys that may change when resuming (they do not change results)
RESUME_FREE_KEYS = ("resume", "output_dir", "logger", "trainer.enable_progress_bar")
MODEL_FILE = "model.pt"


def _child_rank() -> int:
    """This process's rank when it is a re-launched DDP rank (``strategy=ddp``), else 0."""
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK"):
        if int(os.environ.get(var, "0") or 0) > 0:
            return int(os.environ[var])
    return 0


def apply_threads(cfg: DictConfig) -> None:
    """Set the run's torch threads from ``cfg.threads`` (``null``: leave torch's default).

    Also exported as ``OMP_NUM_THREADS``, which the processes this one starts read at startup: DDP workers
    (``ddp_spawn``, ``ddp``) then use the same count (torch caps it at the cores), and Lightning does not
    replace it with ``cpu_count // processes``. The count changes how CPU kernels (convolutions, matrix
    products) split their sums, so results repeat bit for bit only at a fixed count: recipes whose README
    numbers are meant to be rerun set it (``python -m recipes.gatekeeper``: 1).

    Raises:
        ConfigError: ``threads`` is not ``null`` or an integer >= 1.
    """
    threads = cfg.get("threads")
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"expected an integer >= 1 or null (torch's default); got {threads!r}", key="threads")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version() -> str:
    import lit_cascades

    return str(getattr(lit_cascades, "__version__", "unknown"))


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


# --------------------------------------------------------------------------------------------------------
# callbacks the stages add
# --------------------------------------------------------------------------------------------------------
class EpochSeed(pl.Callback):
    """Seed every process with ``seed + epoch`` at each training epoch start (shuffling and dropout then do
    not depend on what ran before, so a run resumed mid-fit continues exactly)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)
        # Lightning wraps a custom sampler for DDP (DistributedSamplerWrapper) without passing set_epoch on:
        # pass it on, or an epoch-seeded sampler would repeat epoch 0's order under DDP
        loaders = trainer.train_dataloader
        for loader in loaders.values() if isinstance(loaders, dict) else \
                (loaders if isinstance(loaders, list | tuple) else [loaders]):
            for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                        "sampler", None)):
                inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
                if inner is not None and callable(getattr(inner, "set_epoch", None)):
                    inner.set_epoch(trainer.current_epoch)
                    # the inner sampler does the seeded shuffling; the wrapper must only shard it (rows r, r + W,
                    # ...). Lightning builds it with shuffle=True for training, which reshuffles the order again
                    # and gives other global batches than one process
                    sampler.shuffle = False


class AtomicCheckpoint(pl.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` keeping ``last.ckpt`` only, written to a temporary file and renamed (a process
    killed while saving never leaves a truncated checkpoint)."""

    def __init__(self, dirpath: str | Path) -> None:
        # no monitor and top-1: Lightning re-saves "last.ckpt" after every epoch (validation end when there is
        # a validation loop, else training epoch end), overwriting it in place
        super().__init__(dirpath=str(dirpath), filename="last", save_last=False, save_top_k=1, every_n_epochs=1,
                         enable_version_counter=False)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = str(Path(filepath).with_name(f".{Path(filepath).name}.tmp"))
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


class _ExportResults(pl.Callback):
    """In a spawned worker, rank 0 saves ``export_results()`` of the user's callbacks for the main process."""

    def __init__(self, path: Path, callbacks: Sequence[pl.Callback], main_pid: int) -> None:
        self.path, self.main_pid = path, main_pid
        self.indices = [i for i, cb in enumerate(callbacks) if hasattr(cb, "export_results")]
        self.callbacks = list(callbacks)

    def _export(self, trainer: pl.Trainer) -> None:
        if os.getpid() == self.main_pid or not trainer.is_global_zero or not self.indices:
            return
        atomic_save({str(i): self.callbacks[i].export_results() for i in self.indices}, self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._export(trainer)

    def import_into(self, callbacks: Sequence[pl.Callback]) -> None:
        """Main process: hand each callback its worker's results (no-op when nothing was spawned)."""
        if not self.path.exists():
            return
        state = safe_torch_load(self.path)
        for i, cb in enumerate(callbacks):
            if str(i) in state:
                cb.import_results(state[str(i)])  # type: ignore[attr-defined]
        self.path.unlink(missing_ok=True)


def _group_live() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def release_process_group(barrier: bool = True) -> bool:
    """Destroy ``torch.distributed``'s default process group, if one is live; returns whether it did.

    A process that exits with a gloo group alive leaves its worker threads to the exit-time destructors, which
    now and then abort it after its work is done (``terminate called without an active exception``, SIGABRT;
    pytorch/pytorch#190489). Call it once the process's collectives are over, on success only: with ``barrier``
    it first waits for every rank, which would wait on a rank that failed.
    """
    if not _group_live():
        return False
    if barrier:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return True


class ReleaseProcessGroup(pl.Callback):
    """Ends the process group of a spawned worker once its trainer's work is done (:func:`release_process_group`).

    Lightning's ``ddp_spawn`` workers exit with their process group alive (Lightning destroys it at exit only for
    NCCL); on torch 2.13 (CPU) that now and then aborted a worker of a two-worker stage after its work was done.
    Every trainer a :class:`Stage` builds carries this callback: in its ``teardown`` hook, in a process other
    than ``main_pid`` (the one that built the trainer), it waits for every rank and destroys the group. A
    failing rank raises before ``teardown``, so no rank waits on a dead peer. A ``LightningModule.teardown``
    runs after it, without the group. The main process, and the ranks of ``strategy=ddp`` (which keep one group
    for the whole run and release it when the recipe has finished), are left alone.
    """

    def __init__(self, main_pid: int) -> None:
        self.main_pid = main_pid

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if os.getpid() != self.main_pid:
            release_process_group()


def _sampler_ids(dataloader: Any) -> torch.Tensor | None:
    sampler = getattr(dataloader, "sampler", None)
    if sampler is None:
        return None
    try:
        return torch.as_tensor(list(iter(sampler)), dtype=torch.long)
    except TypeError:
        return None


class GatherPredictions(pl.Callback):
    """Collect ``predict_step`` outputs (dicts of tensors with a leading batch dimension), gather them across
    ranks, drop the distributed sampler's padding by example id (the batch's ``"index"`` when the module
    returns one, else the sampler's indices), order them by id and save them on rank 0 to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outputs: list[dict[str, torch.Tensor]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.outputs = []

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict):
            raise TypeError(f"{type(pl_module).__name__}.predict_step must return a dict of tensors; got "
                            f"{type(outputs).__name__}")
        self.outputs.append({k: v.detach().cpu() for k, v in outputs.items() if isinstance(v, torch.Tensor)})

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.outputs:
            raise ValueError("prediction produced no batches (empty dataloader?)")
        local = {k: torch.cat([o[k] for o in self.outputs]) for k in self.outputs[0]}
        n = next(iter(local.values())).shape[0]
        ids = local.pop("index", None)
        if ids is None:
            dls = trainer.predict_dataloaders
            ids = _sampler_ids(dls[0] if isinstance(dls, list | tuple) else dls)
            if ids is not None and ids.shape[0] != n:
                ids = None
        if ids is None:
            if trainer.world_size > 1:
                raise ValueError("cannot drop the distributed sampler's padding: predict_step returned no 'index' "
                                 "and the dataloader's sampler is not indexable")
            ids = torch.arange(n)
        if trainer.world_size > 1:
            # ranks may hold different counts (Lightning's predict sampler does not pad): pad to the
            # largest, gather, then keep each rank's own rows
            sizes = trainer.strategy.all_gather(torch.tensor([n], device=pl_module.device)).flatten().tolist()
            width = max(sizes)

            def gather(t: torch.Tensor) -> torch.Tensor:
                padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype)
                padded[:n] = t
                out = trainer.strategy.all_gather(padded.to(pl_module.device)).cpu()
                return torch.cat([out[r, :sizes[r]] for r in range(len(sizes))])

            ids = gather(ids)
            local = {k: gather(v) for k, v in local.items()}
        order = torch.argsort(ids, stable=True)
        ids, local = ids[order], {k: v[order] for k, v in local.items()}
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[1:] = ids[1:] != ids[:-1]
        result = {"index": ids[keep], **{k: v[keep] for k, v in local.items()}}
        if trainer.is_global_zero:
            atomic_save(result, self.path)
        trainer.strategy.barrier("gather_predictions")
        self.outputs = []


# --------------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------------
class Stage:
    """One unit of a run: a directory, a W&B run, and memoised fit / test / predict steps.

    Create with :meth:`Run.stage`. ``kind`` is the stage's role (``"large"``, ``"gatekeeper"``, ...; the W&B
    ``job_type``); ``config`` is what distinguishes it (seed, α, its section of the recipe config): it is
    written to ``<stage>/config.yaml`` and is the W&B run's config, so W&B can group stages by it.
    """

    def __init__(self, run: Run, name: str, kind: str, config: dict[str, Any], seed: int) -> None:
        self.run, self.name, self.kind, self.seed = run, name, kind, int(seed)
        self.config = {"stage": name, "kind": kind, "seed": self.seed, **jsonable(config)}
        self.dir = run.dir / name
        self._wandb: Any = None
        self.metrics: dict[str, Any] = {}
        if run.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(self.config)))

    # -- W&B --------------------------------------------------------------------------------------------
    @property
    def wandb_run(self) -> Any:
        """This stage's W&B run (created on first use; ``None`` when W&B is off or on ranks > 0)."""
        logger_cfg = self.run.cfg.get("logger", {})
        if not logger_cfg.get("wandb", False) or not self.run.writer:
            return None
        if self._wandb is None:
            import wandb

            self.run._close_active_stage(self)
            id_file = self.dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            atomic_write_text(id_file, run_id)
            self._wandb = wandb.init(
                project=logger_cfg.get("project", "lit_cascades"), group=self.run.run_id, job_type=self.kind,
                name=f"{self.run.run_id}/{self.name}", id=run_id, resume="allow", dir=str(self.run.dir),
                config=self.config, mode=os.environ.get("WANDB_MODE") or logger_cfg.get("mode", "offline"),
                tags=[self.run.name, self.run.preset, self.kind], reinit="finish_previous",
            )
            self.run._active = self
        return self._wandb

    def _close_wandb(self, failed: bool = False) -> None:
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None

    def loggers(self, split: str) -> list[Any]:
        """CSV logger under ``<stage>/logs/<split>`` (a fresh version when resuming) plus the stage's W&B run."""
        from lightning.pytorch.loggers import CSVLogger, WandbLogger

        version, i = split, 1
        while (self.dir / "logs" / version / "metrics.csv").exists():
            version, i = f"{split}-{i}", i + 1
        out: list[Any] = [CSVLogger(save_dir=str(self.dir), name="logs", version=version)]
        if self.wandb_run is not None:
            out.append(WandbLogger(experiment=self.wandb_run))
        return out

    # -- trainers ---------------------------------------------------------------------------------------
    def trainer(self, split: str, callbacks: Iterable[pl.Callback] = (), checkpoint: bool = False,
                **overrides: Any) -> pl.Trainer:
        """A ``Trainer`` from ``cfg.trainer`` (``overrides`` win) logging to this stage's ``split`` loggers."""
        kwargs = {**OmegaConf.to_container(self.run.cfg.trainer, resolve=True), **overrides}  # type: ignore[dict-item]
        logger = kwargs.pop("logger", None)
        cbs = [*callbacks, ReleaseProcessGroup(os.getpid())]
        if checkpoint:
            cbs.append(AtomicCheckpoint(self.dir / "checkpoints"))
        self.run.started = True
        return pl.Trainer(default_root_dir=str(self.dir), callbacks=cbs, enable_checkpointing=checkpoint,
                          logger=self.loggers(split) if logger is None else logger, **kwargs)

    def _run_trainer(self, split: str, method: str, callbacks: Sequence[pl.Callback], checkpoint: bool,
                     overrides: dict[str, Any], **call: Any) -> Any:
        export = _ExportResults(self.dir / f".results_{split}.pt", callbacks, os.getpid())
        trainer = self.trainer(split, callbacks=[*callbacks, export], checkpoint=checkpoint, **overrides)
        out = getattr(trainer, method)(**call)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"stage '{self.name}' was interrupted; resume with resume={self.run.dir}")
        export.import_into(callbacks)
        return out

    @property
    def fitted(self) -> bool:
        """Whether this stage's fit finished (``model.pt`` exists)."""
        return (self.dir / MODEL_FILE).exists()

    def fit(self, module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
            callbacks: Sequence[pl.Callback] = (), train_dataloaders: Any = None, val_dataloaders: Any = None,
            **overrides: Any) -> pl.LightningModule:
        """Train ``module`` (or reload this stage's finished weights) and save ``<stage>/model.pt``.

        Data comes from ``datamodule`` or from ``train_dataloaders`` / ``val_dataloaders``. An unfinished fit of an
        earlier attempt continues from ``<stage>/checkpoints/last.ckpt``. ``overrides`` are ``Trainer``
        arguments (``max_epochs=...``).
        """
        if datamodule is not None and not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"datamodule: expected a LightningDataModule; got {type(datamodule).__name__} "
                            "(pass dataloaders as train_dataloaders= / val_dataloaders=)")
        if self.fitted:
            module.load_state_dict(safe_torch_load(self.dir / MODEL_FILE))
            self._log_event(f"reloaded finished fit from {self.dir / MODEL_FILE}")
            return module
        last = self.dir / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
        if ckpt_path:
            self._log_event(f"continuing the fit from {last}")
        pl.seed_everything(self.seed, workers=True, verbose=False)
        self._run_trainer("fit", "fit", [*callbacks, EpochSeed(self.seed)], True, overrides, model=module,
                          datamodule=datamodule, train_dataloaders=train_dataloaders,
                          val_dataloaders=val_dataloaders, ckpt_path=ckpt_path, weights_only=True)
        if self.run.writer:
            atomic_save(module.state_dict(), self.dir / MODEL_FILE)
            shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
        return module

    def test(self, module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
             callbacks: Sequence[pl.Callback] = (), dataloaders: Any = None, **overrides: Any) -> dict[str, float]:
        """Run ``trainer.test`` and return the logged metrics (``test/...``) as floats; they are also kept in
        ``stage.metrics``. Testing is cheap and deterministic, so it is not memoised (a resumed run re-tests)."""
        overrides.setdefault("enable_progress_bar", False)
        pl.seed_everything(self.seed, workers=True, verbose=False)
        results = self._run_trainer("test", "test", list(callbacks), False, overrides, model=module,
                                    datamodule=datamodule, dataloaders=dataloaders, verbose=False)
        logged = {k: float(v) for k, v in (results[0] if results else {}).items()}
        self.metrics.update(logged)
        return logged

    def predict(self, module: pl.LightningModule, dataloaders: Any = None,
                datamodule: pl.LightningDataModule | None = None, name: str = "predictions",
                **overrides: Any) -> dict[str, torch.Tensor]:
        """``trainer.predict`` over a dataset, gathered across ranks, ordered by example id and saved as
        ``<stage>/<name>.pt`` (reloaded when it exists). ``predict_step`` must return a dict of tensors with a
        leading batch dimension (``"index"``, the example ids, when it has them)."""
        path = self.dir / f"{name}.pt"
        if path.exists():
            return safe_torch_load(path)
        gather = GatherPredictions(path)
        self._run_trainer("predict", "predict", [gather], False, {**overrides, "logger": False}, model=module,
                          dataloaders=dataloaders, datamodule=datamodule, return_predictions=False)
        return safe_torch_load(path)

    def cached(self, name: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``fn()`` (a dict of tensors, e.g. generation records), saved as ``<stage>/<name>.pt`` and reloaded
        when it exists (a resumed run does not recompute it)."""
        path = self.dir / f"{name}.pt"
        if path.exists():
            return safe_torch_load(path)
        self.run.started = True
        out = fn()
        if self.run.writer:
            atomic_save(out, path)
        return out

    # -- outputs ----------------------------------------------------------------------------------------
    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``<stage>/<name>.json`` atomically."""
        return self.run._save_json(self.dir, name, obj)

    def save_figure(self, name: str, fig: Any) -> Path:
        """Save ``<stage>/<name>.png`` and log it to this stage's W&B run under ``plots/<name>``."""
        return self.run._save_figure(self.dir, name, fig, self.wandb_run)

    def save_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        """Save ``<stage>/<name>.csv`` and log it to this stage's W&B run under ``tables/<name>``."""
        return self.run._save_table(self.dir, name, columns, rows, self.wandb_run)

    def finish(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the stage's results: ``<stage>/metrics.json``, the W&B summary; closes the W&B run."""
        if metrics is not None:
            self.metrics = dict(metrics)
        if self.run.writer:
            self.save_json("metrics", self.metrics)
            if self.wandb_run is not None:
                flat = flatten(jsonable(self.metrics))
                self.wandb_run.summary.update({k: v for k, v in flat.items() if isinstance(v, int | float)})
        self._close_wandb()
        return self.metrics

    def _log_event(self, text: str) -> None:
        if self.run.writer:
            print(f"[{self.run.name}] stage '{self.name}': {text}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------------
class Run:
    """One recipe run: its configuration, its exclusive directory and its stages.

    Attributes:
        name: the recipe name. cfg: the composed configuration. dir: the run directory. preset: the preset.
        run_id: ``<recipe>-<directory name>``, the W&B group of every stage. writer: whether this process writes
        (False on re-launched DDP ranks). resumed: whether this run continues an earlier one.
    """

    def __init__(self, name: str, cfg: DictConfig, dir: Path, preset: str = "default", run_id: str | None = None,
                 writer: bool = True, resumed: bool = False) -> None:
        self.name, self.cfg, self.dir, self.preset = name, cfg, Path(dir), preset
        self.run_id = run_id or f"{name}-{self.dir.name}"
        self.writer, self.resumed = writer, resumed
        self.started = False
        self.stages: dict[str, Stage] = {}
        self._active: Stage | None = None
        self._lock: Any = None

    # -- stages -----------------------------------------------------------------------------------------
    def stage(self, name: str, kind: str | None = None, config: dict[str, Any] | None = None,
              seed: int | None = None) -> Stage:
        """The stage ``name`` (a relative path: ``small``, ``seed1/gatekeeper_a0.3``); ``kind`` defaults to
        its last path component, ``seed`` to ``cfg.seed``."""
        if not name or name.startswith(("/", ".")) or ".." in Path(name).parts:
            raise ValueError(f"stage name must be a relative path inside the run directory; got {name!r}")
        if name in self.stages:
            return self.stages[name]
        st = Stage(self, name, kind or Path(name).name, config or {},
                   int(self.cfg.get("seed", 0)) if seed is None else seed)
        self.stages[name] = st
        return st

    def _close_active_stage(self, new: Stage) -> None:
        if self._active is not None and self._active is not new:
            self._active._close_wandb()
        self._active = None

    # -- outputs ----------------------------------------------------------------------------------------
    def _save_json(self, directory: Path, name: str, obj: Any) -> Path:
        path = directory / f"{name}.json"
        if self.writer:
            atomic_write_json(path, obj)
        return path

    def _save_figure(self, directory: Path, name: str, fig: Any, wandb_run: Any) -> Path:
        import matplotlib.pyplot as plt

        path = directory / f"{name}.png"
        if self.writer:
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=120, bbox_inches="tight")
            if wandb_run is not None:
                import wandb

                wandb_run.log({f"plots/{name}": wandb.Image(str(path))})
        plt.close(fig)
        return path

    def _save_table(self, directory: Path, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                    wandb_run: Any) -> Path:
        import csv
        import io

        path = directory / f"{name}.csv"
        if not self.writer:
            return path
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(jsonable([list(r) for r in rows]))
        atomic_write_text(path, buf.getvalue())
        if wandb_run is not None:
            import wandb

            wandb_run.log({f"tables/{name}": wandb.Table(columns=list(columns), data=jsonable([list(r) for r in rows]))})
        return path

    def summary_stage(self) -> Stage:
        """The ``summary`` stage: where run-level figures and tables are logged to W&B (files go to the run dir)."""
        return self.stage("summary", kind="summary")

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``<run>/<name>.json`` atomically."""
        return self._save_json(self.dir, name, obj)

    def save_text(self, filename: str, text: str) -> Path:
        """Write ``<run>/<filename>`` atomically."""
        path = self.dir / filename
        if self.writer:
            atomic_write_text(path, text)
        return path

    def save_figure(self, name: str, fig: Any) -> Path:
        """Save ``<run>/<name>.png``; logged to the ``summary`` stage's W&B run under ``plots/<name>``."""
        return self._save_figure(self.dir, name, fig, self.summary_stage().wandb_run)

    def save_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        """Save ``<run>/<name>.csv``; logged to the ``summary`` stage's W&B run under ``tables/<name>``."""
        return self._save_table(self.dir, name, columns, rows, self.summary_stage().wandb_run)

    # -- life cycle -------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """Run id, recipe, preset, config hash, package version and git commit (also in ``metrics.json``)."""
        return {"run_id": self.run_id, "recipe": self.name, "preset": self.preset,
                "config_hash": config_hash(_comparable(self.cfg)), "version": _version(), "git_commit": _git_commit()}

    def finish(self, metrics: dict[str, Any] | None, failed: bool = False) -> None:
        """Write ``metrics.json`` (unless failed), mark ``run.json``, close the W&B runs and release the lock."""
        try:
            if self.writer:
                if metrics is not None and not failed:
                    summary = self.stages.get("summary")
                    if summary is not None:
                        summary.finish(metrics)
                    atomic_write_json(self.dir / "metrics.json", {"run": self.meta(), **metrics})
                self._write_run_json("failed" if failed else "finished")
            for st in self.stages.values():
                st._close_wandb(failed=failed)
        finally:
            self.release()

    def _write_run_json(self, status: str) -> None:
        path = self.dir / "run.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        atomic_write_json(path, {**self.meta(), "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
                                 "status": status, "attempts": old.get("attempts", 0) + (status == "running")})

    def acquire(self) -> None:
        """Take the run directory's lock (refused when another live process holds it)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fd.seek(0)
            holder = fd.read().strip()
            fd.close()
            raise ConfigError(f"{self.dir} is in use by another run (pid {holder or '?'}); wait for it or choose "
                              "another output_dir", key="output_dir") from None
        fd.seek(0)
        fd.truncate()
        fd.write(str(os.getpid()))
        fd.flush()
        self._lock = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _comparable(cfg: DictConfig | dict) -> dict[str, Any]:
    """The config without the keys that may change on resume (:data:`RESUME_FREE_KEYS`)."""
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in RESUME_FREE_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = d.get(parent, {}) if parent else d
        if isinstance(node, dict):
            node.pop(leaf, None)
    return d  # type: ignore[return-value]


def validate_trainer(cfg: DictConfig) -> None:
    """Build a ``Trainer`` from ``cfg.trainer`` once (no logger, nothing written): precision, accelerator,
    devices and strategy are checked before any work."""
    import warnings

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    with config_errors("trainer", names=list(kwargs)), warnings.catch_warnings():  # type: ignore[arg-type]
        warnings.simplefilter("ignore")
        pl.Trainer(**kwargs, logger=False, enable_checkpointing=False,  # type: ignore[arg-type]
                   default_root_dir=os.devnull)


def _resume_config(name: str, argv: Sequence[str], config_dir: Path, run_dir: Path) -> tuple[DictConfig, str]:
    """The saved config of ``run_dir``; other ``key=value`` items must compose to the same config."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (expected config.yaml and run.json in it)",
                          key="resume")
    saved = OmegaConf.load(run_dir / "config.yaml")
    meta = json.loads((run_dir / "run.json").read_text())
    if meta.get("recipe") != name:
        raise ConfigError(f"{run_dir} is a run of recipe '{meta.get('recipe')}', not '{name}'", key="resume")
    items = split_argv(argv)
    others = [k for k in items if k not in RESUME_FREE_KEYS]
    if others:
        cfg, preset = load_config(name, argv, config_dir)
        diff = config_diff(_comparable(saved), _comparable(cfg))  # type: ignore[arg-type]
        if diff:
            raise ConfigError(f"the configuration differs from the saved one of {run_dir} in: {', '.join(diff)}; "
                              "resume with resume=<run dir> alone, or start a new run", key="resume")
    else:
        cfg, preset = saved, meta.get("preset", "default")
        for key in RESUME_FREE_KEYS:
            if key in items and key != "resume":
                OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"x={items[key]}"]).x, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg, preset  # type: ignore[return-value]


def setup_run(name: str, argv: Sequence[str], config_dir: str | Path) -> Run:
    """Compose and check the config, then claim the run directory: everything before the recipe body.

    A new run refuses a non-empty ``output_dir``; ``resume=<run dir>`` continues a run with its saved config.
    """
    config_dir = Path(config_dir)
    items = split_argv(argv)
    env_dir = os.environ.get(RUN_DIR_ENV)
    if _child_rank() > 0 and env_dir:  # a re-launched DDP rank: attach to rank 0's run, write nothing
        run_dir = Path(env_dir)
        cfg = OmegaConf.load(run_dir / "config.yaml")
        meta = json.loads((run_dir / "run.json").read_text())
        apply_threads(cfg)
        pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
        return Run(name, cfg, run_dir, meta.get("preset", "default"), run_id=meta["run_id"], writer=False)  # type: ignore[arg-type]
    if items.get("resume"):
        run_dir = Path(items["resume"])
        cfg, preset = _resume_config(name, argv, config_dir, run_dir)
        with open_dict(cfg):
            cfg.resume, cfg.output_dir = str(run_dir), str(run_dir)
        resumed = True
    else:
        cfg, preset = load_config(name, argv, config_dir)
        run_dir = Path(cfg.output_dir) if cfg.get("output_dir") else \
            Path("runs") / name / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{run_dir} exists and is not a directory", key="output_dir")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} is not empty: a run directory belongs to one run; pass resume={run_dir} "
                              "to continue it, or choose another output_dir", key="output_dir")
        resumed = False
    apply_threads(cfg)
    validate_trainer(cfg)
    meta_id = json.loads((run_dir / "run.json").read_text()).get("run_id") if resumed else None
    r = Run(name, cfg, run_dir, preset, run_id=meta_id, resumed=resumed)
    created = not run_dir.exists()
    r.acquire()
    r._created_dir = created and not resumed  # type: ignore[attr-defined]
    if resumed:
        (run_dir / "metrics.json").unlink(missing_ok=True)  # stale until this attempt finishes
    else:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    r._write_run_json("running")
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    return r


def _default_config_dir(run_fn: Callable[..., Any]) -> Path:
    module = sys.modules.get(run_fn.__module__)
    if module is None or not getattr(module, "__file__", None):
        raise ConfigError("cannot locate the recipe's configs/ directory; pass config_dir=")
    return Path(module.__file__).resolve().parent / "configs"  # type: ignore[arg-type]


def _usage(name: str, config_dir: Path) -> str:
    cfg, _ = load_config(name, [], config_dir)
    groups = sorted(p.name for p in (config_dir / name).iterdir() if p.is_dir())
    group_lines = "".join(f"{g}={'|'.join(sorted(p.stem for p in (config_dir / name / g).glob('*.yaml')))}  "
                          "(config group)\n" for g in groups)
    return (
        f"usage: python -m recipes.{name} [preset=<preset>] [key=value ...] [+new.key=value ...] [~section.arg ...]\n"
        f"       python -m recipes.{name} resume=<run dir>\n\n"
        f"presets: {', '.join(available_presets(config_dir, name))}\n{group_lines}\n"
        "Sections with _target_ are built by calling that class with the section's other keys: set "
        "<section>._target_=my_pkg.MyClass to run a subclass.\n\n"
        f"default configuration (configs/_base.yaml + configs/{name}/default.yaml):\n\n{OmegaConf.to_yaml(cfg)}"
    )


def run_recipe(name: str, run_fn: Callable[[DictConfig, Run], dict[str, Any]], argv: Sequence[str],
               config_dir: str | Path | None = None) -> tuple[Run, dict[str, Any]]:
    """Programmatic entry point (tests, notebooks): returns ``(run, metrics)``; raises :class:`ConfigError`.

    A run that fails before any stage started work (a bad value found while building components or setting
    up data) removes the run directory it created. A run that succeeds destroys the process group its trainers
    created (``strategy=ddp``; :func:`release_process_group`), not one that existed before it.
    """
    config_dir = Path(config_dir) if config_dir is not None else _default_config_dir(run_fn)
    had_group = _group_live()
    r = setup_run(name, argv, config_dir)
    try:
        metrics = run_fn(r.cfg, r)
    except BaseException:
        r.finish(None, failed=True)
        if r.writer and not r.started and getattr(r, "_created_dir", False):
            shutil.rmtree(r.dir, ignore_errors=True)
        raise
    r.finish(metrics)
    if not had_group:  # strategy=ddp: the group the run's trainers made; a caller's own group is left alone
        release_process_group(barrier=False)
    return r, metrics


def main(name: str, run_fn: Callable[[DictConfig, Run], dict[str, Any]], argv: Sequence[str] | None = None,
         config_dir: str | Path | None = None) -> None:
    """Command-line entry point: ``python -m recipes.<name> [preset=<p>] [key=value ...]``.

    A configuration error prints one line ``error: <key>: <message>`` to stderr and exits with status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_dir = Path(config_dir) if config_dir is not None else _default_config_dir(run_fn)
    try:
        if any(a in ("-h", "--help", "help") for a in argv):
            print(_usage(name, config_dir))
            return
        r, metrics = run_recipe(name, run_fn, argv, config_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if r.writer:
        print(json.dumps(jsonable(metrics), indent=2))
        print(f"[{name}] outputs in {r.dir}")
