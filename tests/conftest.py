"""Test-suite wide settings: offline switches (set before transformers/wandb are imported) and seeds."""

from __future__ import annotations

import os
import tempfile

_WANDB_HOME = tempfile.mkdtemp(prefix="lit_cascades_wandb_")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": _WANDB_HOME,
    "WANDB_CACHE_DIR": _WANDB_HOME,
    "WANDB_CONFIG_DIR": _WANDB_HOME,
    "TOKENIZERS_PARALLELISM": "false",
    # tiny models: one intra-op thread per process avoids oversubscription (DDP tests run 2 processes)
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trained LM pair saved once per session (see tests/lm_helpers.py); load it with ``load_pair``."""
    from tests.lm_helpers import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("lm_pair") / "pair")


# A ddp_spawn worker that exits with its gloo process group alive occasionally aborts after its work is done
# ("terminate called without an active exception", SIGABRT). Stage trainers now destroy the group at the end of
# each worker's work (lit_cascades.runner.ReleaseProcessGroup); this stays as a guard for a process that still
# exits that way: a test that fails that way, and only that way, runs once more, with a line in the terminal
# saying so. Any other failure counts, and a second abort fails the test.
_WORKER_ABORT = ("ProcessExitedException", "terminated with signal SIGABRT")


def _worker_abort(reports) -> bool:
    failed = [r for r in reports if r.failed]
    return bool(failed) and all(all(s in str(r.longrepr) for s in _WORKER_ABORT) for r in failed)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    from _pytest.runner import runtestprotocol

    if item.get_closest_marker("slow") is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if _worker_abort(reports):
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[conftest] {item.nodeid}: a ddp_spawn worker aborted (SIGABRT); running it once more")
        item._initrequest()
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
