"""The recipe runner: ``python -m recipes.<name> [preset=<p>] [key=value ...]`` and ``resume=<run dir>``.

Three concerns, three modules:

* :mod:`lit_cascades.runner.config` composes a recipe's YAML files and overrides and builds every component
  from its ``_target_`` (the constructor signature is the schema);
* :mod:`lit_cascades.runner.run` owns the run directory (lock, run id, config hash, resume) and its stages
  (checkpoints, CSV logs, metrics, one W&B run each; predictions gathered across ranks);
* :mod:`lit_cascades.io` (shared with the library) writes files atomically and loads them safely.

A recipe is a function ``run(cfg, r: Run) -> dict`` and ``main("<name>", run)`` under
``if __name__ == "__main__"``. It builds all components first (so a bad value stops the run before any work),
then runs its stages through ``r.stage(name, kind, config)``.
"""

from lit_cascades.io import atomic_write_text
from lit_cascades.runner.config import (
    ConfigError,
    available_presets,
    build,
    build_list,
    check_arguments,
    config_diff,
    config_errors,
    load_config,
    locate,
)
from lit_cascades.runner.run import (
    GatherPredictions,
    ReleaseProcessGroup,
    Run,
    Stage,
    apply_threads,
    flatten,
    main,
    release_process_group,
    run_recipe,
    setup_run,
    summarize_runs,
    validate_trainer,
)

__all__ = [
    "ConfigError",
    "GatherPredictions",
    "ReleaseProcessGroup",
    "Run",
    "Stage",
    "apply_threads",
    "atomic_write_text",
    "available_presets",
    "build",
    "build_list",
    "check_arguments",
    "config_diff",
    "config_errors",
    "flatten",
    "load_config",
    "locate",
    "main",
    "release_process_group",
    "run_recipe",
    "setup_run",
    "summarize_runs",
    "validate_trainer",
]
