"""Typed, frozen dataclass configs: defaults < YAML file < ``key=value`` overrides.

Every stage module defines one frozen dataclass whose fields carry their help text in
``metadata["help"]`` (see :func:`option`). :func:`load_config` builds it from a YAML file and
overrides, coerces and checks every value, runs the class's own ``problems()`` check, and raises
one :class:`ConfigError` that lists *every* problem at once.

A YAML file is either flat (the keys of one stage) or split into stage sections
(``mine:``, ``filter:``, ``train:`` ...), as the presets in ``jobs/`` are; a stage reads its own
section and ignores the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, TypeVar

import yaml

from octoray.errors import UserError
from octoray.storage.layout import STAGES

T = TypeVar("T")

#: Top-level keys that mark a YAML file as split into stage sections: the pipeline's, each stage's
#: that has a config (the report has none) and octoray submit's.
STAGE_SECTIONS = ("pipeline", *(stage for stage in STAGES if stage != "report"), "submit")

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: Sequence[str] | str, source: str = "config") -> None:
        # A lone message is one problem, not a sequence of characters to join.
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(f"invalid {source}: " + "; ".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling (Ray ships a trial's exception to the driver) rebuilds an exception from
        # ``self.args``, the joined message; rebuild from the problems instead.
        return (type(self), (self.problems, self.source))


def option(default: Any, help: str, metavar: str | None = None, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with its help text (shown by ``--help`` and in the docs) and the name of
    its value in ``--help`` (``metavar``, e.g. ``SFT_DIR``; default: from the type or the key)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default: configs are frozen")
    metadata = {"help": help, **({"metavar": metavar} if metavar else {})}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def is_override(arg: str) -> bool:
    """True for a ``key=value`` command-line override (``https://x?a=b`` is not one)."""
    return bool(_OVERRIDE.match(arg))


def split_overrides(args: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate positional arguments from ``key=value`` overrides, keeping their order."""
    positional, overrides = [], []
    for arg in args:
        (overrides if is_override(arg) else positional).append(arg)
    return positional, overrides


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["lr=1e-4", "tags=[a, b]"]`` -> ``{"lr": 1e-4, "tags": ["a", "b"]}`` (values are YAML)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            parsed[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            parsed[key] = raw  # an unparseable value is a plain string, checked by type later
    return parsed


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one
    silently, so a stray second ``train:`` would replace the whole section."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key '{key}' appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise UserError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def stage_section(data: Mapping[str, Any], section: str | None) -> dict[str, Any]:
    """The part of a (possibly sectioned) config mapping that belongs to ``section``."""
    if section is None or not any(key in STAGE_SECTIONS for key in data):
        return dict(data)
    value = data.get(section) or {}
    if not isinstance(value, dict):
        raise UserError(f"config section '{section}' must be a mapping")
    return dict(value)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    section: str | None = None,
    values: Mapping[str, Any] | None = None,
    check: Callable[[Any], list[str]] | None = None,
) -> T:
    """Build ``cls`` from defaults < the YAML file (its ``section``) < ``values`` < overrides.

    ``values`` carries what dedicated command-line flags set (``--out``, ``--data`` ...);
    ``None`` entries in it are ignored so unset flags keep the file's value. ``check`` adds
    problems that need more than this config (see :func:`from_mapping`).
    """
    layers = [stage_section(read_yaml(path), section)] if path is not None else []
    layers += [{k: v for k, v in (values or {}).items() if v is not None}, parse_overrides(overrides)]
    raw: dict[str, Any] = {}
    renaming: list[str] = []
    for layer in layers:  # deprecated names are renamed per layer, so a later layer still wins
        renamed, problems = _renamed(cls, layer)
        raw.update(renamed)
        renaming += problems
    source = f"config {path}" if path is not None else "config"
    return from_mapping(cls, raw, source=source, check=lambda cfg: renaming + (check(cfg) if check else []))


def from_mapping(cls: type[T], raw: Mapping[str, Any], source: str = "config",
                 check: Callable[[Any], list[str]] | None = None) -> T:
    """Coerce and check ``raw`` into ``cls``; raise one ConfigError with every problem.

    ``check(cfg)`` returns further problems that involve other configs (a search space against
    the training budget), so they are reported together with this config's own.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    raw, problems = _renamed(cls, raw)
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{key}'{hint}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    # Check the well-typed values too, so one run reports unknown keys, bad types and bad
    # combinations together.
    cfg = cls(**kwargs)
    own = getattr(cfg, "problems", None)
    if callable(own):
        problems.extend(own())
    if check is not None:
        problems.extend(p for p in check(cfg) if p not in problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def key_aliases(cls: type) -> dict[str, str]:
    """Deprecated key -> current key of ``cls`` (its ``KEY_ALIASES`` class attribute, if any)."""
    return dict(getattr(cls, "KEY_ALIASES", {}))


def _renamed(cls: type, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with deprecated keys renamed (old YAML files and command lines keep loading)."""
    aliases = key_aliases(cls)
    renamed: dict[str, Any] = {}
    problems = []
    for key, value in raw.items():
        new = aliases.get(key, key)
        if new != key and new in raw:
            problems.append(f"'{key}' is the deprecated name of '{new}': give one of them")
            continue
        renamed[new] = value
    return renamed, problems


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON-able data (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _coerce(value: Any, hint: Any) -> Any:
    """Convert a YAML value to the annotated type, or raise ValueError saying what was expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "5e-4" (no dot) as a string
                except ValueError:
                    pass
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"expected a path, got {value!r}")
        return Path(value)
    raise ValueError(f"unsupported config type {hint!r}")
