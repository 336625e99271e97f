"""Test helpers: multi-process (gloo) runs of plain functions, tiny data."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while a peer is still in a collective (see ReleaseProcessGroup)
    finally:
        dist.destroy_process_group()


def fit_steps_on_cpu(module: Any, datamodule: Any, devices: int, root: Any, max_steps: int = 3) -> dict[str, Any]:
    """Fit ``module`` for ``max_steps`` on CPU, ``ddp_spawn`` over ``devices`` processes when more than one (the
    datamodule shards its own data: no distributed sampler is added, no validation, no logs); returns a copy of
    ``module.model``'s state dict."""
    import lightning as L

    t = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices,
                  strategy="ddp_spawn" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                  limit_val_batches=0, use_distributed_sampler=False)
    t.fit(module, datamodule)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = ()) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined by a gloo process group.

    ``fn`` must be importable (defined at module top level). Returns the per-rank results, rank order.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


# a user's subclass, run through a recipe by `gatekeeper.module._target_=tests.helpers.DoctorGatekeeper`
from lit_cascades.modules import GatekeeperClassifier  # noqa: E402


class DoctorGatekeeper(GatekeeperClassifier):
    """Gatekeeper with a DOCTOR-style confidence: ``Σ_c p_c²`` (the Gini score's complement)."""

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1).pow(2).sum(-1)


# a user's post-hoc deferral rule, run through the lm_cascade recipe by
# `post_hoc.module._target_=tests.helpers.TemperedPostHocDeferral`
from lit_cascades.modules.lm_cascade import PostHocDeferral  # noqa: E402


class TemperedPostHocDeferral(PostHocDeferral):
    """Post-hoc rule whose deferral score is divided by a ``temperature`` (kept as a buffer, so it is saved
    with the weights: a run's ``model.pt`` shows that this class was built, with the configured value)."""

    def __init__(self, in_features: int, temperature: float = 1.0, **kwargs) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature: expected a value > 0; got {temperature}")
        super().__init__(in_features, **kwargs)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def deferral_score(self, features: torch.Tensor) -> torch.Tensor:
        return super().deferral_score(features) / self.temperature
