"""What every verb shares: options declared once (:class:`Option`), added to argparse and used to
convert a ``--config`` TOML value alike; verbs (:class:`Verb`) built into one parser; options
from an argument dataclass's fields; the TOML file read into parser defaults."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checks import first_line


class CLIError(ValueError):
    """A bad option or input; the message names the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors in one line (no usage block): exit 2, the problem and where to
    look."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argparse types --------------------------------------------------------------------------------

def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` above zero (a finite one)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
        return value
    return parse


def fraction(text: str, strict: bool = False) -> float:
    """An argparse type: a number from 0 to 1 (``strict``: strictly between them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < 1 if strict else 0 <= value <= 1):
        raise argparse.ArgumentTypeError(
            f"{text} must be a number {'strictly between 0 and 1' if strict else 'from 0 to 1'}")
    return value


def share(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (a part, neither none nor all)."""
    return fraction(text, strict=True)


def count_or_all(text: str) -> int | None:
    """An argparse type: a count above zero, or ``all`` (None)."""
    return None if text.lower() == "all" else positive(int)(text)


def optional(kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind``, or ``none`` (None)."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__      # argparse names the type in "invalid int value"
    return parse


# -- options, declared once ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One option: the parser adds it as ``--name`` (``max_len`` → ``--max-len``) and a
    ``--config`` value is converted through the same declaration.

    name:    the namespace attribute; the flag is its dashed spelling
    help:    the --help text
    type:    text → value (raises ValueError / ArgumentTypeError); None: the text itself
    default: the value when neither the flag nor the config file gives one
    choices: the values allowed, if only a few
    metavar: the placeholder in --help
    nargs:   "+" for a list of values; 2 for a pair (with ``repeat``)
    switch:  a --name / --no-name pair (the value is a bool)
    repeat:  the flag may be repeated, each time appending its values
    """
    name: str
    help: str | None = None
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Sequence[Any] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None
    switch: bool = False
    repeat: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def argument(self) -> tuple[str, dict[str, Any]]:
        """(flag, keywords) for ``add_argument``."""
        # argparse %-formats help (for %(default)s): a docstring's "0.4 %" must stay text
        kw: dict[str, Any] = dict(dest=self.name, default=self.default,
                                  help=self.help and self.help.replace("%", "%%"))
        if self.switch:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=self.type, choices=self.choices, metavar=self.metavar,
                      nargs=self.nargs, action="append" if self.repeat else "store")
        return self.flag, kw

    def convert(self, value: Any, where: str) -> Any:
        """A TOML value checked and converted as the flag would be on the command line (type,
        range, choices); a mismatch is a :class:`CLIError` naming ``where``."""
        if self.switch:
            if not isinstance(value, bool):
                raise CLIError(f"{where} = {value!r} must be true or false (like {self.flag})")
            return value
        if self.nargs is None:
            return self._one(value, where)
        items = value if isinstance(value, list) else [value]
        if self.repeat:                                      # --query PROMPT COMPLETION
            if not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                       for v in items):
                raise CLIError(f"{where} must be a list of [prompt, completion] string pairs")
            return [list(v) for v in items]
        if not all(isinstance(v, str) for v in items):       # --layers
            raise CLIError(f"{where} = {value!r} must be a string or a list of strings "
                           f"(like {self.flag})")
        return [self._one(v, where) for v in items]

    def _one(self, value: Any, where: str) -> Any:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise CLIError(f"{where} = {value!r} is not a value {self.flag} takes")
        if self.type is None and not isinstance(value, str):
            raise CLIError(f"{where} = {value!r} must be a string (like {self.flag})")
        try:
            converted = self.type(str(value)) if self.type else value
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise CLIError(f"{where} = {value!r} is not valid for {self.flag} ({first_line(e)})"
                           ) from None
        if self.choices is not None and converted not in self.choices:
            raise CLIError(f"{where} = {converted!r} must be one of "
                           f"{', '.join(map(str, self.choices))}")
        return converted


@dataclasses.dataclass(frozen=True)
class Group:
    """Options listed together in --help under ``title`` (None: the verb's own "options")."""
    title: str | None
    options: tuple[Option, ...]

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        target = parser.add_argument_group(self.title) if self.title else parser
        for option in self.options:
            flag, kw = option.argument()
            target.add_argument(flag, **kw)


@dataclasses.dataclass(frozen=True)
class Verb:
    """A subcommand: its options, what must be given, and what it runs (or its own
    subcommands, ``validate tail-patch | lds``).

    name:     the word on the command line
    help:     one line in ``influence-nb --help``
    options:  () → its option groups, in --help order (a function: the argument dataclasses
              import torch only when the parser is built)
    run:      (namespace, rank, world) → the summary printed as JSON (None: print nothing)
    required: options that must come from a flag or the config file
    config:   whether --config FILE.toml sets its options
    checks:   subcommands under this one (then ``run`` is theirs)
    """
    name: str
    help: str
    options: Callable[[], list[Group]] = list
    run: Callable[[argparse.Namespace, int, int], dict | None] | None = None
    required: tuple[str, ...] = ()
    config: bool = False
    checks: tuple[Verb, ...] = ()

    def declared(self) -> dict[str, Option]:
        """{name: option} over all its groups."""
        return {o.name: o for group in self.options() for o in group.options}


def add_verbs(parser: argparse.ArgumentParser, verbs: Sequence[Verb], dest: str,
              defaults: dict[str, dict[str, Any]], above: str = "") -> None:
    """A subparser per verb (its checks nested under it, named by ``dest="check"``), with
    ``defaults[command]`` (from --config; the command is the verb's words, "validate lds")
    over the declared defaults; the namespace's ``verb`` says which verb runs."""
    sub = parser.add_subparsers(dest=dest, required=True)
    for verb in verbs:
        child = sub.add_parser(verb.name, help=verb.help)
        command = f"{above} {verb.name}".strip()
        if verb.checks:
            add_verbs(child, verb.checks, "check", defaults, command)
            continue
        for group in verb.options():
            group.add_to(child)
        child.set_defaults(verb=verb, words=command, **defaults.get(command, {}))


def readers(verbs: Sequence[Verb], above: str = "") -> dict[str, Verb]:
    """{command: verb} of every verb that reads --config, nested ones named by their words
    ("validate tail-patch")."""
    out: dict[str, Verb] = {}
    for verb in verbs:
        command = f"{above} {verb.name}".strip()
        out |= readers(verb.checks, command) if verb.checks else (
            {command: verb} if verb.config else {})
    return out


# -- options from argument dataclasses -------------------------------------------------------------

def field_docs(doc: str) -> dict[str, str]:
    """{field: help} from a dataclass docstring's ``name: text`` lines and the deeper-indented
    lines continuing them (indentation relative to the docstring's own)."""
    docs: dict[str, str] = {}
    name = None
    for line in inspect.cleandoc(doc).splitlines():
        text, indented = line.strip(), line[:1].isspace()
        head, colon, rest = text.partition(":")
        if not indented and colon and head.isidentifier():
            name, docs[head] = head, rest.strip()
        elif name and indented and text:
            docs[name] += " " + text
        else:
            name = None
    return docs


def fields(cls: type, prefix: str = "", skip: Sequence[str] = ("progress",)) -> Group:
    """An option ``--[prefix]field-name`` per field of dataclass ``cls`` (help from its
    docstring, default from its field): the CLI never restates the API's defaults."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls.__doc__ or "")
    options = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, kw = hints[f.name], {}
        args = typing.get_args(hint)
        if hint is bool:
            kw["switch"] = True
        elif any(typing.get_origin(a) is Sequence for a in args):
            kw.update(nargs="+", metavar="NAME")       # layers: a preset or module names
        elif type(None) in args:
            kw["type"] = optional(next(a for a in args if a is not type(None)))
        else:
            kw["type"] = hint
        options.append(Option(prefix + f.name, f"{docs.get(f.name, '')} (default: {f.default})",
                              default=f.default, **kw))
    return Group(f"{cls.__name__} (see {cls.__module__})", tuple(options))


def make(cls: type, ns: argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    """An instance of dataclass ``cls`` from the options :func:`fields` declared (a field
    without an option, or in ``fixed``, takes its default or the fixed value)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed or not hasattr(ns, prefix + f.name):
            continue
        v = getattr(ns, prefix + f.name)
        values[f.name] = v[0] if isinstance(v, list) and len(v) == 1 else v
    return cls(**values, **fixed)


# -- the config file -------------------------------------------------------------------------------

def config_defaults(argv: Sequence[str], verbs: Sequence[Verb]) -> dict[str, dict[str, Any]]:
    """{command: {option: value}} from the ``--config FILE.toml`` in ``argv``, for the verb
    ``argv`` names if it reads one: the file's top-level keys that the verb has, then its own
    table (``[fit]``; a nested verb's ``[validate.tail-patch]``); each value converted by its
    :class:`Option`. A key no verb has is a :class:`CLIError`."""
    import tomllib
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    declared = {command: verb.declared() for command, verb in readers(verbs).items()}
    # the verb's words come first ("validate tail-patch --config x.toml ...")
    command = next((c for c in declared if argv[:len(c.split())] == c.split()), None)
    if not known.config or command is None:
        return {}
    path = Path(known.config)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CLIError(f"--config {path} not found; check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise CLIError(f"--config {path} is not valid TOML ({e})") from None
    dashless = lambda table: {k.replace("-", "_"): v for k, v in table.items()}  # noqa: E731
    shared = dashless({k: v for k, v in config.items() if not isinstance(v, dict)})
    own = config
    for word in command.split():
        own = own.get(word, {}) if isinstance(own, dict) else {}
    own = dashless(own)
    table = command.replace(" ", ".")
    unknown = [f"{k!r}" for k in shared if not any(k in r for r in declared.values())]
    unknown += [f"{k!r} in [{table}]" for k in own if k not in declared[command]]
    if unknown:
        raise CLIError(f"--config {path}: unknown option {unknown[0]}; use the flag names "
                       f"of `influence-nb {command} --help`")
    options = declared[command]
    values = {k: v for k, v in shared.items() if k in options} | own
    return {command: {k: options[k].convert(v, f"--config {path}: {k}")
                      for k, v in values.items()}}
