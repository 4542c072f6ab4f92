"""Command-line flags and environment overrides from a config dataclass: the one mapping every
kvweave command uses (engine, worker, router, serve), so a flag and its config field never drift.

Each field of the dataclass becomes `--field-name` (underscores as dashes), typed by its annotation
(int, float, str, or bool written as true/false; `X | None` takes an X), with the field's
docstring (the string literal under it, as in vLLM's configs) as its help, and the environment
variable `KVWEAVE_<FIELD>` overriding its default. Fields of other types (dicts, tuples) get no
flag and keep their dataclass default. `config_kwargs` reads the parsed values back by field name.

It lives in the shared layer because every process has a command line, and it imports nothing
heavier than argparse.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

ENV_PREFIX = "KVWEAVE_"
FLAG_TYPES = (bool, int, float, str)


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); argparse.ArgumentTypeError otherwise."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


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
    """The fields of `cls` that get a flag, with their flag types, in declaration order."""
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    out = []
    for f in dataclasses.fields(cls):
        kind = flag_type(hints[f.name])
        if kind is None or f.name in exclude or (wanted is not None and f.name not in wanted):
            continue
        out.append((f, kind))
    return out


def _default(f: dataclasses.Field, kind: type, defaults: Mapping[str, Any]) -> Any:
    value = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
    env = os.environ.get(env_name(f.name))
    if env is None or env == "":
        return value
    return parse_bool(env) if kind is bool else kind(env)


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                    only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                    defaults: Mapping[str, Any] | None = None, help: Mapping[str, str] | None = None,
                    flags: Mapping[str, str] | None = None, choices: Mapping[str, Iterable] | None = None) -> None:
    """Add one flag per field of `cls` (see the module docstring).

    `only` / `exclude`: which fields; `defaults`: this command's defaults where they differ from the
    dataclass's; `help`: help texts that replace the field docstrings; `flags`: flag names that
    differ from `--field-name` (e.g. {"grpc_port": "--port"}); `choices`: the valid values of fields
    that take one of a few (argparse rejects the others)."""
    defaults, flags, choices = defaults or {}, flags or {}, choices or {}
    docs = {**field_docs(cls), **(help or {})}
    for f, kind in flag_fields(cls, only, exclude):
        default = _default(f, kind, defaults)
        text = docs.get(f.name, "").replace("%", "%%")
        suffix = f"default: {default}; env {env_name(f.name)}"
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, default=default, help=f"{text} ({suffix})" if text else suffix,
                            type=parse_bool if kind is bool else kind,
                            metavar="BOOL" if kind is bool else flag.lstrip("-").replace("-", "_").upper(),
                            **({"choices": list(choices[f.name])} if f.name in choices else {}))


def config_kwargs(cls: type, ns: argparse.Namespace, only: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The parsed values of `cls`'s flags, by field name (to build `cls(**kwargs)`)."""
    return {f.name: getattr(ns, f.name) for f, _ in flag_fields(cls, only, exclude)}
