"""The C++ Gatekeeper kernel: the default state (a cached build, never a compile), switched on and off, used by
the module, its float32 exp, and a clear error when it cannot be built. Its values and gradients are checked by
every Gatekeeper loss test (``gatekeeper_paths.LOSS_PATHS``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lit_cascades.functional.gatekeeper as gk
from lit_cascades.functional import use_native_kernel
from lit_cascades.functional._native import load_kernel
from lit_cascades.modules import GatekeeperClassifier
from tests.functional.gatekeeper_paths import native_kernel_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def restore_setting(monkeypatch):
    native_kernel_or_skip()  # builds the kernel once per machine
    monkeypatch.setattr(gk, "_NATIVE", None)  # each test starts with the setting off and leaves it so


def test_use_native_kernel_switches_the_small_path_on_and_off():
    z = torch.randn(8, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert gk.gatekeeper_loss(z, y).loss.grad_fn.name() == "_SmallGatekeeperBackward"
    use_native_kernel()
    assert gk.gatekeeper_loss(z, y).loss.grad_fn.name().endswith("GatekeeperFunction>")
    big = torch.randn(gk.SMALL_MAX_ELEMENTS // 4 + 1, 4, requires_grad=True)  # above the NumPy path's bound
    target = torch.zeros(len(big), dtype=torch.long)
    assert gk.gatekeeper_loss(big, target).loss.grad_fn.name().endswith("GatekeeperFunction>")  # every CPU size
    half = big.detach().bfloat16().requires_grad_(True)  # through float32, as the torch path
    out = gk.gatekeeper_loss(half, target).loss
    assert out.grad_fn.name().endswith("GatekeeperFunction>") and out.dtype == torch.float32
    out.backward()
    assert half.grad.dtype == torch.bfloat16
    use_native_kernel(False)
    assert gk._NATIVE is None
    assert gk.gatekeeper_loss(big, target).loss.grad_fn.name() == "AddBackward0"  # the fused torch path


def test_kernel_rejects_bad_input_with_the_checked_paths_messages():
    use_native_kernel()
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="out-of-range"):
        gk.gatekeeper_loss(z, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="ignore_index"):
        gk.gatekeeper_loss(z, torch.full((3,), -100))
    with pytest.raises(ValueError, match="finite"):
        gk.gatekeeper_loss(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):  # called directly, no classes: an error, not a read past each row
        gk.cpu_kernel().gatekeeper(torch.zeros(3, 0), torch.full((3,), -100), -100, 0.5, False)



def test_kernel_call_checks_every_argument_the_full_path_checks():
    """The kernel's call comes first in ``gatekeeper_loss``, with its checks inlined: each bad argument still
    raises the full path's error, and shapes it does not take (3-D, empty, no classes) still work or fail there."""
    use_native_kernel()
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            gk.gatekeeper_loss(z, y, alpha=alpha)
    with pytest.raises(ValueError, match="normalize"):
        gk.gatekeeper_loss(z, y, normalize="mean")
    with pytest.raises(ValueError, match="at least one class"):
        gk.gatekeeper_loss(torch.zeros(4, 0), y)
    with pytest.raises(ValueError, match="shape"):
        gk.gatekeeper_loss(z, y[:3])
    with pytest.raises(TypeError, match="integer"):
        gk.gatekeeper_loss(z, y.float())
    out = gk.gatekeeper_loss(z[None], y[None], alpha=0.3, normalize="subset")  # [B, T, V]: reshaped, then the kernel
    assert out.loss.grad_fn is None and torch.allclose(out.loss, gk.gatekeeper_loss(z, y, 0.3, "subset").loss)
    narrow = torch.tensor([0, 1, 2, 0], dtype=torch.int32)  # not int64: the checked paths
    assert torch.allclose(gk.gatekeeper_loss(z, narrow).loss, gk.gatekeeper_loss(z, y).loss)

def test_gatekeeper_module_turns_the_kernel_on_in_init_and_setup():
    module = GatekeeperClassifier(nn.Linear(4, 3), num_classes=3, native_kernel=True)
    assert gk._NATIVE is not None
    gk._NATIVE = None  # what a spawned worker process starts with
    module.setup("fit")
    assert gk._NATIVE is not None
    loss, parts = module.compute_loss(module(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1]))
    assert loss.grad_fn.name().endswith("GatekeeperFunction>") and set(parts) == {"loss_correct", "loss_incorrect",
                                                                          "error_rate"}


def test_a_failed_build_names_what_is_needed(monkeypatch):
    import torch.utils.cpp_extension as ext

    from lit_cascades.functional import _native

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "load", fail)
    monkeypatch.setattr(_native, "_LOADED", {})
    with pytest.raises(RuntimeError, match=r"could not build the native gatekeeper kernel: Ninja .* C\+\+ compiler"):
        load_kernel("gatekeeper")
    with pytest.raises(FileNotFoundError, match="no native kernel 'nope'"):
        load_kernel("nope")


def test_kernel_equals_the_numpy_path_on_strided_inputs_and_without_grad():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(12, 14, generator=g, dtype=torch.float64)
    target = torch.randint(0, 7, (12,), generator=g)
    target[::3] = wide[::3, ::2].argmax(-1)
    outs, grads = {}, {}
    for native in (False, True):
        use_native_kernel(native)
        leaf = wide.clone().requires_grad_(True)
        out = gk.gatekeeper_loss(leaf[:, ::2], target, alpha=0.3, normalize="subset")  # non-contiguous [12, 7]
        out.loss.backward()
        outs[native], grads[native] = out, leaf.grad
        with torch.no_grad():
            assert gk.gatekeeper_loss(leaf[:, ::2], target).loss.grad_fn is None
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads[True], grads[False])
    assert grads[True][:, 1::2].abs().sum() == 0  # the skipped columns get no gradient


def test_default_state_uses_the_cached_build_and_compiles_nothing(monkeypatch, tmp_path):
    from lit_cascades.functional import _native

    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    use_native_kernel(None)  # the state a process starts in
    assert gk._NATIVE == "auto"
    assert gk.gatekeeper_loss(z, y).loss.grad_fn.name().endswith("GatekeeperFunction>")  # built by the fixture
    monkeypatch.setattr(_native, "_LOADED", {})  # a fresh process: the build is loaded from the disk cache
    use_native_kernel(None)
    assert gk.gatekeeper_loss(z, y).loss.grad_fn.name().endswith("GatekeeperFunction>")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a machine without a build
    monkeypatch.setattr(_native, "_LOADED", {})
    use_native_kernel(None)
    assert gk.gatekeeper_loss(z, y).loss.grad_fn.name() == "_SmallGatekeeperBackward"
    assert gk._NATIVE is None  # resolved once per process
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing was compiled


def test_cached_kernel_ignores_missing_locked_and_broken_builds(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import LIB_EXT

    from lit_cascades.functional import _native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_LOADED", {})
    name = _native.build_name("gatekeeper")
    assert _native.cached_kernel("gatekeeper") is None  # no build
    library = tmp_path / name / f"{name}{LIB_EXT}"
    library.write_bytes(b"not a shared library")
    (tmp_path / name / "lock").touch()
    assert _native.cached_kernel("gatekeeper") is None  # a build in progress
    (tmp_path / name / "lock").unlink()
    with pytest.warns(UserWarning, match="could not be loaded"):
        assert _native.cached_kernel("gatekeeper") is None  # a broken build


def test_build_name_changes_with_the_torch_version_and_the_source(monkeypatch, tmp_path):
    from lit_cascades.functional import _native

    name = _native.build_name("gatekeeper")
    assert name.startswith("lit_cascades_gatekeeper_")
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert _native.build_name("gatekeeper") != name
    monkeypatch.undo()
    edited = tmp_path / "gatekeeper.cpp"
    edited.write_text(_native._source("gatekeeper").read_text() + "\n// edited\n")
    monkeypatch.setattr(_native, "_source", lambda kernel: edited)
    assert _native.build_name("gatekeeper") != name


def test_module_setting_none_true_false(monkeypatch):
    GatekeeperClassifier(nn.Linear(4, 3), num_classes=3, native_kernel=False)
    assert gk._NATIVE is None
    module = GatekeeperClassifier(nn.Linear(4, 3), num_classes=3)  # None: the process's setting stays as it is
    module.setup("fit")
    assert gk._NATIVE is None
    use_native_kernel(None)
    GatekeeperClassifier(nn.Linear(4, 3), num_classes=3).setup("fit")
    assert gk._NATIVE == "auto"
    with pytest.raises(ValueError, match="native_kernel"):
        GatekeeperClassifier(nn.Linear(4, 3), num_classes=3, native_kernel="yes")


def test_vector_exp_is_accurate_to_float32_rounding():
    """The kernel's branch-free float32 exp (of logits minus their row maximum) against float64 ``torch.exp``:
    within 2 float32 ulps from 0 down to -87, where it clamps (e^-87 ~ 1.6e-38, a probability of 0 in float32)."""
    use_native_kernel()
    kernel = gk.cpu_kernel()
    x = torch.cat([-torch.logspace(-8, math.log10(87), 200_003, dtype=torch.float64), torch.zeros(1)]).float()
    got, want = kernel.exp_nonpositive(x).double(), torch.exp(x.double())
    assert float(((got - want).abs() / want).max()) < 2 * 2.0**-23
    below = kernel.exp_nonpositive(torch.tensor([-87.0, -100.0, -1e4, -math.inf]))
    assert torch.all(below == below[0]) and 0 < float(below[0]) < 2e-38
