"""Configuration: compose a recipe's YAML files and ``key=value`` overrides, then build objects from them.

Composition (:func:`load_config`): ``configs/_base.yaml`` (keys every recipe has), ``configs/<name>/default.yaml``,
the chosen preset (which lists only what it changes; a preset section whose ``_target_`` names another class
replaces the default's section instead of merging into it, so the old class's arguments do not leak), config-group selections (``data=coco`` replaces section
``data`` by ``configs/<name>/data/coco.yaml``), then command-line ``key=value`` items. Unknown keys and values
whose type differs from the default's are rejected; ``+key=value`` adds a key on purpose and ``~key`` removes an
argument of a ``_target_`` section (to swap in a class that does not take it).

Building (:func:`build`): a section with ``_target_: package.module.Name`` is built by calling ``Name`` with the
section's other keys (nested ``_target_`` sections are built first). The constructor signature is the schema: a
key the constructor does not take, or a required argument left out, is a :class:`ConfigError` naming the key.
A value the constructor rejects (``ValueError``/``TypeError`` whose message starts with the argument name, the
library's convention) becomes a :class:`ConfigError` for ``<section>.<argument>``. Swapping ``_target_`` runs a
user's subclass: ``gatekeeper.module._target_=my_pkg.MyGatekeeper``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

TARGET = "_target_"
PARTIAL = "_partial_"
#: plain sections whose keys are a constructor's arguments all the same (``trainer`` -> ``lightning.Trainer``,
#: checked by building one before any work), so ``+trainer.<arg>=...`` is allowed
OPEN_SECTIONS = ("trainer",)


class ConfigError(ValueError):
    """A configuration value that does not fit: printed as ``error: <key>: <message>`` and exit status 2.

    Args:
        message: what is wrong and what is expected.
        key: the dotted config key at fault (``None`` when no single key is).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


# --------------------------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------------------------
def available_presets(config_dir: Path, name: str) -> list[str]:
    """Names of the presets of recipe ``name`` (the YAML files in ``config_dir/name``)."""
    return sorted(p.stem for p in (Path(config_dir) / name).glob("*.yaml"))


def _valid_keys_message(cfg: DictConfig, full_key: str) -> str:
    parent_key, _, _leaf = full_key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    except Exception:
        parent = None
    where = f"under '{parent_key}'" if parent_key else "at the top level"
    if isinstance(parent, DictConfig):
        return f"valid keys {where}: {', '.join(sorted(str(k) for k in parent.keys()))}"
    return f"'{parent_key}' is not a section"


def _check_types(default: Any, new: Any, path: str) -> None:
    """Reject overrides whose type does not fit the default's type (None accepts anything)."""
    if isinstance(default, DictConfig) and isinstance(new, DictConfig):
        for key in new.keys():
            if key in default:
                _check_types(default[key], new[key], f"{path}.{key}" if path else str(key))
        return
    if default is None or new is None:
        return
    if isinstance(default, bool):
        ok = isinstance(new, bool)
    elif isinstance(default, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(default, float):
        ok = isinstance(new, int | float) and not isinstance(new, bool)
    elif isinstance(default, ListConfig | list):
        ok = isinstance(new, ListConfig | list)
    elif isinstance(default, DictConfig):
        ok = isinstance(new, DictConfig)
    else:
        ok = True  # strings accept anything (paths, names)
    if not ok:
        kind = type(default).__name__
        raise ConfigError(f"expected {'an' if kind[0] in 'aeiou' else 'a'} {kind} (default {default!r}); got {new!r}",
                          key=path)


def _merge_strict(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    _check_types(cfg, other, "")
    try:
        return OmegaConf.merge(cfg, other)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        full_key = str(getattr(err, "full_key", None) or err)
        raise ConfigError(f"unknown config key (from {source}); {_valid_keys_message(cfg, full_key)}. "
                          "Use +key=value to add a new key on purpose.", key=full_key) from None


def _group_options(config_dir: Path, name: str, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / name / group).glob("*.yaml"))


def _is_group(config_dir: Path, name: str, key: str) -> bool:
    return "." not in key and (config_dir / name / key).is_dir()


def _select_group(cfg: DictConfig, config_dir: Path, name: str, group: str, option: Any) -> DictConfig:
    """Replace section ``group`` of ``cfg`` by ``configs/<name>/<group>/<option>.yaml``."""
    options = _group_options(config_dir, name, group)
    if not isinstance(option, str) or option not in options:
        raise ConfigError(f"unknown option {option!r} for config group; available: {', '.join(options)}", key=group)
    with open_dict(cfg):
        cfg[group] = OmegaConf.load(config_dir / name / group / f"{option}.yaml")
    return cfg


def _replace_swapped_classes(cfg: DictConfig, layer: DictConfig) -> None:
    """Sections of ``layer`` whose ``_target_`` differs from ``cfg``'s replace that section of ``cfg`` (in place)
    and are removed from ``layer``: a preset that swaps ``small.model`` from an MLP to a CNN must not pass the MLP's
    ``hidden`` to the CNN."""
    for key in list(layer.keys()):
        sub, old = layer[key], cfg.get(key) if isinstance(cfg, DictConfig) else None
        if not isinstance(sub, DictConfig) or not isinstance(old, DictConfig):
            continue
        if TARGET in sub and TARGET in old and sub[TARGET] != old[TARGET]:
            with open_dict(cfg):
                cfg[key] = sub
            del layer[key]
        else:
            _replace_swapped_classes(old, sub)


def _merge_layer(cfg: DictConfig, layer: DictConfig, config_dir: Path, name: str, source: str,
                 strict: bool = True) -> DictConfig:
    """Merge a config file: its group selections (``group: option``) first, then sections that swap a class
    (replaced whole), then the rest of its keys."""
    for key in [k for k in layer.keys() if _is_group(config_dir, name, str(k)) and isinstance(layer[k], str)]:
        cfg = _select_group(cfg, config_dir, name, str(key), layer[key])
        del layer[key]
    if strict:
        _replace_swapped_classes(cfg, layer)
    return _merge_strict(cfg, layer, source) if strict else OmegaConf.merge(cfg, layer)  # type: ignore[return-value]


def split_argv(argv: Sequence[str]) -> dict[str, str]:
    """``["a.b=1", "preset=x"] -> {"a.b": "1", "preset": "x"}``; a malformed item is a :class:`ConfigError`."""
    out = {}
    for item in argv:
        if item.startswith("~") and "=" not in item:  # ~key: remove an argument
            out[item] = ""
            continue
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r} (try --help)")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def load_config(name: str, argv: Sequence[str], config_dir: str | Path) -> tuple[DictConfig, str]:
    """Compose the configuration of recipe ``name`` from its files and ``argv`` (``key=value`` items).

    Returns ``(cfg, preset)``. Raises :class:`ConfigError` for an unknown preset or key, a malformed item
    or a value of the wrong type.
    """
    config_dir = Path(config_dir)
    presets = available_presets(config_dir, name)
    if "default" not in presets:
        raise ConfigError(f"recipe '{name}' has no configs/{name}/default.yaml in {config_dir}")
    preset, items, additions, groups, removals = "default", [], [], [], []
    for key, value in split_argv(argv).items():
        if key == "preset":
            preset = value
        elif key.startswith("~"):
            removals.append(key[1:])
        elif key.startswith("+"):
            additions.append((key[1:], value))
        elif _is_group(config_dir, name, key):
            groups.append((key, value))
        else:
            items.append(f"{key}={value}")
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for recipe '{name}'; available presets: {', '.join(presets)}",
                          key="preset")
    base_file = config_dir / "_base.yaml"
    cfg = OmegaConf.load(base_file) if base_file.exists() else OmegaConf.create()
    cfg = _merge_layer(cfg, OmegaConf.load(config_dir / name / "default.yaml"), config_dir, name, "default.yaml",
                       strict=False)
    OmegaConf.set_struct(cfg, True)
    if preset != "default":
        cfg = _merge_layer(cfg, OmegaConf.load(config_dir / name / f"{preset}.yaml"), config_dir, name,
                           f"preset '{preset}'")
    for key, value in groups:
        cfg = _select_group(cfg, config_dir, name, key, value)
    for key in removals:
        _remove(cfg, key)
    if items:
        cfg = _merge_strict(cfg, OmegaConf.from_dotlist(items), "the command line")
    for key, value in additions:
        _check_addition(cfg, key)
        OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"x={value}"]).x, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg, preset


def _remove(cfg: DictConfig, key: str) -> None:
    """``~key`` on the command line: drop an argument of a ``_target_`` section (to swap a class whose
    constructor does not take it: ``large.model._target_=pkg.MLP ~large.model.width``)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"cannot remove: no such key; {_valid_keys_message(cfg, key)}", key=key)
    if TARGET not in parent or leaf == TARGET:
        raise ConfigError(f"'~' removes arguments of a section with {TARGET} only", key=key)
    with open_dict(parent):
        del parent[leaf]


def _check_addition(cfg: DictConfig, key: str) -> None:
    """``+key=value`` may add an argument to a ``_target_`` section (its constructor then checks it) or an entry
    to an open mapping (a section that is empty by default, such as ``callbacks: {}``); a key added to a plain
    section would be read by nothing, so it is an error."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent_key = ".".join(parts[:depth])
        node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if node is None and depth:
            continue
        ancestors = [OmegaConf.select(cfg, ".".join(parts[:d])) if d else cfg for d in range(depth)]
        if isinstance(node, DictConfig) and (TARGET in node or len(node) == 0 or parts[depth] == TARGET
                                             or parent_key in OPEN_SECTIONS
                                             or any(isinstance(a, DictConfig) and TARGET in a for a in ancestors)):
            return  # a constructor argument, or an entry of a mapping argument (image_encoder_kwargs.norm)
        where = f"section '{parent_key}'" if parent_key else "the top level"
        raise ConfigError(f"cannot add a key to {where}: nothing would read it. '+' adds arguments to a section "
                          f"with {TARGET} (then its constructor checks them) or entries to an empty mapping; "
                          f"{_valid_keys_message(cfg, key if depth == len(parts) - 1 else parent_key + '.x')}",
                          key=key)


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs (added and removed keys included)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new), key=str)
        out: list[str] = []
        for k in keys:
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out += config_diff(old[k], new[k], path)
        return out
    return [] if old == new else [prefix or "<root>"]


# --------------------------------------------------------------------------------------------------------
# building objects from config
# --------------------------------------------------------------------------------------------------------
def locate(path: str, key: str | None = None) -> Any:
    """Import ``package.module.Name`` (or ``package.module:Name``) and return the object."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"expected an import path such as 'lit_cascades.modules.GatekeeperClassifier'; got {path!r}",
                          key=key)
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep:
        raise ConfigError(f"expected a dotted import path 'package.module.Name'; got {path!r}", key=key)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import module '{module_name}' for {path!r} ({err})", key=key) from None
    if not hasattr(module, attr):
        raise ConfigError(f"module '{module_name}' has no attribute '{attr}'", key=key)
    return getattr(module, attr)


def _init_parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters ``target`` accepts: a class's ``__init__`` followed through ``**kwargs`` up its
    bases (``SALT(**kwargs)`` forwards to ``CausalLM``). Returns ``(params, open)``; ``open`` is True when some
    ``**kwargs`` is not followed anywhere (any key accepted)."""
    chain = [c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)] if inspect.isclass(target) \
        else [target]
    params: dict[str, inspect.Parameter] = {}
    for fn in chain:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, True
        var_kw = False
        for p in sig.parameters.values():
            if p.name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.POSITIONAL_ONLY:
                params.setdefault(p.name, p)
        if not var_kw:
            return params, False
        if not inspect.isclass(target) or fn is object.__init__:
            return params, True
    return params, True


def check_arguments(target: Any, kwargs: Mapping[str, Any], key: str, provided: Sequence[str] = ()) -> None:
    """Check config ``kwargs`` (plus argument names the recipe ``provided``) against ``target``'s signature."""
    params, open_ = _init_parameters(target)
    name = getattr(target, "__qualname__", repr(target))
    for arg in kwargs:
        if arg in provided:
            raise ConfigError("set by the recipe (from the data or an earlier stage); remove it from the config",
                              key=f"{key}.{arg}")
        if arg not in params and not open_:
            valid = ", ".join(sorted(p for p in params if p not in provided))
            raise ConfigError(f"not an argument of {name}; valid arguments: {valid}", key=f"{key}.{arg}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty
               and p not in kwargs and p not in provided]
    if missing:
        raise ConfigError(f"{name} needs {', '.join(missing)}; set {', '.join(f'{key}.{m}' for m in missing)}",
                          key=key)


_FIRST_WORD = re.compile(r"^[`'\"]?([A-Za-z_][A-Za-z0-9_]*)[`'\"]?")


def _key_for_error(err: BaseException, key: str, names: Sequence[str]) -> str:
    """``<key>.<argument>`` when the message names one of ``names`` (first word, else a unique mention)."""
    msg = str(err)
    m = _FIRST_WORD.match(msg.strip())
    if m and m.group(1) in names:
        return f"{key}.{m.group(1)}"
    mentioned = [n for n in names if re.search(rf"\b{re.escape(n)}\b", msg, flags=re.IGNORECASE)]
    return f"{key}.{mentioned[0]}" if len(mentioned) == 1 else key


@contextlib.contextmanager
def config_errors(key: str, names: Sequence[str] = ()) -> Iterator[None]:
    """Turn a ``ValueError``/``TypeError``/``FileNotFoundError`` (or Lightning's ``MisconfigurationException``)
    raised inside into a :class:`ConfigError` for ``key`` (``key.<argument>`` when the message names one of
    ``names``)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, OSError) as err:
        raise ConfigError(" ".join(str(err).split()), key=_key_for_error(err, key, names)) from err
    except Exception as err:
        if type(err).__name__ != "MisconfigurationException":
            raise
        raise ConfigError(" ".join(str(err).split()), key=_key_for_error(err, key, names)) from err


def _container(node: Any) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def is_buildable(node: Any) -> bool:
    """Whether ``node`` is a config section with a ``_target_``."""
    return isinstance(node, Mapping | DictConfig) and TARGET in node


def build(node: Any, key: str, **provided: Any) -> Any:
    """Build the object described by config section ``node`` (``_target_`` plus constructor arguments).

    Args:
        node: a mapping with ``_target_``; nested mappings with ``_target_`` (also inside lists) are built first.
            ``_partial_: true`` returns a ``functools.partial`` (arguments checked now, called later).
        key: the section's dotted config key (for error messages).
        **provided: arguments the recipe supplies (from the data or an earlier stage: ``num_classes=10``,
            ``model=net``); setting one of them in the config is an error.

    Raises:
        ConfigError: unknown target, an argument the constructor does not take, a missing required argument,
            or a value the constructor rejects.
    """
    node = _container(node)
    if not is_buildable(node):
        raise ConfigError(f"expected a section with '{TARGET}: package.module.Name'; got {node!r}", key=key)
    kwargs = {k: v for k, v in node.items() if k not in (TARGET, PARTIAL)}
    target = locate(node[TARGET], key=f"{key}.{TARGET}")
    partial = bool(node.get(PARTIAL, False))
    if not partial:
        check_arguments(target, kwargs, key, provided=list(provided))
    else:
        params, open_ = _init_parameters(target)
        for arg in kwargs:
            if arg not in params and not open_:
                raise ConfigError(f"not an argument of {getattr(target, '__qualname__', target)}; valid arguments: "
                                  f"{', '.join(sorted(params))}", key=f"{key}.{arg}")
    kwargs = {k: _build_nested(v, f"{key}.{k}") for k, v in kwargs.items()}
    if partial:
        return functools.partial(target, **kwargs)
    with config_errors(key, names=list(kwargs)):
        return target(**provided, **kwargs)


def _build_nested(value: Any, key: str) -> Any:
    if is_buildable(value):
        return build(value, key)
    if isinstance(value, list):
        return [_build_nested(v, f"{key}.{i}") for i, v in enumerate(value)]
    return value


def build_list(nodes: Any, key: str) -> list[Any]:
    """Build every ``_target_`` section of a list or mapping of sections (e.g. ``callbacks``); ``None`` -> []."""
    nodes = _container(nodes)
    if not nodes:
        return []
    items = nodes.items() if isinstance(nodes, Mapping) else enumerate(nodes)
    return [build(v, f"{key}.{k}") for k, v in items if v is not None]


def target_name(node: Any) -> str:
    """The ``_target_`` of a section (or ``""``)."""
    return str(_container(node).get(TARGET, "")) if is_buildable(node) else ""
