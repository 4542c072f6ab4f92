"""`rag`: questions with their retrieved passages (MuSiQue format), passages sent as reusable chunks.

The dataset is a JSON list of `{"question": str, "answers": [str], "ctxs": [{"title": str, "text":
str}, ...]}` ("answers" is not used; "title" may be missing). Each request is an instruction (not
reusable), the question's first `num_docs` passages (`Title: <title>\\n<text>\\n`, or `Passage:
<text>\\n` when the title is empty, as throughout the shipped MuSiQue subset; one reusable chunk
each) and `Question: <q>\\nAnswer:` (not reusable). Questions are drawn endlessly, with
replacement, uniformly or with a Zipf-like skew, so popular questions (and their passages) recur;
with `shuffle_docs` each request presents its passages in a fresh random order, so a recurring
question's passages come at other positions (chunk reuse, not prefix reuse).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvweave.config_flags import flag
from loadgen.types import Session, Turn, WorkloadError
from loadgen.workloads.base import DEFAULT_DATASETS, at_least, given, make_rng

INSTRUCTION = ("Answer the question at the end using the passages below. Reply directly, in a few words, "
               "without repeating the question.\n\n")


@dataclass(frozen=True)
class RagOptions:
    """Options of the `rag` workload."""

    num_docs: int = field(default=4, metadata=flag(metavar="N"))
    """passages per question, each a reusable chunk"""
    popularity_skew: float = field(default=0.0, metadata=flag(metavar="S"))
    """question popularity p(rank) ~ 1/(rank+1)^S over a seeded order of the questions; 0 is uniform,
    larger makes popular questions recur"""
    max_doc_words: int = field(default=0, metadata=flag(metavar="N"))
    """cut each passage to N words, for short CPU runs; 0 keeps it whole"""
    shuffle_docs: bool = field(default=False, metadata=flag(action="store_true", default_text=""))
    """present each request's passages in a fresh random order (retrieval order varies with the
    query's wording), so a recurring question's passages come at other positions: chunk reuse rather
    than prefix reuse"""
    chunks: bool = field(default=True, metadata=flag(name="--no-chunks", action="store_false", default_text=""))
    """send the passages as reusable chunks; --no-chunks sends the same text as one plain prompt, for
    servers without kvweave's chunk API"""

    def __post_init__(self) -> None:
        at_least(self.num_docs, 1, "--num-docs")
        at_least(self.popularity_skew, 0.0, "--popularity-skew")
        at_least(self.max_doc_words, 0, "--max-doc-words")


def load_questions(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(question, [(title, text), ...]) of every item of a MuSiQue-format JSON file."""
    if not path.exists():
        raise WorkloadError(f"RAG dataset not found: {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read RAG dataset {path}: {e}") from None
    if not isinstance(items, list):
        raise WorkloadError(f"{path}: expected a JSON list of questions, got {type(items).__name__}")
    if not items:
        raise WorkloadError(f"RAG dataset {path} holds no questions")
    questions = []
    for i, item in enumerate(items):
        where = f"{path}, item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise WorkloadError(f"{where}: expected an object with a string 'question'")
        ctxs = item.get("ctxs")
        if not isinstance(ctxs, list) or not ctxs:
            raise WorkloadError(f"{where}: 'ctxs' must be a non-empty list of passages")
        passages = []
        for j, ctx in enumerate(ctxs):
            if not (isinstance(ctx, dict) and isinstance(ctx.get("title", ""), str)
                    and isinstance(ctx.get("text"), str)):
                raise WorkloadError(f"{where}, passage {j}: expected an object with a string 'text' (and 'title')")
            passages.append((ctx.get("title", ""), ctx["text"]))
        questions.append((item["question"], passages))
    return questions


def zipf_weights(n: int, skew: float) -> np.ndarray:
    """p(rank) proportional to 1 / (rank + 1) ** skew over ranks 0..n-1 (skew 0: uniform)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew
    return weights / weights.sum()


class RagWorkload:
    """One-turn requests: instruction + `num_docs` passages as chunks + the question."""

    name = "rag"
    summary = "MuSiQue questions with retrieved passages sent as reusable chunks"
    default_output_len = 32
    options = (RagOptions,)

    def __init__(self, path: str | os.PathLike = DEFAULT_DATASETS["rag"], *, num_docs: int = 4,
                 popularity_skew: float = 0.0, max_doc_words: int = 0, chunks: bool = True,
                 shuffle_docs: bool = False, output_len: int = 32, seed: int = 0) -> None:
        at_least(num_docs, 1, "--num-docs")
        at_least(popularity_skew, 0.0, "--popularity-skew")
        at_least(max_doc_words, 0, "--max-doc-words")
        at_least(output_len, 1, "--output-len")
        at_least(seed, 0, "--seed")
        self.path = Path(path)
        questions = load_questions(self.path)
        short = next((i for i, (_, p) in enumerate(questions) if len(p) < num_docs), None)
        if short is not None:
            raise WorkloadError(f"{self.path}, item {short}: {len(questions[short][1])} passages, fewer than "
                                f"--num-docs {num_docs}")
        self.questions = [(q, [self._passage(t, x, max_doc_words) for t, x in p[:num_docs]]) for q, p in questions]
        self.popularity_skew, self.chunks, self.output_len, self.seed = popularity_skew, chunks, output_len, seed
        self.shuffle_docs = shuffle_docs

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RagWorkload:
        return cls(args.dataset or DEFAULT_DATASETS[cls.name], num_docs=args.num_docs,
                   popularity_skew=args.popularity_skew, max_doc_words=args.max_doc_words,
                   chunks=args.chunks, shuffle_docs=args.shuffle_docs, output_len=given(args.output_len, cls.default_output_len),
                   seed=args.seed)

    @staticmethod
    def _passage(title: str, text: str, max_words: int) -> str:
        if max_words:
            text = " ".join(text.split()[:max_words])
        return f"Title: {title}\n{text}\n" if title else f"Passage: {text}\n"

    def segments(self, index: int, order: Sequence[int] | None = None) -> tuple[tuple[str, bool], ...]:
        """The prompt of question `index` as (text, reusable) segments, its passages in `order`
        (default: as retrieved)."""
        question, passages = self.questions[index]
        if order is not None:
            passages = [passages[i] for i in order]
        return ((INSTRUCTION, False), *((p, True) for p in passages), (f"Question: {question}\nAnswer:", False))

    def sessions(self) -> Iterator[Session]:
        rng = make_rng(self.seed, self.name)
        order = rng.permutation(len(self.questions))
        cumulative = np.cumsum(zipf_weights(len(self.questions), self.popularity_skew))
        for i in itertools.count():
            rank = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(order) - 1)
            index = int(order[rank])
            segments = self.segments(index, rng.permutation(len(self.questions[index][1])) if self.shuffle_docs else None)
            turn = (Turn(max_tokens=self.output_len, segments=segments) if self.chunks
                    else Turn(max_tokens=self.output_len, prompt="".join(text for text, _ in segments)))
            yield Session(f"{self.name}-{i}", [turn], tags={"question": index})
