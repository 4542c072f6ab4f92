"""Chat workloads: `multi-turn` (a user's conversation) and `agent` (tool calls between turns).

Each session is a list of turns whose `messages` are that turn's new messages; the runner keeps
the history (earlier messages and the replies) and sends it before them. Message text is
deterministic pseudo-English drawn from a fixed word list, so no model or tokenizer is needed:
a message of N words is N whitespace-separated words. Text is seeded per session; the system
prompt (when asked for) is the same in every session of a run, a prefix all sessions share.
"""
from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kvweave.config_flags import flag
from loadgen.types import Session, Turn, WorkloadError
from loadgen.workloads.base import at_least, given, make_rng

WORDS = tuple("""
the a an of to in for on with from by at as into about over after before between under through
and or but so because while when where which that this these those it its they their we our you
your he she his her one two three four five many some every each other more most first last next
new old small large long short high low early late good better best simple clear quick slow
system model request server cache memory token prompt answer question result report data file table
list value number time day week year city river country market price cost plan team project
service user customer order account message query record result source document page section
note idea reason example problem method change update version step task goal test check
run read write send find make take give show keep use build move open close start stop
explain describe compare summarize improve measure review choose follow return create remove
is are was were be been has have had can could will would should may might must does did
""".split())
PAUSE_DISTRIBUTIONS = ("exponential", "lognormal", "constant")
LOGNORMAL_SIGMA = 1.0
"""Shape of the lognormal tool pause (sigma of the underlying normal); its mean is --tool-pause-mean."""
TOOL_PREFIX = "Tool result:"


@dataclass(frozen=True)
class ChatOptions:
    """Options of the `multi-turn` and `agent` workloads."""

    num_turns: int = field(default=4, metadata=flag(metavar="N"))
    """turns (requests) per session"""
    turn_input_len: int = field(default=48, metadata=flag(metavar="WORDS"))
    """words of each user message"""
    system_prompt_len: int | None = field(default=None, metadata=flag(
        metavar="WORDS", default_text="0 for multi-turn, 64 for agent"))
    """words of the system message every session starts with, the same in all sessions; 0 for none"""

    def __post_init__(self) -> None:
        at_least(self.num_turns, 1, "--num-turns")
        at_least(self.turn_input_len, 1, "--turn-input-len")
        if self.system_prompt_len is not None:
            at_least(self.system_prompt_len, 0, "--system-prompt-len")


@dataclass(frozen=True)
class AgentOptions:
    """Options of the `agent` workload."""

    tool_output_len: int = field(default=96, metadata=flag(metavar="WORDS"))
    """words of each tool result, sent as a user message 'Tool result: ...'"""
    tool_pause_dist: str = field(default="exponential", metadata=flag(choices=PAUSE_DISTRIBUTIONS))
    """distribution of the tool-call pause before each tool result (lognormal: sigma 1)"""
    tool_pause_mean: float = field(default=0.5, metadata=flag(metavar="SECONDS"))
    """mean tool-call pause"""

    def __post_init__(self) -> None:
        at_least(self.tool_output_len, 1, "--tool-output-len")
        at_least(self.tool_pause_mean, 0.0, "--tool-pause-mean")
        if self.tool_pause_dist not in PAUSE_DISTRIBUTIONS:
            raise WorkloadError(f"--tool-pause-dist must be one of {', '.join(PAUSE_DISTRIBUTIONS)}, "
                                f"got {self.tool_pause_dist!r}")


def pseudo_text(rng: np.random.Generator, n_words: int) -> str:
    """`n_words` words of pseudo-English: sentences of 5-14 words, capitalized, ending in a period."""
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words).tolist()]
    start = 0
    while start < n_words:
        end = min(n_words, start + int(rng.integers(5, 15)))
        words[start] = words[start].capitalize()
        words[end - 1] += "."
        start = end
    return " ".join(words)


class MultiTurnWorkload:
    """Chat sessions of `num_turns` user messages of `turn_input_len` words each, endless."""

    name = "multi-turn"
    summary = "chat sessions whose history grows turn by turn"
    default_output_len = 128
    default_system_prompt_len = 0
    options = (ChatOptions,)

    def __init__(self, *, num_turns: int = 4, turn_input_len: int = 48, system_prompt_len: int = 0,
                 output_len: int = 128, seed: int = 0) -> None:
        at_least(num_turns, 1, "--num-turns")
        at_least(turn_input_len, 1, "--turn-input-len")
        at_least(system_prompt_len, 0, "--system-prompt-len")
        at_least(output_len, 1, "--output-len")
        at_least(seed, 0, "--seed")
        self.num_turns, self.turn_input_len, self.system_prompt_len = num_turns, turn_input_len, system_prompt_len
        self.output_len, self.seed = output_len, seed

    @classmethod
    def _common_args(cls, args: argparse.Namespace) -> dict:
        return dict(num_turns=args.num_turns, turn_input_len=args.turn_input_len,
                    system_prompt_len=given(args.system_prompt_len, cls.default_system_prompt_len),
                    output_len=given(args.output_len, cls.default_output_len), seed=args.seed)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MultiTurnWorkload:
        return cls(**cls._common_args(args))

    def system_prompt(self) -> str | None:
        """The system message every session of this seed starts with, or None without one."""
        if not self.system_prompt_len:
            return None
        return pseudo_text(make_rng(self.seed, self.name, 0), self.system_prompt_len)

    def _later_turn(self, rng: np.random.Generator) -> Turn:
        """A turn after the first: the user's next message."""
        return Turn(max_tokens=self.output_len,
                    messages=({"role": "user", "content": pseudo_text(rng, self.turn_input_len)},))

    def sessions(self) -> Iterator[Session]:
        system = self.system_prompt()
        head = ({"role": "system", "content": system},) if system is not None else ()
        for i in itertools.count():
            rng = make_rng(self.seed, self.name, 1, i)
            first = Turn(max_tokens=self.output_len,
                         messages=head + ({"role": "user", "content": pseudo_text(rng, self.turn_input_len)},))
            turns = [first] + [self._later_turn(rng) for _ in range(self.num_turns - 1)]
            yield Session(f"{self.name}-{i}", turns, tags={"session": i})


class AgentWorkload(MultiTurnWorkload):
    """Multi-turn sessions whose later turns are tool results (`Tool result: ...` as a user message,
    so any chat template takes it), each sent after a tool pause drawn from a distribution."""

    name = "agent"
    summary = "multi-turn sessions with tool results and tool-call pauses between turns"
    default_system_prompt_len = 64
    options = (ChatOptions, AgentOptions)

    def __init__(self, *, tool_output_len: int = 96, tool_pause_dist: str = "exponential",
                 tool_pause_mean: float = 0.5, system_prompt_len: int = 64, **kwargs) -> None:
        super().__init__(system_prompt_len=system_prompt_len, **kwargs)
        at_least(tool_output_len, 1, "--tool-output-len")
        at_least(tool_pause_mean, 0.0, "--tool-pause-mean")
        if tool_pause_dist not in PAUSE_DISTRIBUTIONS:
            raise WorkloadError(f"--tool-pause-dist must be one of {', '.join(PAUSE_DISTRIBUTIONS)}, "
                                f"got {tool_pause_dist!r}")
        self.tool_output_len, self.tool_pause_dist, self.tool_pause_mean = (tool_output_len, tool_pause_dist,
                                                                            tool_pause_mean)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentWorkload:
        return cls(tool_output_len=args.tool_output_len, tool_pause_dist=args.tool_pause_dist,
                   tool_pause_mean=args.tool_pause_mean, **cls._common_args(args))

    def pause(self, rng: np.random.Generator) -> float:
        """One tool pause in seconds, with mean `tool_pause_mean`."""
        mean = self.tool_pause_mean
        if self.tool_pause_dist == "constant" or mean == 0:
            return float(mean)
        if self.tool_pause_dist == "exponential":
            return float(rng.exponential(mean))
        return float(rng.lognormal(math.log(mean) - LOGNORMAL_SIGMA ** 2 / 2, LOGNORMAL_SIGMA))

    def _later_turn(self, rng: np.random.Generator) -> Turn:
        """A turn after the first: a tool's result, after the tool's pause."""
        content = f"{TOOL_PREFIX} {pseudo_text(rng, self.tool_output_len)}"
        return Turn(max_tokens=self.output_len, messages=({"role": "user", "content": content},),
                    pause_s=self.pause(rng))
