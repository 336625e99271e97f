"""lit_cascades.io: atomic writes, safe loading, config hashes and the cache root."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from lit_cascades import io


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "out.json"
    io.atomic_write_json(path, {"a": torch.tensor([1.5, 2.0]), "nan": math.nan, "inf": -math.inf, "p": Path("x")})
    assert json.loads(path.read_text()) == {"a": [1.5, 2.0], "nan": None, "inf": -1e308, "p": "x"}
    io.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.bin", "out.json", "sub"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "keep.txt"
    io.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_safe_load_round_trips_tensors_and_plain_containers(tmp_path):
    obj = {"x": torch.arange(4), "meta": {"k": [1, 2.5, "s", None, True]}, "t": (torch.ones(2),)}
    path = io.atomic_save(obj, tmp_path / "w.pt")
    back = io.safe_torch_load(path)
    assert torch.equal(back["x"], obj["x"]) and back["meta"] == obj["meta"] and torch.equal(back["t"][0], obj["t"][0])
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.safe_torch_load(tmp_path / "missing.pt")


RAN: list[str] = []


class _Payload:
    """Unpickling this object runs code (appends to RAN)."""

    def __reduce__(self):
        return (RAN.append, ("ran",))


class _Custom:
    def __init__(self) -> None:
        self.weights = torch.zeros(2)


@pytest.mark.parametrize("payload", [_Payload, _Custom], ids=["code", "custom-class"])
def test_safe_load_refuses_pickled_code_without_running_it(tmp_path, payload):
    path = tmp_path / "evil.pt"
    torch.save({"state": payload()}, path)
    RAN.clear()
    with pytest.raises(ValueError, match=r"evil\.pt: refusing to load"):
        io.safe_torch_load(path)
    assert RAN == []


def test_config_hash_is_stable_and_order_insensitive():
    a = {"lr": 1e-3, "layers": [2, 4], "name": "x", "t": torch.tensor(3)}
    b = {"t": torch.tensor(3), "name": "x", "layers": [2, 4], "lr": 1e-3}
    assert io.config_hash(a) == io.config_hash(b) and len(io.config_hash(a)) == 12
    assert io.config_hash({**a, "lr": 2e-3}) != io.config_hash(a)
    assert len(io.config_hash(a, length=20)) == 20


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(io.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert io.cache_root() == tmp_path / "xdg" / "lit_cascades"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert io.cache_root() == tmp_path / "home" / ".cache" / "lit_cascades"
    monkeypatch.setenv(io.CACHE_ENV, str(tmp_path / "mine"))
    assert io.cache_root() == tmp_path / "mine"
    d = io.cache_dir("token_streams", {"b": 1, "a": 2})
    assert d == tmp_path / "mine" / "token_streams" / io.config_hash({"a": 2, "b": 1}) and d.is_dir()
    assert io.cache_dir("plain") == tmp_path / "mine" / "plain"


def test_file_md5(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    assert io.file_md5(path, chunk=7) == hashlib.md5(b"abc" * 1000).hexdigest()
