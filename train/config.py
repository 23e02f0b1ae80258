"""Dataclass configs with dotted CLI overrides and named presets, shared by every training module.

A config is a dataclass whose fields are scalars or nested dataclasses (sections).  On the command line:

* ``--section.field VALUE`` sets a nested field (``--train.lr 1e-4``); ``--field VALUE`` a top-level one
  (``--max-iters 10``; dashes and underscores are interchangeable);
* ``--preset NAME`` starts from a named preset instead of the defaults; later flags override it;
* booleans take ``true/false/1/0/yes/no`` (a boolean option alone means ``true``: ``--overwrite``);
  tuples/lists take comma-separated values;
* ``--help`` lists every option with its default and help text.

Unknown options and malformed values are errors that name the option, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any, Callable

__all__ = [
    "ConfigError",
    "parse_cli",
    "cli_pairs",
    "to_dict",
    "from_dict",
    "format_help",
    "set_field",
    "leaf_values",
]


class ConfigError(ValueError):
    """A bad command-line option or config value."""


def _field_doc(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "") if f.metadata else ""


def _iter_fields(cfg, prefix=""):
    """Yield ``(dotted_name, field, owner, type)`` for every leaf field."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _iter_fields(value, prefix=f"{name}.")
        else:
            yield name, f, cfg, hints[f.name]


def leaf_values(cfg) -> dict[str, Any]:
    """``{dotted name: value}`` of every leaf field (``train.lr``, ``max_iters`` ...)."""
    return {name: getattr(owner, f.name) for name, f, owner, _ in _iter_fields(cfg)}


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(option: str, raw: str, tp) -> Any:
    tp, optional = _strip_optional(tp)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if origin in (tuple, list):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = [s.strip() for s in raw.split(",") if s.strip()]
            vals = [_convert(option, s, item_tp) for s in items]
            return tuple(vals) if origin is tuple else vals
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            if raw not in choices:
                raise ConfigError(f"{option}: expected one of {', '.join(map(str, choices))}, got {raw!r}")
            return raw
        if origin is dict or tp is dict:
            return json.loads(raw)
    except ConfigError:
        raise
    except (ValueError, json.JSONDecodeError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{option}: expected a value of type {name}, got {raw!r}") from None
    raise ConfigError(f"{option}: unsupported field type {tp}")


def _normalise(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def set_field(cfg, dotted: str, raw: str) -> None:
    """Set ``cfg.<dotted>`` from the string ``raw`` (converted to the field's type)."""
    leaves = {name: (f, owner, tp) for name, f, owner, tp in _iter_fields(cfg)}
    key = _normalise(dotted)
    if key not in leaves:
        close = [n for n in leaves if n.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
        raise ConfigError(f"--{dotted.lstrip('-')}: unknown option{hint}; see --help for the list")
    f, owner, tp = leaves[key]
    setattr(owner, f.name, _convert(f"--{dotted.lstrip('-')}", raw, tp))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) dataclass from ``to_dict`` output; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"config key {k!r}: not a field of {cls.__name__}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = from_dict(tp, v)
        elif typing.get_origin(_strip_optional(tp)[0]) is tuple and isinstance(v, list):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def _preset_in(argv: list[str]) -> str | None:
    """The last ``--preset NAME`` / ``--preset=NAME`` in ``argv`` (None without one)."""
    found = None
    for i, tok in enumerate(argv):
        if tok.startswith("--") and _normalise(tok.split("=", 1)[0]) == "preset":
            if "=" in tok:
                found = tok.split("=", 1)[1]
            elif i + 1 < len(argv):
                found = argv[i + 1]
    return found


def format_help(
    cfg, prog: str, description: str, presets: dict[str, Callable], shown: str | None = None
) -> str:
    """``--help``: every option with its value in ``cfg`` (the preset ``shown``, default the first one)."""
    shown = shown or next(iter(presets))
    lines = [f"usage: python -m {prog} [--preset NAME] [--option VALUE ...]", "", description, ""]
    lines.append(f"presets: {', '.join(presets)} (default: {next(iter(presets))})")
    lines.append("")
    lines.append(f"options (in brackets: the value under --preset {shown}):")
    for name, f, owner, _ in _iter_fields(cfg):
        default = getattr(owner, f.name)
        flag = "--" + name.replace("_", "-")
        lines.append(f"  {flag:<34} {_field_doc(f)} [{default}]")
    return "\n".join(lines)


def _bool_options(cfg) -> set[str]:
    return {name for name, _, _, tp in _iter_fields(cfg) if _strip_optional(tp)[0] is bool}


def cli_pairs(argv: list[str], *, flags: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``argv`` as ``(--option, raw value)`` pairs in order; an option in ``flags`` (boolean fields, dotted
    names) may stand alone, meaning ``true``."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"{tok!r}: expected an option of the form --name VALUE")
        if "=" in tok:
            key, val = tok.split("=", 1)
            i += 1
        elif _normalise(tok) in flags and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            key, val = tok, "true"
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{tok}: expected a value after it, got nothing")
            key, val = tok, argv[i + 1]
            i += 2
        pairs.append((key, val))
    return pairs


def parse_cli(cls, argv: list[str] | None, *, prog: str, description: str, presets: dict[str, Callable]):
    """Parse ``argv`` into an instance of ``cls``: ``--preset`` first, then every override in order."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        name = _preset_in(argv) or next(iter(presets))
        if name not in presets:
            raise ConfigError(f"--preset: expected one of {', '.join(presets)}, got {name!r}")
        cfg = presets[name]()
        if hasattr(cfg, "preset"):
            cfg.preset = name
        print(format_help(cfg, prog, description, presets, shown=name))
        raise SystemExit(0)
    pairs = cli_pairs(argv, flags=_bool_options(presets[next(iter(presets))]()))
    preset = next(iter(presets))
    rest = []
    for key, val in pairs:
        if _normalise(key) == "preset":
            preset = val
        else:
            rest.append((key, val))
    if preset not in presets:
        raise ConfigError(f"--preset: expected one of {', '.join(presets)}, got {preset!r}")
    cfg = presets[preset]()
    if hasattr(cfg, "preset"):
        cfg.preset = preset
    for key, val in rest:
        set_field(cfg, key, val)
    return cfg
