"""kvweave.config_flags: flags, help and environment overrides from a config dataclass, and the
command-line shapes a field's Flag metadata gives it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from kvweave.config_flags import add_config_args, bounded, config_kwargs, flag


@dataclass
class Example:
    size: int = 4
    """blocks per thing"""
    name: str | None = None
    tags: list[str] = field(default_factory=list, metadata=flag(nargs="+", metavar="TAG", default_text=""))
    """labels"""
    ratio: float = field(default=0.5, metadata=flag(parse=bounded(float, 0, strict=True), metavar="R"))
    """a share"""
    progress: bool = field(default=True, metadata=flag(name="--quiet", action="store_false", default_text=""))
    """show progress"""
    eos: bool = field(default=True, metadata=flag(action="optional"))
    mode: str = field(default="a", metadata=flag(choices=("a", "b")))
    extra: dict = field(default_factory=dict)
    """no flag: not a flag type and no parse function"""


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(p, Example, **kwargs)
    return p


def test_defaults_and_values_by_field() -> None:
    assert Example(**config_kwargs(Example, parser().parse_args([]))) == Example()
    ns = parser().parse_args(["--size", "8", "--tags", "x", "y", "--ratio", "0.25", "--quiet", "--no-eos",
                              "--mode", "b", "--name", "n"])
    assert Example(**config_kwargs(Example, ns)) == Example(8, "n", ["x", "y"], 0.25, False, False, "b")
    assert "extra" not in config_kwargs(Example, ns)


def test_bad_values_are_usage_errors() -> None:
    for argv in (["--ratio", "0"], ["--mode", "c"], ["--size", "x"]):
        with pytest.raises(argparse.ArgumentError):
            parser().parse_args(argv)


def test_help_shows_docstrings_defaults_and_env() -> None:
    text = " ".join(parser().format_help().split())
    assert "--size SIZE blocks per thing (default: 4; env KVWEAVE_SIZE)" in text
    assert "--tags TAG [TAG ...] labels (env KVWEAVE_TAGS)" in text
    assert "--quiet show progress (env KVWEAVE_PROGRESS)" in text and "--mode {a,b}" in text
    quiet = " ".join(parser(env=False).format_help().split())
    assert "KVWEAVE_" not in quiet and "--size SIZE blocks per thing (default: 4)" in quiet


def test_a_commands_default_text_replaces_the_value_in_help() -> None:
    p = parser(defaults={"size": None}, default_texts={"size": "4, or 8 with --name"})
    text = " ".join(p.format_help().split())
    assert "--size SIZE blocks per thing (default: 4, or 8 with --name; env KVWEAVE_SIZE)" in text


def test_environment_overrides_only_when_asked(monkeypatch) -> None:
    monkeypatch.setenv("KVWEAVE_SIZE", "16")
    monkeypatch.setenv("KVWEAVE_TAGS", "a b")
    monkeypatch.setenv("KVWEAVE_PROGRESS", "false")
    ns = parser().parse_args([])
    assert (ns.size, ns.tags, ns.progress) == (16, ["a", "b"], False)
    assert parser().parse_args(["--size", "2"]).size == 2  # the command line beats the environment
    ns = parser(env=False).parse_args([])
    assert (ns.size, ns.tags, ns.progress) == (4, [], True)
