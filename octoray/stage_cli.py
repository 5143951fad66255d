"""The command line of every stage verb, generated from the stage's config dataclass.

    octoray VERB [INPUT ...] [CONFIG.yaml] [-c CONFIG.yaml] [--key value ...] [key=value ...]

* Every config field is a flag (``--n-samples 5``, ``--n_samples 5`` too) and a key
  (``n_samples=5``), with the field's help and default shown by ``--help``. Values are read as
  YAML, exactly like the values of a config file or of ``key=value`` (``--tasks fix,explain``,
  ``--resources '{fake_gpu: 1}'``). A bool field is a switch: ``--lora`` / ``--no-lora``
  (or ``lora=false``).
* The config file is ``-c FILE`` (``--config FILE``), or a positional word ending in ``.yaml`` or
  ``.yml``. A file split into stage sections (``jobs/*.yaml``) gives the verb's section.
* Other positional words fill the stage's input field (``INPUT``: mine ``sources``, filter
  ``commits``, serve ``model``).
* Precedence: defaults < the config file < positional inputs < flags and ``key=value``. Flags and
  ``key=value`` words are one layer: when a key is given twice, the last one on the line wins.
* ``SECTION.key=value`` sets a key of another section, for verbs that read several (``NESTED``:
  tune reads ``train.``, the pipeline every stage's).

A stage module provides ``CONFIG`` (its config dataclass), ``INPUT`` (the field positional words
fill, or None) and ``run(cfg)``; optionally ``FLAG_ALIASES`` (flags kept for old command lines),
``NESTED`` and ``load(path, overrides, nested, *, values, check_inputs)`` when its config needs more than its
own section (tune, pipeline). A config's ``input_problems()`` checks the inputs a stage reads when
run by itself; the pipeline creates them as it goes, so they are not part of ``problems()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

from octoray.config import is_override, key_aliases, load_config
from octoray.errors import UserError

#: verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "mine": ("octoray.data.mining", "mine git repositories into CommitPack rows (Ray Data)"),
    "filter": ("octoray.data.filtering", "filter CommitPack rows into CommitPackFT instruction data (Ray Data)"),
    "train": ("octoray.training.driver", "fine-tune a causal LM with Ray Train + DeepSpeed"),
    "tune": ("octoray.training.tuning", "search training hyperparameters with Ray Tune"),
    "serve": ("octoray.serving.app", "serve a model on Ray Serve behind an OpenAI-compatible API"),
    "eval": ("octoray.evaluation.stage", "run HumanEvalPack: generate, execute in the sandbox, pass@k"),
    "plan": ("octoray.training.plan", "memory per GPU, fit, time and cost of a training config, before launch"),
    "lineage": ("octoray.storage.lineage", "the chain from a stage's output back to its source repositories: configs, fingerprints"),
    "pipeline": ("octoray.pipeline.run", "run mine -> filter -> train -> serve -> eval -> report, resuming"),
    "submit": ("octoray.cluster.jobs_client", "submit the pipeline or a stage to a Ray cluster as a Ray Job"),
    "status": ("octoray.cluster.jobs_client", "show the status of a submitted Ray Job"),
    "logs": ("octoray.cluster.jobs_client", "print the logs of a submitted Ray Job"),
    "stop": ("octoray.cluster.jobs_client", "stop a submitted Ray Job"),
}
#: Verbs whose command line comes from their config dataclass (see octoray.stage_cli).
STAGE_VERBS = ("mine", "filter", "train", "tune", "serve", "eval", "pipeline")

CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class FlagAlias:
    """A flag kept for old command lines: ``--data-dir X`` sets ``humanevalpack_dir=X``."""

    flag: str
    key: str
    template: str = "{}"  # the key's value, from the flag's
    deprecated: bool = True


@dataclass(frozen=True)
class Parsed:
    """A parsed stage command line."""

    configs: tuple[Any, ...]  # the arguments of the stage's ``run``; configs[0] is the verb's own config


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (a UserError), like every other error."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


class _Set(argparse.Action):
    """Record ``key=value`` in command-line order (flags and key=value words share one list)."""

    def __init__(self, *args: Any, key: str | None = None, template: str = "{}", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key, self.template = key, template

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        settings = list(getattr(namespace, "settings", None) or [])
        if self.key is None:  # a key=value word
            settings.append(values)
        elif self.nargs == 0:  # a bool switch
            negative = (option_string or "").replace("_", "-") == f"--no-{self.key.replace('_', '-')}"
            settings.append(f"{self.key}={'false' if negative else 'true'}")
        else:
            settings.append(f"{self.key}={self.template.format(values)}")
        namespace.settings = settings


def build_parser(verb: str, module: ModuleType, description: str = "") -> tuple[argparse.ArgumentParser, set[str]]:
    """The parser of ``octoray VERB`` and the option strings that take a value."""
    cls = module.CONFIG
    parser = Parser(prog=f"octoray {verb}", description=description, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=_epilog(verb, module))
    takes_value: set[str] = {"-c", "--config"}
    inputs = f"{module.INPUT.upper()}|" if module.INPUT else ""
    parser.add_argument("words", nargs="*", metavar=f"{inputs}CONFIG.yaml|key=value",
                        help=(f"{module.INPUT} (the stage's input), " if module.INPUT else "")
                        + "a config file (*.yaml, *.yml), key=value settings")
    parser.add_argument("-c", "--config", metavar="CONFIG.yaml",
                        help=f"YAML config: flat, or its '{verb}:' section (same as a positional CONFIG.yaml)")
    parser.add_argument("--set", dest="settings", action=_Set, metavar="KEY=VALUE", help=argparse.SUPPRESS)
    takes_value.add("--set")
    takes_value |= add_config_flags(
        parser, cls, f"config keys (--key-name VALUE or --key_name VALUE, or key_name=VALUE, or the '{verb}:' "
                     "section of CONFIG.yaml; the last one given wins)", getattr(module, "FLAG_ALIASES", ()))
    return parser, takes_value


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str,
                     aliases: Sequence[FlagAlias] = ()) -> set[str]:
    """A flag per field of ``cls`` (and the ``aliases``), each recording ``key=value`` in
    ``namespace.settings`` in command-line order; returns the option strings that take a value."""
    takes_value: set[str] = set()
    keys = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        dashed = field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if "(default" not in help_text:
            help_text += f" (default: {_show(field.default)})"
        is_bool = hints[field.name] is bool
        kind: dict[str, Any] = ({"nargs": 0} if is_bool else
                                {"metavar": field.metadata.get("metavar") or _type_name(hints[field.name], field.name)})
        shown = [f"--{dashed}", *([f"--no-{dashed}"] if is_bool else [])]
        keys.add_argument(*shown, dest="settings", action=_Set, key=field.name, help=help_text.replace("%", "%%"), **kind)
        hidden = [f"--{field.name}", *([f"--no_{field.name}"] if is_bool else [])]
        hidden = [flag for flag in hidden if flag not in shown]  # --n_samples works like --n-samples
        if hidden:
            keys.add_argument(*hidden, dest="settings", action=_Set, key=field.name, help=argparse.SUPPRESS, **kind)
        if not is_bool:
            takes_value.update(shown + hidden)
    if aliases:
        group = parser.add_argument_group("aliases")
        for alias in aliases:
            same = f"--{alias.key.replace('_', '-')} {alias.template.format('VALUE')}"
            note = "deprecated: " if alias.deprecated else ""
            group.add_argument(alias.flag, dest="settings", action=_Set, key=alias.key, template=alias.template,
                               metavar="VALUE", help=f"{note}same as {same}")
            takes_value.add(alias.flag)
    return takes_value


def parse(verb: str, argv: Sequence[str], module: ModuleType, *, check_inputs: bool = True,
          description: str = "") -> Parsed:
    """Parse ``octoray VERB ARGV`` into the stage's config(s); one UserError lists what is wrong.

    ``check_inputs`` False skips the config's ``input_problems()`` (tests that parse documented
    command lines whose inputs do not exist here).
    """
    parser, takes_value = build_parser(verb, module, description)
    args = parser.parse_intermixed_args(_mark_settings(argv, takes_value))
    positional = list(args.words)  # key=value words went to args.settings (see _mark_settings)
    overrides = list(args.settings or [])
    path = args.config
    files = [w for w in positional if w.lower().endswith(CONFIG_SUFFIXES)]
    if files:
        if path is not None or len(files) > 1:
            raise UserError(f"give one config file, got {', '.join([*([path] if path else []), *files])}")
        path = files[0]
        positional.remove(path)
    own, nested = _route(verb, module, overrides)
    values = _inputs(verb, module, positional)
    if hasattr(module, "load"):
        configs = module.load(path, own, nested, values=values, check_inputs=check_inputs)
    else:
        configs = (load_config(module.CONFIG, path, own, section=verb, values=values,
                               check=input_check(check_inputs)),)
    return Parsed(configs=tuple(configs))


def main(verb: str, module: ModuleType, argv: Sequence[str], description: str = "") -> int:
    """Run ``octoray VERB ARGV``: parse, then the stage's ``run``."""
    module.run(*parse(verb, argv, module, description=description).configs)
    return 0


def input_check(check_inputs: bool) -> Callable[[Any], list[str]] | None:
    """The ``check`` for :func:`octoray.config.load_config` that runs a config's ``input_problems()``."""
    if not check_inputs:
        return None
    return lambda cfg: cfg.input_problems() if hasattr(cfg, "input_problems") else []


def _mark_settings(argv: Sequence[str], takes_value: set[str]) -> list[str]:
    """``key=value`` words become ``--set key=value``, so flags and keys keep their relative order.

    A word that is the value of the flag before it (``--env A=B``) is left alone.
    """
    marked: list[str] = []
    previous = ""
    for i, word in enumerate(argv):
        if word == "--":  # the rest is positional, as argparse reads it
            return marked + list(argv[i:])
        if is_override(word) and previous not in takes_value:
            marked += ["--set", word]
        else:
            marked.append(word)
        previous = word if word.startswith("-") and "=" not in word else ""
    return marked


def _route(verb: str, module: ModuleType, overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split ``SECTION.key=value`` (for the verb's ``NESTED`` sections) from its own keys."""
    sections = getattr(module, "NESTED", ())
    own: list[str] = []
    nested: dict[str, list[str]] = {}
    for item in overrides:
        key = item.split("=", 1)[0]
        if "." not in key or not sections:
            own.append(item)
            continue
        section, rest = item.split(".", 1)
        if section not in sections:
            raise UserError(f"'{item}': unknown section '{section}' (choose from {', '.join(sections)})")
        nested.setdefault(section, []).append(rest)
    return own, nested


def _inputs(verb: str, module: ModuleType, positional: list[str]) -> dict[str, Any]:
    """The input field's value from the positional words."""
    field = module.INPUT
    if field is None:
        if positional:
            raise UserError(f"unexpected argument(s): {' '.join(positional)} (octoray {verb} takes a CONFIG.yaml "
                            "and key=value settings)")
        return {}
    if not positional:
        return {}
    hint = typing.get_type_hints(module.CONFIG)[field]
    if typing.get_origin(hint) in (tuple, list):
        return {field: list(positional)}
    if len(positional) > 1:
        raise UserError(f"expected one {field.upper()}, got {len(positional)}: {' '.join(positional)}")
    return {field: positional[0]}


def _epilog(verb: str, module: ModuleType) -> str:
    lines = ["Precedence: defaults < CONFIG.yaml < positional inputs < flags and key=value (the last one wins)."]
    sections = getattr(module, "NESTED", ())
    if sections:
        lines.append(f"SECTION.key=value sets a key of another section ({', '.join(sections)}).")
    renamed = key_aliases(module.CONFIG)
    if renamed:
        lines.append("Deprecated keys (still read): " + ", ".join(f"{old} -> {new}" for old, new in renamed.items()))
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def _type_name(hint: Any, name: str) -> str:
    """How ``--help`` names a value: its choices, its kind (INT, LIST ...), or for a string the key."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    if origin in (tuple, list):
        return "LIST"
    if origin is dict or hint is dict:
        return "MAPPING"
    if args and origin is not None:  # Optional[X] / X | None
        return _type_name(args[0], name)
    return {int: "INT", float: "NUMBER", bool: "BOOL"}.get(hint, name.upper())
