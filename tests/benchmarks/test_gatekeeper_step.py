"""benchmarks.gatekeeper_step: each side runs the implementation it names, and the phase breakdown times them all."""

from __future__ import annotations

import pytest
import torch

import lit_cascades.functional.gatekeeper as gk
from benchmarks.gatekeeper_step import PHASES, SETTINGS, gatekeeper_value, phase_times


def test_forced_paths_run_the_implementation_they_name_and_agree(monkeypatch):
    monkeypatch.setattr(gk, "_NATIVE", None)  # the default dispatch without a kernel: the NumPy path
    z = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (16,))
    names = {path: gatekeeper_value(z, y, path).grad_fn.name() for path in ("default", "numpy", "torch")}
    assert names["default"] == names["numpy"] == "_SmallGatekeeperBackward"
    assert names["torch"] != names["numpy"]
    values = [gatekeeper_value(z, y, path) for path in ("numpy", "torch")]
    torch.testing.assert_close(values[0], values[1])
    assert gk._NATIVE is None and gk.SMALL_MAX_ELEMENTS == 1 << 16  # forcing a path restores the dispatch


def test_phase_times_cover_every_phase_of_every_side(monkeypatch):
    monkeypatch.setattr(gk, "_NATIVE", None)
    arch, shape, batch, kwargs = SETTINGS["mlp_digits_b64"]
    out = phase_times(arch, shape, batch, kwargs, ("ce", "gatekeeper_numpy"), alternations=2, inner=2)
    assert set(out) == {"ce", "gatekeeper_numpy"}
    for side in out.values():
        assert tuple(side) == PHASES and all(t > 0 for t in side.values())


def test_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown loss path 'nope'"):
        gatekeeper_value(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), "nope")
