import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lit_cascades.runner import ConfigError, available_presets, load_config, main, run_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def test_presets_and_defaults():
    assert {"default", "smoke", "fashion_mnist", "cifar10", "cifar100"} <= set(available_presets(CONFIGS, "gatekeeper"))
    cfg, preset = load_config("gatekeeper", [], CONFIGS)
    assert preset == "default" and cfg.data.source == "digits" and cfg.trainer.accelerator == "auto"


def test_preset_then_overrides_win():
    cfg, preset = load_config(
        "gatekeeper", ["preset=fashion_mnist", "gatekeeper.alpha=0.3", "trainer.max_epochs=5", "output_dir=runs/x"],
        CONFIGS)
    assert preset == "fashion_mnist"
    assert cfg.data.source == "fashion_mnist" and cfg.gatekeeper.alpha == 0.3
    assert cfg.trainer.max_epochs == 5 and cfg.output_dir == "runs/x"
    assert cfg.gatekeeper.normalize == "batch"  # untouched keys keep the default


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'gatekeeper.alfa'.*valid keys under 'gatekeeper': "
                                          r"alpha, confidence, epochs, lr, normalize"):
        load_config("gatekeeper", ["gatekeeper.alfa=0.3"], CONFIGS)
    with pytest.raises(ConfigError, match="unknown config key 'nope'.*top level"):
        load_config("gatekeeper", ["nope=1"], CONFIGS)


def test_unknown_preset_wrong_type_and_malformed():
    with pytest.raises(ConfigError, match="unknown preset 'imagenet'.*available presets: cifar10"):
        load_config("gatekeeper", ["preset=imagenet"], CONFIGS)
    with pytest.raises(ConfigError, match="'gatekeeper.alpha' expects a float"):
        load_config("gatekeeper", ["gatekeeper.alpha=abc"], CONFIGS)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("gatekeeper", ["alpha"], CONFIGS)


def test_plus_adds_a_key():
    cfg, _ = load_config("gatekeeper", ["+large.kwargs.extra=3"], CONFIGS)
    assert cfg.large.kwargs.extra == 3


def test_help_lists_presets(capsys):
    def never(cfg, r):
        raise AssertionError("--help must not run the recipe")

    main("gatekeeper", never, ["--help"], config_dir=CONFIGS)
    out = capsys.readouterr().out
    assert "presets: cifar10, cifar100, default, fashion_mnist, smoke" in out and "alpha:" in out


def test_cli_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main("gatekeeper", lambda cfg, r: {}, ["gatekeeper.alfa=1"], config_dir=CONFIGS)
    assert exc.value.code == 2
    assert "valid keys under 'gatekeeper'" in capsys.readouterr().err


def test_outputs_are_written_only_on_success(tmp_path):
    def ok(cfg, r):
        return {"x": 1.0, "nested": {"y": float("nan")}}

    _r, _metrics = run_recipe("gatekeeper", ok, [f"output_dir={tmp_path / 'ok'}", "logger.wandb=false"], CONFIGS)
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text()) == {"x": 1.0, "nested": {"y": None}}
    assert OmegaConf.load(tmp_path / "ok" / "config.yaml").output_dir == str(tmp_path / "ok")

    def boom(cfg, r):
        r.save_json("partial", {"a": 1})
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        run_recipe("gatekeeper", boom, [f"output_dir={tmp_path / 'bad'}", "logger.wandb=false"], CONFIGS)
    assert not (tmp_path / "bad" / "metrics.json").exists()
    assert not list((tmp_path / "bad").glob(".*.tmp"))


def test_resume_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        run_recipe("gatekeeper", lambda c, r: {}, [f"resume={tmp_path / 'missing.ckpt'}"], CONFIGS)
