"""The runner: config composition and checks, exclusive run directories, stages, resume of a run directory."""

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lit_cascades.runner import ConfigError, available_presets, load_config, main, run_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
QUIET = ["logger.wandb=false"]


def test_presets_and_defaults():
    assert {"default", "smoke", "fashion_mnist", "cifar10", "cifar100"} <= set(available_presets(CONFIGS, "gatekeeper"))
    cfg, preset = load_config("gatekeeper", [], CONFIGS)
    assert preset == "default" and cfg.data.source == "fashion_mnist" and cfg.trainer.accelerator == "auto"
    assert list(cfg.sweep.seeds) == [0, 1, 2] and cfg.gatekeeper.module.alpha == 0.1
    cfg, preset = load_config("gatekeeper", ["preset=digits"], CONFIGS)
    assert preset == "digits" and cfg.data.source == "digits"
    assert cfg.gatekeeper.module._target_ == "lit_cascades.modules.GatekeeperClassifier"


def test_preset_then_overrides_win():
    cfg, preset = load_config(
        "gatekeeper", ["preset=fashion_mnist", "gatekeeper.module.alpha=0.3", "trainer.max_epochs=5",
                       "output_dir=runs/x"], CONFIGS)
    assert preset == "fashion_mnist"
    assert cfg.data.source == "fashion_mnist" and cfg.gatekeeper.module.alpha == 0.3
    assert cfg.trainer.max_epochs == 5 and cfg.output_dir == "runs/x"
    assert cfg.gatekeeper.module.normalize == "batch"  # untouched keys keep the default
    assert cfg.baseline.module.lr == cfg.gatekeeper.module.lr  # the baseline follows the Gatekeeper lr


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"^gatekeeper.module.alfa: unknown config key .*valid keys under "
                                          r"'gatekeeper.module': _target_, alpha, confidence, lr, native_kernel, normalize"):
        load_config("gatekeeper", ["gatekeeper.module.alfa=0.3"], CONFIGS)
    with pytest.raises(ConfigError, match="^nope: unknown config key.*top level"):
        load_config("gatekeeper", ["nope=1"], CONFIGS)


def test_unknown_preset_wrong_type_and_malformed():
    with pytest.raises(ConfigError, match="^preset: unknown preset 'imagenet'.*available presets: cifar10"):
        load_config("gatekeeper", ["preset=imagenet"], CONFIGS)
    with pytest.raises(ConfigError, match="^gatekeeper.module.alpha: expected a float"):
        load_config("gatekeeper", ["gatekeeper.module.alpha=abc"], CONFIGS)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("gatekeeper", ["alpha"], CONFIGS)


def test_threads_are_set_for_the_run_and_its_workers(tmp_path, monkeypatch):
    """``threads`` sets torch's count before the recipe body and exports OMP_NUM_THREADS for DDP workers;
    ``null`` leaves both alone."""
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = torch.get_num_threads()
    seen = {}

    def body(cfg, r):
        seen[cfg.threads] = (torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
        return {}

    try:
        torch.set_num_threads(1)
        run_recipe("gatekeeper", body, [f"output_dir={tmp_path / 'a'}", "threads=2", *QUIET], CONFIGS)
        run_recipe("gatekeeper", body, [f"output_dir={tmp_path / 'b'}", "threads=null", *QUIET], CONFIGS)
    finally:
        torch.set_num_threads(before)
    assert seen == {2: (2, "2"), None: (2, "2")}  # null: the count the process already had
    assert load_config("gatekeeper", [], CONFIGS)[0].threads == 1  # the default run repeats the README's table


def test_plus_adds_only_where_something_reads_it():
    cfg, _ = load_config("gatekeeper", ["+gatekeeper.module.weight_decay=0.1"], CONFIGS)
    assert cfg.gatekeeper.module.weight_decay == 0.1  # a constructor argument: GatekeeperClassifier checks it
    cfg, _ = load_config("gatekeeper", ["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
                                        "+callbacks.stop.monitor=val/loss"], CONFIGS)
    assert cfg.callbacks.stop.monitor == "val/loss"
    cfg, _ = load_config("gatekeeper", ["+small.model.extra.depth=2"], CONFIGS)  # inside an argument's mapping
    assert cfg.small.model.extra.depth == 2
    with pytest.raises(ConfigError, match="^gatekeeper.weight_decay: cannot add a key to section 'gatekeeper'"):
        load_config("gatekeeper", ["+gatekeeper.weight_decay=0.1"], CONFIGS)


def test_tilde_removes_an_argument_to_swap_a_class():
    cfg, _ = load_config("gatekeeper", ["large.model._target_=lit_cascades.models.MLP", "~large.model.width",
                                        "~large.model.depth", "~large.model.pool", "+large.model.hidden=[32]"],
                         CONFIGS)
    assert dict(cfg.large.model) == {"_target_": "lit_cascades.models.MLP", "hidden": [32]}
    with pytest.raises(ConfigError, match="^large.model.nope: cannot remove: no such key"):
        load_config("gatekeeper", ["~large.model.nope"], CONFIGS)
    with pytest.raises(ConfigError, match="^eval.rate: '~' removes arguments of a section with _target_ only"):
        load_config("gatekeeper", ["~eval.rate"], CONFIGS)


def test_help_lists_presets(capsys):
    def never(cfg, r):
        raise AssertionError("--help must not run the recipe")

    main("gatekeeper", never, ["--help"], config_dir=CONFIGS)
    out = capsys.readouterr().out
    assert "presets: cifar10, cifar100, default, digits, fashion_mnist, smoke" in out and "alpha:" in out
    assert "_target_" in out and "resume=<run dir>" in out


@pytest.mark.parametrize(("argv", "line"), [
    (["gatekeeper.module.alfa=1"], "error: gatekeeper.module.alfa: unknown config key"),
    (["trainer.precision=banana"], "error: trainer.precision: "),
    (["trainer.accelerator=cuda"], "error: trainer.accelerator: "),
    (["threads=0"], "error: threads: expected an integer >= 1 or null"),
    (["threads=two"], "error: threads: expected an int (default 1); got 'two'"),
])
def test_cli_error_is_one_line_and_exits_2(tmp_path, capsys, argv, line):
    with pytest.raises(SystemExit) as exc:
        main("gatekeeper", lambda cfg, r: {}, [*argv, f"output_dir={tmp_path / 'x'}"], config_dir=CONFIGS)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_outputs_are_written_only_on_success(tmp_path):
    def ok(cfg, r):
        return {"x": 1.0, "nested": {"y": float("nan")}}

    r, _ = run_recipe("gatekeeper", ok, [f"output_dir={tmp_path / 'ok'}", *QUIET], CONFIGS)
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k != "run"} == {"x": 1.0, "nested": {"y": None}}
    run = metrics["run"]
    assert run["run_id"] == r.run_id and run["recipe"] == "gatekeeper" and len(run["config_hash"]) == 12
    assert run["version"] and "git_commit" in run
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["status"] == "finished"
    assert OmegaConf.load(tmp_path / "ok" / "config.yaml").output_dir == str(tmp_path / "ok")

    def boom(cfg, r):
        st = r.stage("work")
        st.cached("partial", lambda: {"a": torch.ones(1)})
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        run_recipe("gatekeeper", boom, [f"output_dir={tmp_path / 'bad'}", *QUIET], CONFIGS)
    assert not (tmp_path / "bad" / "metrics.json").exists()
    assert json.loads((tmp_path / "bad" / "run.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "bad").rglob(".*.tmp*"))


def test_a_config_error_before_any_work_leaves_no_run_directory(tmp_path):
    from lit_cascades.runner import ConfigError as CE

    def bad(cfg, r):
        raise CE("expected one of ['a']; got 'b'", key="rule")

    with pytest.raises(CE):
        run_recipe("gatekeeper", bad, [f"output_dir={tmp_path / 'x'}", *QUIET], CONFIGS)
    assert not (tmp_path / "x").exists()


def test_a_run_directory_belongs_to_one_run(tmp_path):
    out = tmp_path / "run"
    run_recipe("gatekeeper", lambda c, r: {"x": 1}, [f"output_dir={out}", *QUIET], CONFIGS)
    with pytest.raises(ConfigError, match=r"^output_dir: .* is not empty.*resume="):
        run_recipe("gatekeeper", lambda c, r: {"x": 2}, [f"output_dir={out}", *QUIET], CONFIGS)
    assert json.loads((out / "metrics.json").read_text())["x"] == 1  # the first run's results are untouched


def test_a_second_process_cannot_take_a_live_run(tmp_path):
    out = tmp_path / "run"

    def inner(cfg, r):
        # while this run holds the lock, resuming it from "another run" is refused
        with pytest.raises(ConfigError, match=r"^output_dir: .* is in use by another run \(pid \d+\)"):
            run_recipe("gatekeeper", lambda c, r2: {}, [f"resume={out}"], CONFIGS)
        return {"ok": 1}

    run_recipe("gatekeeper", inner, [f"output_dir={out}", *QUIET], CONFIGS)


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    out = tmp_path / "run"
    run_recipe("gatekeeper", lambda c, r: {}, [f"output_dir={out}", "gatekeeper.module.alpha=0.3", *QUIET], CONFIGS)
    with pytest.raises(ConfigError, match=r"^resume: the configuration differs .* in: gatekeeper.module.alpha, "
                                          r"small.epochs"):
        run_recipe("gatekeeper", lambda c, r: {}, [f"resume={out}", "small.epochs=2"], CONFIGS)
    seen = {}

    def again(cfg, r):
        seen["alpha"], seen["resumed"] = cfg.gatekeeper.module.alpha, r.resumed
        return {}

    run_recipe("gatekeeper", again, [f"resume={out}"], CONFIGS)  # alone: the saved config
    assert seen == {"alpha": 0.3, "resumed": True}
    with pytest.raises(ConfigError, match="^resume: .* is not a run directory"):
        run_recipe("gatekeeper", lambda c, r: {}, [f"resume={tmp_path / 'missing'}"], CONFIGS)


def test_stage_layout_cached_and_weights_only(tmp_path):
    calls = []

    def recipe(cfg, r):
        st = r.stage("seed0/thing", kind="thing", config={"alpha": 0.5}, seed=3)
        out = st.cached("records", lambda: calls.append(1) or {"x": torch.arange(3)})
        st.save_table("t", ["a"], [[1], [2]])
        st.finish({"n": int(out["x"].sum())})
        return {"n": int(out["x"].sum())}

    out = tmp_path / "run"
    run_recipe("gatekeeper", recipe, [f"output_dir={out}", *QUIET], CONFIGS)
    st = out / "seed0" / "thing"
    assert OmegaConf.load(st / "config.yaml") == {"stage": "seed0/thing", "kind": "thing", "seed": 3, "alpha": 0.5}
    assert json.loads((st / "metrics.json").read_text()) == {"n": 3}
    assert (st / "t.csv").read_text().splitlines() == ["a", "1", "2"]
    run_recipe("gatekeeper", recipe, [f"resume={out}"], CONFIGS)
    assert calls == [1]  # the resumed run reloads the cached records

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, st / "records.pt")  # a tampered cache is refused, not executed
    with pytest.raises(ValueError, match="refusing to load"):
        run_recipe("gatekeeper", recipe, [f"resume={out}"], CONFIGS)


def _target_sections(node, key=""):
    """Every (dotted key, section) of a composed config whose section has a ``_target_``."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            yield from _target_sections(v, f"{key}.{k}" if key else str(k))


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
def test_every_preset_composes_and_names_only_arguments_its_classes_take(recipe):
    """A preset that swaps a class (gatekeeper cifar10: MLP -> CNN) must not hand the old class's arguments to the
    new one; every key of every ``_target_`` section is an argument of that class."""
    from lit_cascades.runner.config import _init_parameters, locate

    for preset in available_presets(CONFIGS, recipe):
        cfg, _ = load_config(recipe, [f"preset={preset}"], CONFIGS)
        for key, section in _target_sections(OmegaConf.to_container(cfg, resolve=False)):
            params, open_ = _init_parameters(locate(section["_target_"], key=key))
            unknown = [a for a in section if a not in ("_target_", "_partial_") and a not in params]
            assert open_ or not unknown, f"{recipe} preset={preset}: {key} passes {unknown} to {section['_target_']}"


def test_preset_swapping_a_class_replaces_the_section():
    cfg, _ = load_config("gatekeeper", ["preset=cifar10"], CONFIGS)
    assert cfg.small.model._target_ == "lit_cascades.models.CNN" and "hidden" not in cfg.small.model
    assert cfg.small.module.lr == 0.003 and cfg.data.limit_train is None  # sibling sections still merge
    cfg, _ = load_config("gatekeeper", ["preset=cifar10", "small.model.width=8"], CONFIGS)
    assert cfg.small.model.width == 8  # the replaced section still takes overrides


def test_a_run_releases_the_process_group_its_trainers_made_and_no_other(tmp_path):
    """strategy=ddp: a group created during the run is destroyed when the run succeeds (a process that exits with
    a live gloo group may abort); a group the caller made before the run is the caller's."""
    import torch.distributed as dist

    def make_group(name):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / name), 1), rank=0, world_size=1)

    try:
        run_recipe("gatekeeper", lambda cfg, r: make_group("during") or {}, [f"output_dir={tmp_path / 'a'}", *QUIET],
                   CONFIGS)
        assert not dist.is_initialized()
        make_group("before")
        run_recipe("gatekeeper", lambda cfg, r: {}, [f"output_dir={tmp_path / 'b'}", *QUIET], CONFIGS)
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
