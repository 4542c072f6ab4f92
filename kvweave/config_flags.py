"""Command-line flags and environment overrides from a config dataclass: the one mapping every
kvweave command uses (engine, worker, router, serve), so a flag and its config field never drift.

Each field of the dataclass becomes `--field-name` (underscores as dashes), typed by its annotation
(int, float, str, or bool written as true/false; `X | None` takes an X), with the field's
docstring (the string literal under it, as in vLLM's configs) as its help, and the environment
variable `KVWEAVE_<FIELD>` overriding its default. Fields of other types (dicts, tuples) get no
flag and keep their dataclass default, unless their metadata says how to parse them: a field's
`flag(...)` metadata (a `Flag`) gives its command-line shape where the rules above do not fit (a
flag name, metavar, parse function, `nargs`, choices, a bare switch, the default as help shows it).
`config_kwargs` reads the parsed values back by field name.

Environment overrides are for the settings of the processes a deployment starts (engine, worker,
router, serve), where a container or unit file sets them. Client commands pass `env=False`: the
load generator and `generate`'s sampling defaults take their settings from the command line only,
because they run in the same shell as a server whose variables share the one `KVWEAVE_` namespace
(KVWEAVE_MODEL, KVWEAVE_BLOCK_SIZE and KVWEAVE_SEED would silently change what a load test sends),
and a measurement should be what its command line says.

It lives in the shared layer because every process has a command line, and it imports nothing
heavier than argparse.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

ENV_PREFIX = "KVWEAVE_"
FLAG_TYPES = (bool, int, float, str)
FLAG_KEY = "flag"
"""The key of a field's metadata that holds its `Flag`."""
BOOL_ACTIONS = {"store_true": "store_true", "store_false": "store_false", "optional": argparse.BooleanOptionalAction}
"""Flag.action -> argparse action: a bare switch that sets the field, one that clears it (`--no-x`
for a field `x`, named through Flag.name), or a `--x` / `--no-x` pair."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field appears on the command line where the module's rules do not fit; set it with
    `field(default=..., metadata=flag(...))`."""

    name: str | None = None
    """The flag, when not `--field-name` (e.g. "--no-progress" for a field `progress`)."""
    metavar: str | None = None
    """The value's placeholder in --help (default: the flag's name in capitals, or the choices)."""
    parse: Callable[[str], Any] | None = None
    """Text -> value, raising argparse.ArgumentTypeError or ValueError with a message (default: the
    annotation's type); it lets fields of other types (lists, tuples) have a flag."""
    nargs: str | None = None
    """argparse's nargs ("+": one or more values, parsed each, as a list)."""
    choices: tuple | None = None
    """The only values accepted."""
    action: str | None = None
    """For bools: "store_true" / "store_false" (a switch taking no value) or "optional" (--x / --no-x)."""
    default_text: str | None = None
    """The default as --help shows it, when the value alone would not say it ("" shows none)."""

    def __post_init__(self) -> None:
        if self.action is not None and self.action not in BOOL_ACTIONS:
            raise ValueError(f"Flag.action must be one of {', '.join(BOOL_ACTIONS)}, got {self.action!r}")


def flag(**kwargs: Any) -> dict[str, Flag]:
    """A field's metadata giving its command-line shape: `field(default=0, metadata=flag(metavar="N"))`."""
    return {FLAG_KEY: Flag(**kwargs)}


def field_flag(f: dataclasses.Field) -> Flag:
    return f.metadata.get(FLAG_KEY) or Flag()


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); argparse.ArgumentTypeError otherwise."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def bounded(kind: type, minimum: float, strict: bool = False) -> Callable[[str], Any]:
    """A parse function: a finite `kind` (int or float) above `minimum` (`strict`) or at least it."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value
    return parse


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under the field, whitespace collapsed (base classes first)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen, interactive): no help text
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_type(annotation: Any) -> type | None:
    """The flag type of a field annotation (`X | None` gives X), or None when it has no flag."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in FLAG_TYPES else None


def flag_fields(cls: type, only: Iterable[str] | None = None, exclude: Iterable[str] = ()
                ) -> list[tuple[dataclasses.Field, type]]:
    """The fields of `cls` that get a flag, with their flag types (None where the field's Flag parses
    the text), in declaration order."""
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    out = []
    for f in dataclasses.fields(cls):
        kind, spec = flag_type(hints[f.name]), field_flag(f)
        if kind is None and spec.parse is None and spec.nargs is None:
            continue
        if f.name in exclude or (wanted is not None and f.name not in wanted):
            continue
        out.append((f, kind))
    return out


def _parse(kind: type | None, spec: Flag) -> Callable[[str], Any]:
    return spec.parse or (parse_bool if kind is bool else kind or str)


def _default(f: dataclasses.Field, kind: type | None, defaults: Mapping[str, Any], env: bool) -> Any:
    if f.name in defaults:
        value = defaults[f.name]
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        value = None if f.default_factory is dataclasses.MISSING else f.default_factory()
    text = os.environ.get(env_name(f.name)) if env else None
    if text is None or text == "":
        return value
    parse = _parse(kind, field_flag(f))
    return [parse(t) for t in text.split()] if field_flag(f).nargs else parse(text)


def _help(text: str, default: Any, spec: Flag, env: str | None) -> str:
    """The field's help with "(default: X; env KVWEAVE_X)" after it, %-escaped for argparse."""
    shown = f"default: {default}" if spec.default_text is None else (
        f"default: {spec.default_text}" if spec.default_text else "")
    suffix = "; ".join(part for part in (shown, f"env {env}" if env else "") if part)
    out = f"{text} ({suffix})" if text and suffix else text or suffix
    return out.replace("%", "%%")


def _add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, f: dataclasses.Field, kind: type | None,
         name: str, default: Any, help: str, choices: Iterable | None) -> None:
    spec = field_flag(f)
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help}
    if spec.action is not None:
        kwargs["action"] = BOOL_ACTIONS[spec.action]
    else:
        kwargs["type"] = _parse(kind, spec)
        kwargs["metavar"] = spec.metavar or ("BOOL" if kind is bool else None if choices is not None
                                             else name.lstrip("-").replace("-", "_").upper())
        if spec.nargs is not None:
            kwargs["nargs"] = spec.nargs
    if choices is not None:
        kwargs["choices"] = list(choices)
    parser.add_argument(name, **kwargs)


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                    only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                    defaults: Mapping[str, Any] | None = None, help: Mapping[str, str] | None = None,
                    flags: Mapping[str, str] | None = None, choices: Mapping[str, Iterable] | None = None,
                    default_texts: Mapping[str, str] | None = None, env: bool = True) -> None:
    """Add one flag per field of `cls` (see the module docstring).

    `only` / `exclude`: which fields; `defaults`: this command's defaults where they differ from the
    dataclass's; `help`: help texts that replace the field docstrings; `flags`: flag names that
    differ from `--field-name` (e.g. {"grpc_port": "--port"}); `choices`: the valid values of fields
    that take one of a few (argparse rejects the others); `default_texts`: how --help shows this
    command's defaults where the value alone would not say it (as `Flag.default_text` does); these
    beat the fields' `Flag`s. `env`: whether KVWEAVE_<FIELD> variables override the defaults (see
    the module docstring)."""
    defaults, flags, choices, default_texts = defaults or {}, flags or {}, choices or {}, default_texts or {}
    docs = {**field_docs(cls), **(help or {})}
    for f, kind in flag_fields(cls, only, exclude):
        spec = field_flag(f)
        if f.name in default_texts:
            spec = dataclasses.replace(spec, default_text=default_texts[f.name])
        default = _default(f, kind, defaults, env)
        text = _help(docs.get(f.name, ""), default, spec, env_name(f.name) if env else None)
        name = flags.get(f.name) or spec.name or "--" + f.name.replace("_", "-")
        _add(parser, f, kind, name, default, text, choices.get(f.name, spec.choices))


def config_kwargs(cls: type, ns: argparse.Namespace, only: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The parsed values of `cls`'s flags, by field name (to build `cls(**kwargs)`)."""
    return {f.name: getattr(ns, f.name) for f, _ in flag_fields(cls, only, exclude)}
