"""Config groups: ``data=coco`` replaces the ``data`` section by ``configs/<recipe>/data/coco.yaml``."""

from __future__ import annotations

import pytest

from lit_cascades.runner import ConfigError, load_config, main


@pytest.fixture
def configs(tmp_path):
    root = tmp_path / "configs"
    (root / "toy" / "data").mkdir(parents=True)
    (root / "_base.yaml").write_text("seed: 0\n")
    (root / "toy" / "default.yaml").write_text("data: small\nmodel: {width: 8}\n")
    (root / "toy" / "data" / "small.yaml").write_text("source: small\nsize: 10\n")
    (root / "toy" / "data" / "big.yaml").write_text("source: big\nroot: null\nsize: 1000\n")
    (root / "toy" / "real.yaml").write_text("data: big\nmodel: {width: 64}\n")
    return root


def test_default_file_selects_a_group(configs):
    cfg, _ = load_config("toy", [], configs)
    assert cfg.data == {"source": "small", "size": 10} and cfg.model.width == 8


def test_command_line_replaces_the_section_then_overrides_apply(configs):
    cfg, _ = load_config("toy", ["data=big", "data.root=/x", "data.size=5"], configs)
    assert dict(cfg.data) == {"source": "big", "root": "/x", "size": 5}
    with pytest.raises(ConfigError, match="^data.root: unknown config key.*valid keys under 'data': size, source"):
        load_config("toy", ["data.root=/x"], configs)  # the small group has no root


def test_preset_selects_a_group(configs):
    cfg, preset = load_config("toy", ["preset=real"], configs)
    assert preset == "real" and cfg.data.source == "big" and cfg.model.width == 64
    cfg, _ = load_config("toy", ["preset=real", "data=small"], configs)  # the command line wins
    assert cfg.data.source == "small" and cfg.model.width == 64


def test_unknown_option_lists_the_available_ones(configs):
    with pytest.raises(ConfigError, match="^data: unknown option 'huge' for config group; available: big, small"):
        load_config("toy", ["data=huge"], configs)


def test_help_lists_groups(configs, capsys):
    main("toy", lambda cfg, r: {}, ["--help"], config_dir=configs)
    out = capsys.readouterr().out
    assert "data=big|small  (config group)" in out and "source: small" in out
